"""The SVF and dispatch parts of benchmarks/neat_adapt.py, on the quickstart's code model.

svf:      the base fine-tuned on the King James Bible twice, with LoRA (rank 4, as continual.py's
          table) and with SVF, the same data, seed, steps and learning rate, on Ray Train (DeepSpeed,
          expert parallel); each scored on the base's held-out code (old) and held-out KJV (new).
dispatch: three domains, the base's own (stdlib code: no adapter), KJV prose and software licence
          texts (the licence files of the pinned packages in this environment, deduplicated), an
          SVF adapter for each of the latter two. The classifier (serving/dispatch.py, the one a
          replica fits for `<base>:auto`) is fitted on the training splits; accuracy is the share of
          held-out prompts (random-length prefixes of validation blocks) routed to their own domain;
          on a mixed held-out set (validation blocks of all three), `auto` (each block routed by its
          own tokens, as an echo request would be) is scored against every single choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def licence_corpus(out: Path) -> Path:
    """The licence texts shipped in this environment's site-packages, one document per distinct text."""
    site = Path(torch.__file__).resolve().parents[1]
    seen, docs = set(), []
    for path in sorted(site.glob("*.dist-info/**/*")):
        if path.is_file() and path.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")):
            text = path.read_text(encoding="utf-8", errors="replace")
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest not in seen and len(text) > 200:
                seen.add(digest)
                docs.append(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out


def finetune_adapter(args: Any, base: Path, name: str, extra: list[str]) -> dict[str, Any]:
    from neuraflex_ray.config import load_config
    from neuraflex_ray.finetune.run import finetune

    cfg = load_config(str(REPO / "jobs" / "configs" / "finetune_kjv.yaml"), [
        f"output_dir={Path(args.output_dir).resolve()}", f"finetune.from_export={base}", f"name=neat-{name}",
        "finetune.ewc_lambda=0", f"train.max_steps={args.ft_steps}", *extra])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        out = finetune(cfg, fresh=True)
    meta = json.loads((Path(out["adapter"]) / "adapter.json").read_text())
    return {"adapter": out["adapter"], "seconds": time.perf_counter() - t0, "data_dir": meta["data_dir"],
            "trainable_fraction": meta["adapter_params"] / meta["base_params"]}


def adapted(base: Path, adapter: str | None) -> torch.nn.Module:
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.finetune.methods import load_adapter

    model, _ = load_exported(base)
    if adapter is not None:
        load_adapter(model, adapter, base)
    return model.eval()


def val_blocks(data_dir: str) -> tuple[np.ndarray, float]:
    from pipelines.shards import read_columns

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    return read_columns(data_dir, manifest["val_shards"], ("tokens",))["tokens"], manifest["val_bytes_per_token"]


def bpb(model: torch.nn.Module, data_dir: str) -> float:
    from neuraflex_ray.eval.lm import bits_per_byte, heldout_loss

    blocks, bytes_per_token = val_blocks(data_dir)
    return bits_per_byte(heldout_loss(model, blocks), bytes_per_token)


def run_svf(args: Any, base: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON's "svf" section, and the KJV SVF adapter (dispatch reuses it)."""
    old_data = str(Path(json.loads((base / "config.json").read_text())["data"]["output_dir"]).resolve())
    arms = {"lora": finetune_adapter(args, base, "kjv-lora", ["finetune.method=lora"]),
            "svf": finetune_adapter(args, base, "kjv-svf", ["finetune.method=svf",
                                                           *([f"train.lr={args.svf_lr}"] if args.svf_lr else [])])}
    scores = {name: {"old": bpb(adapted(base, a["adapter"]), old_data), "new": bpb(adapted(base, a["adapter"]), a["data_dir"])}
              for name, a in arms.items()}
    base_old = bpb(adapted(base, None), old_data)
    out = {"trainable_fraction": arms["svf"]["trainable_fraction"], "old_bpb": scores["svf"]["old"],
           "new_bpb": scores["svf"]["new"], "lora_new_bpb": scores["lora"]["new"], "lora_old_bpb": scores["lora"]["old"],
           "base_old_bpb": base_old, "base_new_bpb": bpb(adapted(base, None), arms["svf"]["data_dir"]),
           "lora_trainable_fraction": arms["lora"]["trainable_fraction"],
           "forgetting": {n: s["old"] - base_old for n, s in scores.items()},
           "seconds": {n: a["seconds"] for n, a in arms.items()}, "steps": args.ft_steps, "svf_lr": args.svf_lr}
    print(f"[neat] svf: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out, arms["svf"]


def run_dispatch(args: Any, base: Path, kjv: dict[str, Any]) -> dict[str, Any]:
    """The JSON's "dispatch" section."""
    from neuraflex_ray.serving.dispatch import BASE, fit_for_adapters

    corpus = licence_corpus(Path(args.output_dir).resolve() / "licences.jsonl")
    lic = finetune_adapter(args, base, "licences-svf", ["finetune.method=svf", f"data.source={corpus}",
                                                         *([f"train.lr={args.svf_lr}"] if args.svf_lr else []),
                                                         f"data.output_dir={Path(args.output_dir).resolve() / 'data-licences'}",
                                                         "data.max_bytes=0"])
    base_data = str(Path(json.loads((base / "config.json").read_text())["data"]["output_dir"]).resolve())
    data = {BASE: base_data, "kjv": kjv["data_dir"], "licences": lic["data_dir"]}
    adapters = {BASE: None, "kjv": kjv["adapter"], "licences": lic["adapter"]}
    models = {name: adapted(base, a) for name, a in adapters.items()}
    dispatcher = fit_for_adapters(models[BASE], base_data, {k: v for k, v in data.items() if k != BASE})
    rng = random.Random(1)
    hits, first_ms, second_ms, nats = [], [], [], {name: 0.0 for name in [*adapters, "auto"]}
    n_bytes = 0.0
    for domain, d in data.items():
        blocks, bytes_per_token = val_blocks(d)
        picked = [blocks[i] for i in rng.sample(range(len(blocks)), min(args.dispatch_blocks, len(blocks)))]
        for block in picked:
            prompt = [int(t) for t in block[:rng.randint(16, len(block))]]
            _, info = dispatcher.choose(models[BASE], prompt)
            hits.append(info["adapter"] == domain)
            first_ms.append(info["first_pass_ms"])
            t0 = time.perf_counter()
            with torch.no_grad():  # the second pass's prefill of the same prompt, for scale
                models[info["adapter"]](torch.tensor([prompt]))
            second_ms.append(1000 * (time.perf_counter() - t0))
            # The mixed set: the whole block, routed by its own tokens, scored by every choice.
            _, whole = dispatcher.choose(models[BASE], [int(t) for t in block])
            x = torch.as_tensor(block[None].astype(np.int64))
            for name, model in models.items():
                with torch.no_grad():
                    logp = model(x[:, :-1])[0].float().log_softmax(-1)
                loss = -float(logp.gather(2, x[:, 1:, None]).sum())
                nats[name] += loss
                if name == whole["adapter"]:
                    nats["auto"] += loss
            n_bytes += (len(block) - 1) * bytes_per_token
    mixed = {name: v / math.log(2) / n_bytes for name, v in nats.items()}
    out = {"accuracy": float(np.mean(hits)), "auto_mixed_bpb": mixed["auto"],
           "best_single_mixed_bpb": min(v for k, v in mixed.items() if k != "auto"),
           "mixed_bpb": mixed, "first_pass_ms": float(np.mean(first_ms)),
           "second_pass_prefill_ms": float(np.mean(second_ms)), "prompts": len(hits),
           "domains": {k: str(v) for k, v in data.items()}, "licences_trainable_fraction": lic["trainable_fraction"]}
    print(f"[neat] dispatch: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out
