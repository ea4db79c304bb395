"""Training throughput of the two debug configs: MFU per progress interval and over the run, data wait.

    python benchmarks/train_throughput.py [--models moe neurofm] [--moe-steps 400] [--neurofm-steps 300]

Each model trains its debug config (`jobs/configs/moe_debug.yaml`: DeepSpeed ZeRO-2, ep_size 2;
`jobs/configs/neurofm_debug.yaml`: FSDP2) on 2 Ray Train workers, from scratch, one after the other
on this machine. From the run:

- `mfu_interval_median`: the median MFU of its progress intervals (every `train.log_every` steps);
- `mfu_run`: model FLOPs over the whole run's training time (evaluation and checkpoints excluded);
- `data_wait_frac`: the share of training time the slowest rank waited for its next batch, epoch
  boundaries included (the NeuroFM run crosses two);
- `tokens_per_s` (NeuroFM's tokens are its patches, so its block repeats it as `patches_per_s`), and
  the peak FLOP/s MFU is measured against.

Prints one JSON object: {"moe": {"mfu_interval_median", "mfu_run", "data_wait_frac", "tokens_per_s", ...},
"neurofm": {...}}. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"moe": "moe_debug.yaml", "neurofm": "neurofm_debug.yaml"}


def run(model: str, steps: int, output_dir: str, extra: list[str]) -> dict[str, Any]:
    from neuraflex_ray.config import load_config
    from neuraflex_ray.train.driver import ensure_ray, train

    cfg = load_config(REPO / "jobs" / "configs" / CONFIGS[model],
                      [f"name=throughput-{model}", f"output_dir={output_dir}", f"train.max_steps={steps}", *extra])
    ensure_ray(cfg)
    out = train(cfg, fresh=True)
    unit = "tokens_per_s" if model == "moe" else "patches_per_s"
    mfus = [h["mfu"] for h in out["history"]]
    # The shape names tokens_per_s for both models: NeuroFM's tokens are its patches.
    return {"mfu_interval_median": statistics.median(mfus), "mfu_run": out["mfu"],
            "data_wait_frac": out["data_wait_frac"], "tokens_per_s": out[unit], unit: out[unit], "steps": out["steps"],
            "intervals": len(mfus), "mfu_interval_min": min(mfus), "mfu_interval_max": max(mfus),
            "data_wait_interval_max": max(h["data_wait"] for h in out["history"]),
            "peak_flops_per_worker": out["peak_flops_per_worker"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--moe-steps", type=int, default=400)
    p.add_argument("--neurofm-steps", type=int, default=300)
    p.add_argument("--output-dir", default="runs/bench-throughput")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    args = p.parse_args()
    results: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):  # training progress to stderr; stdout is the JSON
        for model in args.models:
            steps = args.moe_steps if model == "moe" else args.neurofm_steps
            results[model] = run(model, steps, str(Path(args.output_dir).resolve()), args.overrides)
            print(f"[throughput] {model}: {results[model]}", flush=True)
    results["machine"] = {"platform": platform.platform(), "workers": 2}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
