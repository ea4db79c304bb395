"""OptunaSearch + ASHA against random search without early stopping, same trial budget, one run.

    python benchmarks/tune_efficiency.py [--trials 8 --max-steps 120 --seeds 0 1 2]

Both sweeps start from jobs/configs/tune_moe_debug.yaml (the debug NeuralFlex-MoE, its search space,
1 worker per trial, 2 trials at a time) with the same number of trials and the same steps per trial:

- optuna_asha: TPE (seeded) + ASHA on held-out loss, as the sweep YAML sets it
- random:      Optuna's random sampler (same seed, same space), every trial trained to the end

Both run once per seed. Prints one JSON object: per method the *median over seeds* of the best held-out
loss reached (over every evaluation of every trial) and of the training steps spent (summed over trials,
up to each trial's last evaluation), the median of the per-seed steps ratios and loss deltas, and each
seed's own figures under "seeds". Steps are counted, not timed, so the comparison does not depend on
the machine; one seed can land on either side of a bound, so the claim rests on the median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.tune import load_sweep, run_sweep  # noqa: E402

SWEEP = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tune_moe_debug.yaml"


def run(name: str, args: argparse.Namespace, *overrides: str) -> dict:
    sweep = load_sweep(SWEEP, [f"name={name}", "output_dir=runs/bench", f"num_trials={args.trials}",
                               f"seed={args.seed}", f"overrides.train.max_steps={args.max_steps}",
                               f"overrides.train.eval_every={args.eval_every}",
                               f"overrides.train.checkpoint_every={args.max_steps}", *overrides])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's and the trials' progress; stdout stays pure JSON
        summary = run_sweep(sweep, fresh=True)
    wall = time.perf_counter() - t0
    import pandas as pd

    table = pd.read_parquet(Path(summary["dir"]) / "results.parquet")
    best = [v for v in table["best_val_loss"] if math.isfinite(v)]
    return {
        "best_loss": min(best) if best else math.nan,
        "steps": int(table["steps"].sum()),
        "trials": len(table),
        "completed": int((table.status == "completed").sum()),
        "stopped_early": int((table.status == "stopped_early").sum()),
        "failed": int((table.status == "failed").sum()),
        "best_config": summary["best"]["config"] if summary["best"] else None,
        "wall_s": wall,
    }


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    out = {
        "optuna_asha": run(f"bench-optuna-asha-s{seed}", args, "search.algorithm=optuna", "scheduler.type=asha",
                           f"scheduler.grace_period={args.eval_every}"),
        "random": run(f"bench-random-s{seed}", args, "search.algorithm=random", "scheduler.type=fifo"),
    }
    a, r = out["optuna_asha"], out["random"]
    out["steps_ratio"] = a["steps"] / r["steps"] if r["steps"] else math.nan
    out["best_loss_delta"] = a["best_loss"] - r["best_loss"]  # < 0: optuna_asha found a better config
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    seeds = {str(seed): one_seed(args, seed) for seed in args.seeds}
    med = statistics.median
    result = {method: {"best_loss": med(s[method]["best_loss"] for s in seeds.values()),
                       "steps": med(s[method]["steps"] for s in seeds.values())}
              for method in ("optuna_asha", "random")}
    result["steps_ratio"] = med(s["steps_ratio"] for s in seeds.values())
    result["best_loss_delta"] = med(s["best_loss_delta"] for s in seeds.values())
    result["seeds"] = seeds
    result["config"] = {"sweep": str(SWEEP.relative_to(SWEEP.parents[2])), "trials": args.trials,
                        "max_steps": args.max_steps, "eval_every": args.eval_every, "seeds": args.seeds,
                        "machine": f"{platform.machine()}, {platform.system()}"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
