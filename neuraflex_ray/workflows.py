"""The stages after training, each usable alone (CLI) or chained (quickstart), for any model family.

export:     a sharded checkpoint (DeepSpeed or FSDP2/DCP) -> a consolidated export, the way the
            checkpoint's family exports (`Family.export`, through `checkpoint.export_checkpoint`)
evaluate:   an export on held-out data beside baselines fitted on the training split only
            (`Family.evaluate`: eval/lm.py for the LM, eval/neuro.py for NeuroFM)
quickstart: data -> train (Ray Train) -> export -> the family's stages after training
            (`Family.after_training`: the LM evaluates, generates and answers one request on Ray
            Serve; NeuroFM evaluates and probes) -> summary.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from neuraflex_ray.atomic import write_json_atomic
from neuraflex_ray.checkpoint import export_checkpoint, export_family
from neuraflex_ray.config import JobConfig, get_family

__all__ = ["evaluate_export", "export_checkpoint", "quickstart", "train_and_export"]


def evaluate_export(export_dir: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """The export's family evaluates it on the held-out part of `data_dir`."""
    return export_family(export_dir).evaluate(Path(export_dir), Path(data_dir))


def train_and_export(cfg: JobConfig) -> tuple[dict[str, Any], Path, Path]:
    """Distributed training from scratch, then the consolidated export of its last checkpoint."""
    from neuraflex_ray.train.driver import train

    result = train(cfg, fresh=True)
    run_dir = Path(result["run_dir"])
    export_dir = export_checkpoint(result["checkpoint"], cfg.data.output_dir, run_dir / "export",
                                   {"run_dir": str(run_dir), "steps": result["steps"]})
    print(f"[export] consolidated checkpoint -> {export_dir}", flush=True)
    return result, run_dir, export_dir


def quickstart(cfg: JobConfig) -> dict[str, Any]:
    """data -> train -> export -> the family's stages after training -> <run dir>/summary.json"""
    t0 = time.perf_counter()
    family = get_family(cfg.model_type)
    result, run_dir, export_dir = train_and_export(cfg)
    summary = family.after_training(cfg, result, export_dir)
    summary.setdefault("train", {k: v for k, v in result.items() if v is None or isinstance(v, (int, float, str))})
    summary["wall_s"] = time.perf_counter() - t0
    summary["train"]["mfu_note"] = ("MFU = achieved model FLOP/s per worker / fp32 matmul FLOP/s measured on the same "
                                    "worker in the same run (best of 5 bursts, matrices shaped like the model's); "
                                    f"{family.flops_convention}")
    write_json_atomic(run_dir / "summary.json", summary)
    print(f"[quickstart] summary -> {run_dir / 'summary.json'}", flush=True)
    return summary
