"""NeuroFM's architecture and training options side by side: same data, budget and seed, one run.

    python benchmarks/neurofm_options.py [--config jobs/configs/neurofm_debug.yaml] [--variants ...] [key=value ...]

Each variant is the base config with a few overrides, trained on 2 Ray Train workers with FSDP2,
exported, then scored exactly as the quickstart scores it (neuraflex_ray/eval/): forecast skill
against persistence and a ridge autoregression, masked-channel R^2 zero-shot / adapted beside the
ridge, cross-modal retrieval top-1 / top-5 beside chance, and the frozen-embedding probes beside
classical features. Throughput (patches/s over the whole training run) is measured on the same
machine in the same process, one variant after another.

Prints one JSON object: {"config": ..., "variants": {name: {...}}}; extra overrides after the flags
apply to every variant (e.g. train.max_steps=50 for a short run).
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

from neuraflex_ray.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AUGMENT = ["data.augment.modality_dropout=0.25", "data.augment.noise_std=0.05", "data.augment.time_mask_prob=0.5",
           "data.augment.time_mask_s=0.5", "data.augment.time_warp=0.1"]
VARIANTS: dict[str, list[str]] = {
    "transformer": [],  # the base config: transformer backbone, unimodal -> multimodal curriculum, no augmentation
    "ssm": ["model.backbone=ssm"],
    "augment": AUGMENT,
    "curriculum_3stage": ["model.curriculum=[{start_step: 0, mode: unimodal}, {start_step: 100, mode: pairwise}, "
                          "{start_step: 200, mode: multimodal}]"],
    "latent_decoder": ["model.local_decoder=false"],  # the decoder before the local read, for reference
    # Issue 27's objectives against collapse, one switch each (models/neurofm_objectives.py)
    "variance": ["model.variance_weight=1.0"],  # VICReg's variance term on the fused embedding
    "vicreg": ["model.vicreg_weight=1.0", "model.vicreg_cov_weight=0.04"],  # on every modality's projection
    "spectral": ["model.spectral_weight=1.0"],  # the embedding predicts each modality's log band powers
    "hard_negatives": ["data.hard_negatives=4"],  # batches hold runs of one recording's windows 4-20 s apart
    "vicreg_spectral": ["model.vicreg_weight=1.0", "model.vicreg_cov_weight=0.04", "model.spectral_weight=1.0"],
}


def summarize(result: dict[str, Any], ev: dict[str, Any], probes: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The figures a reader compares across variants (the whole eval result stays in each run's summary)."""
    skill = {m: {str(row["horizon_s"]): row["per_modality"][m]["skill_vs_persistence"] for row in ev["forecast"]}
             for m in ev["forecast"][0]["per_modality"]}
    worst = min((v, m, h) for m, hs in skill.items() for h, v in hs.items() if v is not None)
    r2 = ev["masked_channel_r2"]
    return {
        "patches_per_s": result["patches_per_s"], "mfu": result["mfu"], "steps": result["steps"],
        "val_loss": result["val_loss"], "wall_s": wall_s,
        "masked_channel_r2": {k: r2.get(k) for k in ("zero_shot", "adapted", "ridge")},
        "retrieval_top1": {k: ev["retrieval_top1"].get(k) for k in ("model", "chance", "p_value")},
        "retrieval_top5": {k: ev["retrieval_top5"].get(k) for k in ("model", "chance", "p_value")},
        "retrieval_by_session": {name: {k: {f: r[k].get(f) for f in ("model", "chance", "p_value")} for k in ("top1", "top5")}
                                 | {"n": r["top1"]["pairs"][0]["n"]} for name, r in ev.get("retrieval_by_session", {}).items()},
        # collapse, at the last evaluation of training (held-out windows): fused and per modality
        "embedding": {k.removeprefix("val_"): v for k, v in result.items()
                      if k.startswith(("val_spread", "val_effective_rank"))},
        "forecast_pooled": {str(row["horizon_s"]): {"skill_vs_persistence": row["skill_vs_persistence"],
                                                    "skill_vs_ridge": row["skill_vs_ridge"]} for row in ev["forecast"]},
        "forecast_skill_vs_persistence": skill,
        "forecast_worst": {"skill_vs_persistence": worst[0], "modality": worst[1], "horizon_s": float(worst[2])},
        "probes": {t: {k: p.get(k) for k in ("model", "baseline", "diff", "ci_low", "ci_high")} for t, p in probes.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "neurofm_debug.yaml"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output-dir", default="runs/bench-neurofm")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = p.parse_args()

    from neuraflex_ray.eval.neuro import evaluate_neurofm_export
    from neuraflex_ray.eval.probe import probe
    from neuraflex_ray.train.driver import ensure_ray
    from neuraflex_ray.workflows import train_and_export

    out: dict[str, Any] = {"config": {"base": args.config, "overrides": args.overrides, "machine": platform.platform(),
                                      "processor": platform.processor() or platform.machine()}, "variants": {}}
    for name in args.variants:
        cfg = load_config(args.config, [*args.overrides, *VARIANTS[name], f"name=options-{name}",
                                        f"output_dir={args.output_dir}"])
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # progress and console lines; stdout stays pure JSON
            ensure_ray(cfg)
            result, _, export_dir = train_and_export(cfg)
            ev = evaluate_neurofm_export(export_dir, cfg.data.output_dir, seed=cfg.train.seed)
            probes = probe(export_dir, cache_dir=cfg.data.cache_dir)
        out["variants"][name] = {"overrides": VARIANTS[name], **summarize(result, ev, probes, time.perf_counter() - t0)}
        print(f"[bench] {name}: {json.dumps(out['variants'][name])}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
