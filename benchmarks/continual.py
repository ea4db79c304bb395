"""How much does fine-tuning forget? Full fine-tuning against LoRA, EWC and both, on one new corpus.

    python benchmarks/continual.py [--base runs/quickstart/export] [--config jobs/configs/finetune_kjv.yaml]
                                   [--variants full lora ewc lora_ewc] [--ewc-lambda X] [key=value ...]

The base export (by default the quickstart's code model) is fine-tuned on the new corpus of the
config (by default the King James Bible) once per variant, with the same data, seed, steps and
learning rate, on Ray Train (2 workers, DeepSpeed, expert parallel), through `neuraflex-ray finetune`:

    full      every weight trains
    lora      adapters on attention, dense and expert weights; the base is frozen
    ewc       every weight trains, plus the EWC penalty toward the base (Fisher on the base's data)
    lora_ewc  adapters plus the EWC penalty on their updates

Each result is scored in one process on two held-out sets: the base's own validation split (old) and
the new corpus's (new), in bits per byte. Forgetting is the rise in old bits/byte over the base's.

Prints one JSON object: {"base": {"old_bpb", "new_bpb"}, "full": {"old_bpb", "new_bpb"}, "lora": {...,
"trainable_fraction", "adapter_bytes_ratio"}, "ewc": {...}, "lora_ewc": {...}}. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": ["finetune.method=full", "finetune.ewc_lambda=0"],
    "lora": ["finetune.method=lora", "finetune.ewc_lambda=0"],
    "ewc": ["finetune.method=full"],
    "lora_ewc": ["finetune.method=lora"],
}


def bpb(model: Any, data_dir: str) -> float:
    from neuraflex_ray.eval.lm import bits_per_byte, heldout_loss
    from pipelines.text import load_text_datasets, read_blocks

    _, val_ds, manifest = load_text_datasets(data_dir)
    return bits_per_byte(heldout_loss(model, read_blocks(val_ds)), manifest["val_bytes_per_token"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/quickstart/export")
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "finetune_kjv.yaml"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--ewc-lambda", type=float, default=500.0, help="finetune.ewc_lambda of the ewc variants")
    p.add_argument("--lora-lr", type=float, default=0.0,
                   help="train.lr of the LoRA variants (0: the config's, as the others); adapters usually want more")
    p.add_argument("--output-dir", default="runs/bench-continual")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = p.parse_args()
    base = Path(args.base).resolve()
    if not (base / "model.safetensors").is_file():
        sys.exit(f"--base {base}: no export there; run `make quickstart` first (it writes runs/quickstart/export)")

    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.config import load_config
    from neuraflex_ray.finetune.run import finetune, merge_adapter
    from neuraflex_ray.train.driver import ensure_ray

    old_data = json.loads((base / "config.json").read_text())["data"]["output_dir"]
    common = [f"output_dir={Path(args.output_dir).resolve()}", f"finetune.from_export={base}", *args.overrides]
    cfg = load_config(args.config, common)
    with contextlib.redirect_stdout(sys.stderr):  # Ray's and the console's start-up lines; stdout is the JSON
        ensure_ray(cfg)
    new_data = str(Path(cfg.data.output_dir).resolve())
    results: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):  # training progress to stderr; stdout is the JSON
        from neuraflex_ray.finetune.setup import finetune_config
        from pipelines.text import build_text_dataset

        build_text_dataset(finetune_config(cfg).data)  # with the base's tokenizer
        model, _ = load_exported(base)
        results["base"] = {"old_bpb": bpb(model, old_data), "new_bpb": bpb(model, new_data)}
        print(f"[continual] base: {results['base']}", flush=True)
        for name in args.variants:
            overrides = [*common, f"name=continual-{name}", *VARIANTS[name]]
            if name.endswith("ewc"):
                overrides.append(f"finetune.ewc_lambda={args.ewc_lambda}")
            if name.startswith("lora") and args.lora_lr:
                overrides.append(f"train.lr={args.lora_lr}")
            t0 = time.perf_counter()
            out = finetune(load_config(args.config, overrides), fresh=True)
            row: dict[str, Any] = {"seconds": time.perf_counter() - t0, "steps": out["steps"]}
            if "adapter" in out:
                adapter = Path(out["adapter"])
                meta = json.loads((adapter / "adapter.json").read_text())
                merged = merge_adapter(base, adapter, adapter.parent / "merged")
                model, _ = load_exported(merged)
                row["trainable_fraction"] = meta["adapter_params"] / meta["base_params"]
                row["adapter_bytes_ratio"] = ((adapter / "adapter.safetensors").stat().st_size
                                              / (base / "model.safetensors").stat().st_size)
            else:
                model, _ = load_exported(out["export"])
            row.update(old_bpb=bpb(model, old_data), new_bpb=bpb(model, new_data))
            row["forgetting"] = row["old_bpb"] - results["base"]["old_bpb"]
            results[name] = row
            print(f"[continual] {name}: {row}", flush=True)
    if "full" in results:
        for name in ("lora", "ewc", "lora_ewc"):
            if name in results:
                r = results[name]
                r["forgetting_vs_full"] = r["forgetting"] / results["full"]["forgetting"]
                r["new_bpb_vs_full"] = r["new_bpb"] - results["full"]["new_bpb"]
    results["config"] = {"base": str(base), "config": args.config, "ewc_lambda": args.ewc_lambda, "lora_lr": args.lora_lr,
                         "overrides": args.overrides, "old_data": old_data, "new_data": new_data,
                         "machine": platform.platform()}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
