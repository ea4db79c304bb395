"""The byte-level BLT against the BPE MoE LM at equal training FLOPs, on one corpus (issue 26).

    python benchmarks/blt_vs_bpe.py --corpus stdlib|kjv [--budgets 1 2] [--out runs/bench-blt]

A budget of 1 is the quickstart's training FLOPs: the debug NeuralFlex-MoE (jobs/configs/moe_debug.yaml)
for its 400 steps on its BPE blocks. Every cell trains on 2 Ray Train workers with DeepSpeed expert
parallelism until it has spent the budget, counted by one convention (models/moe_lm.flops_per_token,
models/blt.forward_flops: matmuls and attention, 3x forward; padding patch slots count):

    bpe          the debug MoE LM, budget / its FLOPs per step steps
    entropy      the debug BLT, entropy patching fitted to 4 bytes per patch; the budget pays for its
                 entropy model's training too (a tiny byte-level MoE, trained once per corpus)
    static       every 4 bytes          space    after every space-like byte
    entropy_6, static_6: the same at 6 bytes per patch (budget 1 only, unless --all-cells)
    static_same_steps (budget 1): a diagnostic, not the measure: static patching for as many steps
                 (bytes) as the entropy cell, so its FLOPs are lower; it separates what the entropy
                 rule buys from what its padded slots and entropy model cost

Held-out bits per byte of each is measured in one process on the same documents (>= 20 held out), with
a per-document bootstrap interval, beside a bigram fitted on the training split. Robustness: 5% of the
characters of the first half of each held-out block are perturbed (case flips, deletions, swapped
neighbours); how much the clean second half's bits per byte rises is measured for the BPE model and
the entropy BLT of budget 1. Inference FLOPs per byte are forward FLOPs over a block (the BLT's at its
measured patch size, with its entropy model's).

Every cell is resumable: a finished cell's result is kept under <out>/<corpus>/cells/ and never rerun,
and an interrupted one continues from its last checkpoint. Prints one JSON object:
{"corpus", "budgets": [{"train_flops", "bpe": {"bpb", "infer_flops_per_byte", ...}, "blt": {"entropy":
{"bpb", "mean_patch_bytes", "infer_flops_per_byte", ...}, "static": {...}, "space": {...}}}],
"noise": {"rate", "bpe_dbpb", "blt_dbpb"}}. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_STEPS = 400  # moe_debug.yaml's train.max_steps: what a budget of 1 is
CELLS = {"entropy": ("entropy", 4.0), "static": ("static", 4.0), "space": ("space", 4.0),
         "entropy_6": ("entropy", 6.0), "static_6": ("static", 6.0)}
MAIN_CELLS = ("entropy", "static", "space")
NOISE_RATE, NOISE_BLOCKS = 0.05, 64
COMMON = ["data.max_bytes=3000000", "data.min_val_documents=20", "train.log_every=25", "train.eval_batches=8"]


def log(msg: str) -> None:
    print(f"[blt_vs_bpe] {msg}", file=sys.stderr, flush=True)


def steps_of(name: str, steps: int) -> list[str]:
    return [f"name={name}", f"train.max_steps={steps}", f"train.eval_every={steps}", "train.warmup_steps=30",
            f"train.checkpoint_every={max(50, steps // 4)}"]


def bpe_config(corpus: str, out: Path, steps: int, name: str = "bpe") -> Any:
    from neuraflex_ray.config import load_config

    return load_config(REPO / "jobs/configs/moe_debug.yaml", [
        f"output_dir={out / 'runs'}", f"data.source={corpus}", f"data.output_dir={out / 'data' / 'text'}",
        *COMMON, *steps_of(name, steps)])


def blt_config(corpus: str, out: Path, mode: str, patch: float, steps: int, name: str) -> Any:
    from neuraflex_ray.config import load_config

    return load_config(REPO / "jobs/configs/blt_debug.yaml", [
        f"output_dir={out / 'runs'}", f"data.source={corpus}", f"data.output_dir={out / 'data' / 'bytes'}",
        f"model.patching={mode}", f"model.patch_size={patch}",
        # Patch slots (the padded count every block pays for) are block_bytes / min_patch_bytes.
        f"model.min_patch_bytes={max(2, int(patch // 2))}", *COMMON, *steps_of(name, steps)])


def run_cell(cfg: Any) -> Path:
    """Train (continuing from the run's last checkpoint if it has one) and export."""
    import dataclasses

    from neuraflex_ray.checkpoint import export_checkpoint
    from neuraflex_ray.train.driver import latest_checkpoint, train

    done = latest_checkpoint(cfg.run_dir)
    if done is not None:
        from neuraflex_ray.checkpoint import read_checkpoint_state

        if read_checkpoint_state(done)["step"] < cfg.train.max_steps:
            log(f"{cfg.name}: continuing from {done}")
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume_from=str(cfg.run_dir)))
            done = None
    if done is None:
        done = Path(train(cfg, fresh=not cfg.train.resume_from)["checkpoint"])
    return export_checkpoint(done, cfg.data.output_dir, cfg.run_dir / "export", {"run_dir": str(cfg.run_dir)})


def bpe_eval(export: Path, data_dir: Path) -> dict[str, Any]:
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.eval.bootstrap import ratio_interval
    from neuraflex_ray.eval.lm import bigram_bits_per_byte, bits_per_byte, token_losses
    from pipelines.text import EOS, load_text_datasets, load_tokenizer, read_blocks, target_documents

    model, _ = load_exported(export)
    train_ds, val_ds, manifest = load_text_datasets(str(data_dir))
    val, per = read_blocks(val_ds), manifest["val_bytes_per_token"]
    nats = token_losses(model, val)
    eos = load_tokenizer(data_dir / "tokenizer.json").token_to_id(EOS)
    lo, hi = ratio_interval(nats / math.log(2), np.full(nats.shape, per), target_documents(val, eos))
    from neuraflex_ray.models.moe_lm import flops_per_token, param_counts

    fpt = flops_per_token(model.cfg, manifest["seq_len"])
    return {"bpb": bits_per_byte(float(nats.mean()), per), "bpb_ci95": [lo, hi],
            "bigram_bpb": bigram_bits_per_byte(read_blocks(train_ds), val, manifest["vocab_size"], per),
            "infer_flops_per_byte": fpt / 3 / per, "params": param_counts(model.cfg)["total"],
            "val_documents": int(target_documents(val, eos).max()) + 1}


def blt_eval(export: Path, data_dir: Path, entropy_flops_per_byte: float) -> dict[str, Any]:
    from neuraflex_ray.checkpoint import read_export_meta
    from neuraflex_ray.config import JobConfig
    from neuraflex_ray.eval.blt import evaluate_blt_export
    from neuraflex_ray.families.blt.accounting import param_count
    from neuraflex_ray.models.blt import inference_flops_per_byte

    ev = evaluate_blt_export(export, data_dir)
    meta = read_export_meta(export)  # the config, not the weights a second time
    cfg, block = JobConfig.from_dict({"model_type": "blt", "model": meta["model"]}).model, meta["data"]["block_bytes"]
    infer = inference_flops_per_byte(cfg, block, ev["mean_patch_bytes_val"])
    counts = param_count(cfg)
    return {"bpb": ev["val_bits_per_byte"], "bpb_ci95": ev["val_bits_per_byte_ci95"],
            "bigram_bpb": ev["bigram_bits_per_byte"], "mean_patch_bytes": cfg.mean_patch_bytes,
            "mean_patch_bytes_val": ev["mean_patch_bytes_val"],
            "infer_flops_per_byte": infer + (entropy_flops_per_byte if cfg.patching == "entropy" else 0.0),
            "params": counts["total"], "hash_embedding_params": counts["hash_embeddings"],
            "val_documents": ev["val_documents"]}


# ---- robustness ------------------------------------------------------------------------------


def perturb(text: str, rate: float, rng: np.random.Generator) -> str:
    """About `rate` x bytes edits: flip an ASCII letter's case, delete a character, or swap it with the next
    (never longer in bytes: the block must still fit the entropy model's context)."""
    chars = list(text)
    for _ in range(max(1, round(rate * len(text.encode())))):
        if len(chars) < 2:
            break
        i = int(rng.integers(0, len(chars) - 1))
        op = int(rng.integers(0, 3))
        if op == 0 and chars[i].isascii() and chars[i].isalpha():  # ASCII: a flip keeps the byte count
            chars[i] = chars[i].swapcase()
        elif op == 1:
            del chars[i]
        else:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def halves(byte_dir: Path) -> list[tuple[str, str]]:
    """Held-out text cut in two at a character: NOISE_BLOCKS held-out blocks, those without a document
    end first; where too few are (KJV's documents are verses, about 130 bytes), blocks that hold
    document ends follow with each end written as a newline, verses running on as a chapter's lines
    do (the same text for both models, and the measure is the rise the perturbation causes)."""
    from pipelines.shards import read_columns, require_manifest

    m = require_manifest(byte_dir, "the BLT cells")
    blocks = read_columns(byte_dir, m["val_shards"], ("bytes",))["bytes"]
    ends = (blocks == 256).any(1)
    out = []
    for b in [*blocks[~ends], *blocks[ends]][:NOISE_BLOCKS]:
        text = bytes(int(x) if x != 256 else ord("\n") for x in b).decode("utf-8", errors="ignore")
        out.append((text[: len(text) // 2], text[len(text) // 2:]))
    return out


def second_half_bpb(score: Any, pairs: list[tuple[str, str]]) -> float:
    """Bits per byte of each second half given its (maybe perturbed) first half; score(a, b) -> nats of b."""
    nats = sum(score(a, b) for a, b in pairs)
    return nats / math.log(2) / sum(len(b.encode()) for _, b in pairs)


def noise(bpe_export: Path, blt_export: Path, byte_dir: Path, seed: int = 0) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.families.blt.entropy import byte_entropies
    from neuraflex_ray.families.blt.serve import load_parts
    from neuraflex_ray.models.blt import starts_of
    from pipelines.text import load_tokenizer

    bpe, _ = load_exported(bpe_export)
    tok = load_tokenizer(bpe_export / "tokenizer.json")
    blt, entropy, _ = load_parts(blt_export)

    @torch.no_grad()
    def bpe_nats(a: str, b: str) -> float:
        ia, ib = tok.encode(a).ids, tok.encode(b).ids  # tokenized apart: b's tokens are the same either way
        ids = torch.tensor([ia + ib])
        logits, _ = bpe(ids[:, :-1])
        return float(F.cross_entropy(logits[0, len(ia) - 1:], ids[0, len(ia):], reduction="sum"))

    @torch.no_grad()
    def blt_nats(a: str, b: str) -> float:
        ba, bb = list(a.encode()), list(b.encode())
        block = np.array([ba + bb])
        h = byte_entropies(entropy[0], entropy[1], block) if entropy is not None else None
        x = torch.from_numpy(block)
        logits, _ = blt(x[:, :-1], starts_of(blt.cfg, block, h))
        return float(F.cross_entropy(logits[0, len(ba) - 1:], x[0, len(ba):], reduction="sum"))

    pairs = halves(byte_dir)
    rng = np.random.default_rng(seed)
    noisy = [(perturb(a, NOISE_RATE, rng), b) for a, b in pairs]
    out = {"rate": NOISE_RATE, "blocks": len(pairs)}
    for name, fn in (("bpe", bpe_nats), ("blt", blt_nats)):
        clean, dirty = second_half_bpb(fn, pairs), second_half_bpb(fn, noisy)
        out.update({f"{name}_clean_bpb": clean, f"{name}_noisy_bpb": dirty, f"{name}_dbpb": dirty - clean})
    return out


# ---- the grid --------------------------------------------------------------------------------


def cached(path: Path, make: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    from neuraflex_ray.atomic import write_json_atomic

    write_json_atomic(path, result)
    return result


def run(corpus: str, out: Path, budgets: list[float], all_cells: bool) -> dict[str, Any]:
    from neuraflex_ray.config import ModelConfig, get_family, model_for_data
    from neuraflex_ray.models.blt import train_flops_per_block
    from neuraflex_ray.models.moe_lm import flops_per_token
    from neuraflex_ray.train.driver import ensure_ray

    cells_dir = out / "cells"
    base = bpe_config(corpus, out, QUICKSTART_STEPS)
    ensure_ray(base)
    manifest = get_family("moe_lm").build_data(base.data)
    fpt = flops_per_token(model_for_data(base.model, manifest), base.data.seq_len)
    per_step = base.train.micro_batch_size * base.train.num_workers * base.data.seq_len * fpt
    unit = QUICKSTART_STEPS * per_step  # the quickstart's training FLOPs
    probe = blt_config(corpus, out, "entropy", 4.0, 1, "probe")
    byte_manifest = get_family("blt").build_data(probe.data)  # trains the entropy model once, scores the bytes
    entropy_meta = json.loads((Path(byte_manifest["entropy_model"]) / "config.json").read_text())
    entropy_train = float(entropy_meta["train_flops"])
    entropy_cfg = ModelConfig(**entropy_meta["model"])
    entropy_infer = flops_per_token(entropy_cfg, probe.data.block_bytes) / 3
    log(f"{corpus}: budget unit {unit:.3e} FLOPs; entropy model {entropy_train:.3e} training FLOPs "
        f"({entropy_train / unit:.1%} of a unit)")
    result: dict[str, Any] = {"corpus": corpus, "budget_unit_flops": unit, "entropy_model": {
        "train_flops": entropy_train, "val_bpb": entropy_meta.get("val_bits_per_byte"),
        "infer_flops_per_byte": entropy_infer, "flavour": entropy_cfg.flavour}, "budgets": []}
    exports: dict[str, Path] = {}
    for b in budgets:
        tag = f"{b:g}x"
        steps = round(b * QUICKSTART_STEPS)
        bpe_cfg = bpe_config(corpus, out, steps, f"bpe-{tag}")
        row: dict[str, Any] = {"budget": b, "train_flops": b * unit, "blt": {}}
        row["bpe"] = cached(cells_dir / f"{tag}_bpe.json", lambda c=bpe_cfg: {
            **bpe_eval(run_cell(c), Path(c.data.output_dir)), "train_flops": c.train.max_steps * per_step,
            "steps": c.train.max_steps})
        exports[f"{tag}_bpe"] = bpe_cfg.run_dir / "export"
        names = list(CELLS) if (b == budgets[0] or all_cells) else list(MAIN_CELLS)
        for name in names:
            mode, patch = CELLS[name]
            probe = blt_config(corpus, out, mode, patch, 1, "probe")
            per_blt = probe.train.micro_batch_size * probe.train.num_workers * train_flops_per_block(
                probe.model, probe.data.block_bytes)
            spent = entropy_train if mode == "entropy" else 0.0
            blt_steps = max(1, int((b * unit - spent) // per_blt))
            cfg = blt_config(corpus, out, mode, patch, blt_steps, f"blt-{name}-{tag}")
            row["blt"][name] = cached(cells_dir / f"{tag}_{name}.json", lambda c=cfg, s=spent, p=per_blt: {
                **blt_eval(run_cell(c), Path(c.data.output_dir), entropy_infer),
                "train_flops": c.train.max_steps * p + s, "steps": c.train.max_steps})
            exports[f"{tag}_{name}"] = cfg.run_dir / "export"
            log(f"{tag} {name}: {row['blt'][name]['bpb']:.4f} bpb vs bpe {row['bpe']['bpb']:.4f}")
        if b == budgets[0]:  # a diagnostic beside the measure: static patching trained on as many bytes as entropy's
            steps = row["blt"]["entropy"]["steps"]
            cfg = blt_config(corpus, out, "static", 4.0, steps, f"blt-static-same-steps-{tag}")
            per_blt = cfg.train.micro_batch_size * cfg.train.num_workers * train_flops_per_block(cfg.model, cfg.data.block_bytes)
            row["blt"]["static_same_steps"] = cached(cells_dir / f"{tag}_static_same_steps.json", lambda c=cfg, p=per_blt: {
                **blt_eval(run_cell(c), Path(c.data.output_dir), entropy_infer), "train_flops": c.train.max_steps * p,
                "steps": c.train.max_steps})
        result["budgets"].append(row)
    first = f"{budgets[0]:g}x"
    result["noise"] = cached(cells_dir / f"{first}_noise.json", lambda: noise(
        exports[f"{first}_bpe"], exports[f"{first}_entropy"], out / "data" / "bytes"))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["stdlib", "kjv"], required=True)
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 2.0])
    p.add_argument("--all-cells", action="store_true", help="every cell at every budget (default: 6-byte cells at the first)")
    p.add_argument("--out", default="runs/bench-blt")
    args = p.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out).resolve() / args.corpus
    with contextlib.redirect_stdout(sys.stderr):  # training progress to stderr; stdout is the JSON
        result = run(args.corpus, out, args.budgets, args.all_cells)
    result["machine"] = {"cpus": __import__("os").cpu_count(), "platform": platform.platform()}
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
