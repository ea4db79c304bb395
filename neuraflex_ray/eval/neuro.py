"""Held-out evaluation of NeuroFM: every model number stands next to a baseline fitted on TRAINING windows only.

Three questions, each answered on the val windows (the late part of every recording):

1. Forecasting (`forecast.py`): skill against persistence and a ridge autoregression, per modality and horizon.
2. Masked-channel reconstruction (`spatial.py`): R^2 of a hidden EEG channel against a ridge from the other
   channels, zero-shot and after a short adaptation on the train windows (`adapt.py`).
3. Cross-modal retrieval (`retrieval.py`): top-1 / top-5 of the matching window through another modality, against
   chance, with a permutation test's p-value.

Inputs: `train`/`val` map modality -> SeriesArrays-like objects (see `common.py`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from neuraflex_ray.eval.adapt import adapt_masked_channel
from neuraflex_ray.eval.collapse import embedding_collapse
from neuraflex_ray.eval.common import n_windows, plain, subset
from neuraflex_ray.eval.forecast import forecast_table
from neuraflex_ray.eval.retrieval import retrieval
from neuraflex_ray.eval.spatial import MIN_MONTAGE_CHANNELS, masked_channel


def evaluate_neurofm(model: torch.nn.Module, train: dict[str, Any], val: dict[str, Any], manifest: dict, *,
                     batch_size: int = 16, max_windows: int | None = 512, max_train_windows: int | None = 4096,
                     lag_patches: int = 4, eeg_modality: str = "eeg", channel_every: int = 8,
                     adapt_steps: int = 300, seed: int = 0, val_recordings: np.ndarray | None = None) -> dict[str, Any]:
    """Score `model` on the val windows against baselines fitted on the train windows only.

    max_windows / max_train_windows cap the val windows scored and the train windows the baselines see
    (evenly spread over the ordered windows; None = all). Forecast MSEs pool modalities by weighting every
    predicted sample value equally (sum of squared errors / number of values over all present modalities'
    valid channels), so many-channel, high-rate modalities weigh more; `per_modality` in each forecast row
    gives each modality on its own. The model runs in eval mode under torch.no_grad, batch_size windows at a time.
    Masked-channel reconstruction scores the model as it is (`zero_shot`) and, when adapt_steps > 0, a copy
    adapted on the train windows the ridge is fitted on (`adapted`, see adapt.py).

    Returns {"forecast": [{horizon_s, mse, mse_persistence, mse_ridge, skill_vs_persistence, skill_vs_ridge,
    horizon_patches, n_values, per_modality}, ...], "masked_channel_r2": {zero_shot, adapted, ridge, ...},
    "retrieval_top1": {model, chance, p_value, pairs, ...}, "retrieval_top5": {...}, "embedding": {width, fused:
    {spread, effective_rank}, spread: {m}, effective_rank: {m}} (eval/collapse.py), ...}; a piece the data cannot
    support has None values and a `reason`.
    """
    if not val:
        raise ValueError("val holds no modality")
    idx_val = subset(n_windows(val), max_windows)
    idx_train = subset(n_windows(train), max_train_windows) if train else np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        models = {"zero_shot": model}
        adaptation: dict[str, Any] = {"reason": "adapt_steps=0"}
        if adapt_steps > 0 and train:
            adapted, adaptation = adapt_masked_channel(model, train, manifest, eeg_modality, idx_train,
                                                       min_channels=MIN_MONTAGE_CHANNELS, steps=adapt_steps, seed=seed)
            if adapted is not None:
                models["adapted"] = adapted
        with torch.no_grad():
            top = retrieval(model, val, manifest, idx_val, batch_size, ks=(1, 5))
            result = {
                "forecast": forecast_table(model, train, val, manifest, idx_val, idx_train, batch_size, lag_patches),
                "masked_channel_r2": {**masked_channel(models, train, val, manifest, idx_val, idx_train, batch_size,
                                                       eeg_modality, channel_every), "adaptation": adaptation},
                "retrieval_top1": top[1],
                "retrieval_top5": top[5],
                "embedding": embedding_collapse(model, val, manifest, idx_val, batch_size),
            }
            if val_recordings is not None:
                result["retrieval_by_session"] = retrieval_by_session(model, val, manifest, val_recordings, batch_size)
    finally:
        model.train(was_training)
    result["masked_channel_r2"].setdefault("adapted", None)
    result.update(n_val_windows=len(idx_val), n_train_windows=len(idx_train), lag_patches=lag_patches,
                  forecast_pooling="every predicted value weighs the same across modalities")
    return plain(result)


def _fmt(v: float | None, width: int = 11, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a".rjust(width)
    return f"{v:{width}.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A readable table of evaluate_neurofm's result: forecast skill per modality first (what a user
    compares with doing nothing), the pooled row after, then reconstruction and retrieval."""
    lines = [f"NeuroFM held-out evaluation: {result.get('n_val_windows', '?')} val windows; "
             f"baselines fitted on {result.get('n_train_windows', '?')} train windows only",
             "Forecast per modality (skill = 1 - mse/mse_baseline: > 0 beats the baseline)",
             f"{'modality':>9} {'horizon_s':>10} {'model':>11} {'persistence':>11} {'ridge_AR':>11} "
             f"{'skill_pers':>11} {'skill_ridge':>11}"]
    rows = result["forecast"]
    mods = list(dict.fromkeys(m for row in rows for m in row.get("per_modality", {})))
    for name in [*mods, "all"]:
        for row in rows:
            e = row if name == "all" else row.get("per_modality", {}).get(name)
            if e is None:
                continue
            lines.append(f"{name:>9} {row['horizon_s']:>10.3g} {_fmt(e['mse'])} {_fmt(e['mse_persistence'])} "
                         f"{_fmt(e['mse_ridge'])} {_fmt(e['skill_vs_persistence'], digits=3)} "
                         f"{_fmt(e['skill_vs_ridge'], digits=3)}")
    lines += [f"{'':>9} ({row['reason']})" for row in rows if row.get("reason")]
    lines.append("  ('all' pools every predicted value, so many-channel, fast modalities weigh most)")
    r2 = result["masked_channel_r2"]
    if r2.get("ridge") is None:
        lines.append(f"Masked-channel R^2: n/a ({r2.get('reason', '')})")
    else:
        lines.append(f"Masked-channel R^2 ({r2['modality']}, {len(r2['channels'])} channels, {r2['n_windows']} windows): "
                     f"zero-shot {_fmt(r2['zero_shot'], 0)}   adapted {_fmt(r2.get('adapted'), 0)}   "
                     f"ridge from other channels {_fmt(r2['ridge'], 0)}")
    top1, top5 = result["retrieval_top1"], result.get("retrieval_top5", {})
    if top1["model"] is None:
        lines.append(f"Cross-modal retrieval: n/a ({top1.get('reason', '')})")
    else:
        lines.append(f"Cross-modal retrieval ({len(top1['pairs'])} pairs): top-1 {top1['model']:.4f} (chance "
                     f"{top1['chance']:.4f}, permutation p {_fmt(top1.get('p_value'), 0)})   top-5 "
                     f"{_fmt(top5.get('model'), 0)} (chance {_fmt(top5.get('chance'), 0)})")
        for p1, p5 in zip(top1["pairs"], top5.get("pairs", [{}] * len(top1["pairs"])), strict=True):
            lines.append(f"    {p1['a']}<->{p1['b']} (n={p1['n']}): top-1 {p1['model']:.4f} (chance {p1['chance']:.4f})"
                         f"   top-5 {_fmt(p5.get('model'), 0)} (chance {_fmt(p5.get('chance'), 0)})")
    for name, r in result.get("retrieval_by_session", {}).items():
        pairs = ", ".join(f"{p['a']}<->{p['b']}" for p in r["top1"]["pairs"])
        lines.append(f"    within {name} ({pairs}; n={r['top1']['pairs'][0]['n']}): top-1 {r['top1']['model']:.4f} "
                     f"(chance {r['top1']['chance']:.4f}, p {_fmt(r['top1'].get('p_value'), 0)})   top-5 "
                     f"{r['top5']['model']:.4f} (chance {r['top5']['chance']:.4f})")
    emb = result.get("embedding")
    if emb:
        per = "   ".join(f"{m} {emb['spread'][m]:.3f} / {emb['effective_rank'][m]:.1f}" for m in emb["spread"])
        lines.append(f"Embedding collapse on held-out windows (spread / effective rank, width {emb['width']}): fused "
                     f"{emb['fused']['spread']:.3f} / {emb['fused']['effective_rank']:.1f}   per modality: {per}")
    return "\n".join(lines)


def retrieval_by_session(model: torch.nn.Module, val: dict[str, Any], manifest: dict, recordings: np.ndarray,
                         batch_size: int) -> dict[str, Any]:
    """Top-1 / top-5 within each held-out session that has two modalities together (every one of its
    windows): a window must be told from the same session's other windows, the harder question."""
    out = {}
    for name in sorted(set(recordings.tolist())):
        top = retrieval(model, val, manifest, np.flatnonzero(recordings == name), batch_size, ks=(1, 5))
        if top[1]["model"] is not None:
            out[name] = {"top1": top[1], "top5": top[5]}
    return out


def evaluate_neurofm_export(export_dir: Any, data_dir: Any, *, seed: int = 0) -> dict[str, Any]:
    """A NeuroFM export on the held-out windows of the dataset it was trained on; prints the table."""
    import dataclasses
    import json
    from pathlib import Path

    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.config import ConfigError
    from pipelines.timeseries import read_series

    model, meta = load_exported(export_dir)
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    for key in ("modalities", "channel_ids"):  # the model's channel embeddings index these ids
        if meta["data"][key] != manifest[key]:
            raise ConfigError(f"data.output_dir={data_dir}: the dataset's {key} differ from those {export_dir} was "
                              f"trained on; evaluate on the dataset the model was trained with")
    train_arrays, recordings, starts = read_series(str(data_dir), "train")
    # Train rows are stored shuffled; in time order per recording, the slice the baselines hold out
    # to choose their ridge penalty is whole late recordings, not windows overlapping the fitted ones.
    order = np.lexsort((starts, recordings))
    train_arrays = {m: dataclasses.replace(a, x=a.x[order], chan=a.chan[order], present=a.present[order])
                    for m, a in train_arrays.items()}
    val_arrays, val_recordings, _ = read_series(str(data_dir), "val")
    # No torch.no_grad() here: the masked-channel adaptation trains a copy (evaluate_neurofm scores under no_grad).
    result = evaluate_neurofm(model, train_arrays, val_arrays, manifest, seed=seed, val_recordings=val_recordings)
    print(format_table(result), flush=True)
    return result
