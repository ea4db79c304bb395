"""Held-out evaluation of NeuroFM: every model number stands next to a baseline fitted on TRAINING windows only.

Three questions, each answered on the val windows (the late part of every recording):

1. Forecasting (`forecast.py`): skill against persistence and a ridge autoregression, per modality and horizon.
2. Masked-channel reconstruction (`spatial.py`): R^2 of a hidden EEG channel against a ridge from the other channels.
3. Cross-modal retrieval (`retrieval.py`): top-1 / top-5 of the matching window through another modality, against chance.

Inputs: `train`/`val` map modality -> SeriesArrays-like objects (see `common.py`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from neuraflex_ray.eval.common import n_windows, plain, subset
from neuraflex_ray.eval.forecast import forecast_table
from neuraflex_ray.eval.retrieval import retrieval
from neuraflex_ray.eval.spatial import masked_channel


def evaluate_neurofm(model: torch.nn.Module, train: dict[str, Any], val: dict[str, Any], manifest: dict, *,
                     batch_size: int = 16, max_windows: int | None = 512, max_train_windows: int | None = 4096,
                     lag_patches: int = 4, eeg_modality: str = "eeg", channel_every: int = 8) -> dict[str, Any]:
    """Score `model` on the val windows against baselines fitted on the train windows only.

    max_windows / max_train_windows cap the val windows scored and the train windows the baselines see
    (evenly spread over the ordered windows; None = all). Forecast MSEs pool modalities by weighting every
    predicted sample value equally (sum of squared errors / number of values over all present modalities'
    valid channels), so many-channel, high-rate modalities weigh more; `per_modality` in each forecast row
    gives each modality on its own. The model runs in eval mode under torch.no_grad, batch_size windows at a time.

    Returns {"forecast": [{horizon_s, mse, mse_persistence, mse_ridge, skill_vs_persistence, skill_vs_ridge,
    horizon_patches, n_values, per_modality}, ...], "masked_channel_r2": {model, ridge, ...},
    "retrieval_top1": {model, chance, pairs, ...}, ...}; a piece the data cannot support has None values and a `reason`.
    """
    if not val:
        raise ValueError("val holds no modality")
    idx_val = subset(n_windows(val), max_windows)
    idx_train = subset(n_windows(train), max_train_windows) if train else np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = {
                "forecast": forecast_table(model, train, val, manifest, idx_val, idx_train, batch_size, lag_patches),
                "masked_channel_r2": masked_channel(model, train, val, manifest, idx_val, idx_train, batch_size,
                                                     eeg_modality, channel_every),
                "retrieval_top1": retrieval(model, val, manifest, idx_val, batch_size),
            }
    finally:
        model.train(was_training)
    result.update(n_val_windows=len(idx_val), n_train_windows=len(idx_train), lag_patches=lag_patches,
                  forecast_pooling="every predicted value weighs the same across modalities")
    return plain(result)


def _fmt(v: float | None, width: int = 11, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a".rjust(width)
    return f"{v:{width}.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A readable table of evaluate_neurofm's result."""
    lines = [f"NeuroFM held-out evaluation: {result.get('n_val_windows', '?')} val windows; "
             f"baselines fitted on {result.get('n_train_windows', '?')} train windows only",
             "Forecast MSE (pooled: every predicted value weighs the same; skill = 1 - mse/mse_baseline, > 0 beats it)",
             f"{'horizon_s':>10} {'modality':>9} {'model':>11} {'persistence':>11} {'ridge_AR':>11} "
             f"{'skill_pers':>11} {'skill_ridge':>11}"]
    for row in result["forecast"]:
        entries = [("all", row)] + list(row.get("per_modality", {}).items())
        for name, e in entries:
            lines.append(f"{row['horizon_s']:>10.3g} {name:>9} {_fmt(e['mse'])} {_fmt(e['mse_persistence'])} "
                         f"{_fmt(e['mse_ridge'])} {_fmt(e['skill_vs_persistence'], digits=3)} "
                         f"{_fmt(e['skill_vs_ridge'], digits=3)}")
        if row.get("reason"):
            lines.append(f"{'':>10} ({row['reason']})")
    r2 = result["masked_channel_r2"]
    if r2["model"] is None:
        lines.append(f"Masked-channel R^2: n/a ({r2.get('reason', '')})")
    else:
        lines.append(f"Masked-channel R^2 ({r2['modality']}, {len(r2['channels'])} channels, {r2['n_windows']} windows): "
                     f"model {r2['model']:.4f}   ridge from other channels {r2['ridge']:.4f}")
    rt = result["retrieval_top1"]
    if rt["model"] is None:
        lines.append(f"Cross-modal retrieval top-1: n/a ({rt.get('reason', '')})")
    else:
        lines.append(f"Cross-modal retrieval top-1 ({len(rt['pairs'])} pairs): model {rt['model']:.4f}   "
                     f"chance {rt['chance']:.4f}")
        for p in rt["pairs"]:
            lines.append(f"    {p['a']}<->{p['b']} (n={p['n']}): model {p['model']:.4f}   chance {p['chance']:.4f}")
    return "\n".join(lines)
