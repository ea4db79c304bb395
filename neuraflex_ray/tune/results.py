"""A finished sweep's results: the table (results.csv / .parquet), best.yaml, the TensorBoard hparams
view and summary.json, from Tune's result grid (`run.py` runs the sweep).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from neuraflex_ray.atomic import write_json_atomic
from neuraflex_ray.config import config_from_raw
from neuraflex_ray.tune.config import Sweep
from neuraflex_ray.tune.trial import POINTER, error_line


def _train_checkpoint(result: Any) -> str | None:
    """The trial's latest checkpoint: Tune's copy of the Train checkpoint (older sweeps: the pointer's target)."""
    if result.checkpoint is None:
        return None
    pointer = Path(result.checkpoint.path) / POINTER
    return json.loads(pointer.read_text())["path"] if pointer.is_file() else result.checkpoint.path


def results_table(sweep: Sweep, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: its searched values, metrics, status and the compute it used."""
    c, t = sweep.cfg, sweep.base.train
    better = min if c.mode == "min" else max
    from ray.tune import ExperimentAnalysis

    from neuraflex_ray.train.task import reported_metrics

    # A trial restored from disk by --resume may come back without its config: take it from the state.
    configs = {t.trial_id: t.config for t in ExperimentAnalysis(str(sweep.dir / "tune")).trials}
    reported = [k for k in reported_metrics(sweep.base.model_type) if k.startswith("val_")]
    rows = []
    for r in grid:
        m = r.metrics or {}
        config = r.config or configs.get(Path(r.path).name, {})
        hist = r.metrics_dataframe
        values = [] if hist is None or c.metric not in hist else [v for v in hist[c.metric].tolist() if math.isfinite(v)]
        step = int(m.get("step", 0) or 0)
        status = "failed" if r.error else ("completed" if step >= t.max_steps else "stopped_early")
        seconds = float(m.get("time_total_s", 0.0) or 0.0)
        row = {
            "trial_id": Path(r.path).name,
            "status": status,
            **{f"config/{k}": config.get(k) for k in c.space},
            c.metric: m.get(c.metric, math.nan),
            f"best_{c.metric}": better(values) if values else math.nan,
            **{k: m.get(k, math.nan) for k in reported if k != c.metric},  # every val_* the family reports
            "train_loss": m.get("train_loss", math.nan),
            "steps": step,
            "reports": int(m.get("training_iteration", 0) or 0),
            "time_s": seconds,
            "cpu_s": seconds * t.num_workers * t.cpus_per_worker,
            "gpu_s": seconds * t.num_workers if t.use_gpu else 0.0,
            "checkpoint": _train_checkpoint(r) if not r.error else None,
            "error": error_line(r.error) if r.error else "",
        }
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])


def _best(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] != "failed" and math.isfinite(r[sweep.cfg.metric])]
    if not ok:
        return None
    sign = 1 if sweep.cfg.mode == "min" else -1
    # Finished trials first: a stopped trial's metric was measured earlier in training.
    return min(ok, key=lambda r: (r["status"] != "completed", sign * r[sweep.cfg.metric]))


def write_best_yaml(sweep: Sweep, best: dict[str, Any], path: Path) -> None:
    """The best trial's whole training config, ready for `neuraflex-ray train --config best.yaml`."""
    params = {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")}
    cfg = config_from_raw(sweep.trial_raw(params))
    cfg = dataclasses.replace(cfg, name=f"{sweep.cfg.name}-best", train=dataclasses.replace(cfg.train, resume_from=""))
    header = (f"# Best trial {best['trial_id']} of sweep {sweep.cfg.name}: {sweep.cfg.metric}={best[sweep.cfg.metric]:.6g} "
              f"({best['status']}, {best['steps']} steps)\n"
              f"# Its checkpoint: {best['checkpoint']}\n"
              f"# Searched: {json.dumps(params)}\n"
              f"# Train it: neuraflex-ray train --config {path}\n")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def _write_hparams(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """TensorBoard's HPARAMS tab: each trial's searched values beside its metric."""
    from torch.utils.tensorboard import SummaryWriter

    for r in rows:
        hp = {k.removeprefix("config/"): v for k, v in r.items() if k.startswith("config/") and v is not None}
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hp.items()}
        # Its own directory under the trial's, so the trial's training curves stay as they were.
        with SummaryWriter(log_dir=str(sweep.dir / "tensorboard" / r["trial_id"] / "hparams")) as w:
            w.add_hparams(hp, {f"hparam/{sweep.cfg.metric}": r[sweep.cfg.metric], "hparam/steps": r["steps"]},
                          run_name=".")


def summarize(sweep: Sweep, grid: Any) -> dict[str, Any]:
    import pandas as pd

    c = sweep.cfg
    rows = results_table(sweep, grid)
    table = pd.DataFrame(rows)
    table.to_csv(sweep.dir / "results.csv", index=False)
    table.to_parquet(sweep.dir / "results.parquet", index=False)
    _write_hparams(sweep, rows)
    best = _best(sweep, rows)
    if best is not None:
        write_best_yaml(sweep, best, sweep.dir / "best.yaml")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "failed")}
    summary = {
        "sweep": c.name, "dir": str(sweep.dir), "trials": len(rows), **counts,
        "steps": sum(r["steps"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows),
        "metric": c.metric, "mode": c.mode,
        "best": None if best is None else {
            "trial_id": best["trial_id"], c.metric: best[c.metric], "status": best["status"], "steps": best["steps"],
            "config": {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")},
            "checkpoint": best["checkpoint"], "best_yaml": str(sweep.dir / "best.yaml")},
        "results": [str(sweep.dir / "results.csv"), str(sweep.dir / "results.parquet")],
        "tensorboard": str(sweep.dir / "tensorboard"), "optuna_storage": sweep.storage_url, "optuna_study": c.name,
    }
    write_json_atomic(sweep.dir / "summary.json", summary)
    _print_summary(sweep, rows, best)
    return summary


def _print_summary(sweep: Sweep, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    metric = sweep.cfg.metric
    keys = list(sweep.cfg.space)
    print(f"[tune] {len(rows)} trials: " + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                                                     for s in ("completed", "stopped_early", "failed")), flush=True)
    for r in sorted(rows, key=lambda r: (r["status"] == "failed", r[metric] if math.isfinite(r[metric]) else math.inf)):
        values = " ".join(f"{k}={r[f'config/{k}']:.4g}" if isinstance(r[f"config/{k}"], float) else f"{k}={r[f'config/{k}']}"
                          for k in keys)
        tail = r["error"] if r["status"] == "failed" else f"{metric} {r[metric]:.4f}"
        print(f"[tune]   {r['trial_id']} {r['status']:<13} steps {r['steps']:>5} | {tail} | {values}", flush=True)
    if best is not None:
        print(f"[tune] best {best['trial_id']}: {metric} {best[metric]:.4f} -> {sweep.dir / 'best.yaml'} "
              f"(checkpoint {best['checkpoint']})", flush=True)
