"""Forecasting: given the context, predict horizon patch k, beside persistence and a ridge autoregression.

Persistence holds the last context sample over the patch (free, and hard to beat at short leads); the
ridge autoregression maps the last `lag_patches` patches of one channel to the P samples of patch k
(one ridge per modality and horizon, channels pooled). skill = 1 - mse_model / mse_baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuraflex_ray.eval.common import chunks, device_of, info, make_input, n_windows, skill, to_numpy, valid_channels
from neuraflex_ray.eval.ridge import Ridge, RidgeStats, fit_ridge, split_fit_held

CHUNK = 256  # windows per numpy chunk when accumulating ridge statistics


def fit_forecast_ridges(train: dict[str, Any], manifest: dict, idx: np.ndarray | None = None, *,
                        lag_patches: int = 4) -> dict[tuple[str, int], Ridge | None]:
    """One ridge autoregression per (modality, horizon k) on the train windows `idx` (default: all).

    Rows: every valid channel of every window where the modality is present (channels pooled).
    x = the last L = min(lag_patches, N) * P context samples, y = the P samples of horizon patch k.
    """
    idx = np.arange(n_windows(train)) if idx is None else idx
    fit_idx, held_idx = split_fit_held(idx)
    out: dict[tuple[str, int], Ridge | None] = {}
    for m in manifest["modalities"]:
        if m not in train:
            continue
        a = train[m]
        p, ctx = info(manifest, m)
        lag = min(lag_patches, int(manifest["context_patches"])) * p
        stats = {(part, k): RidgeStats(lag, p) for part in ("fit", "held") for k in manifest["horizon_patches"]}
        for part, part_idx in (("fit", fit_idx), ("held", held_idx)):
            for chunk in chunks(part_idx, CHUNK):
                valid = valid_channels(a, chunk)
                if not valid.any():
                    continue
                x = np.asarray(a.x[chunk])
                feats = x[:, :, ctx - lag:ctx][valid]
                for k in manifest["horizon_patches"]:
                    stats[part, k].add(feats, x[:, :, ctx + (k - 1) * p:ctx + k * p][valid])
        for k in manifest["horizon_patches"]:
            out[m, k] = fit_ridge(stats["fit", k], stats["held", k])
    return out


def forecast_table(model, train, val, manifest, idx_val, idx_train, batch_size, lag_patches) -> list[dict]:
    horizons = [int(k) for k in manifest["horizon_patches"]]
    patch_s = float(manifest["patch_s"])
    mods = [m for m in manifest["modalities"] if m in val]
    ridges = fit_forecast_ridges(train, manifest, idx_train, lag_patches=lag_patches)
    # sums[m][k] = [sse_model, sse_persistence, sse_ridge, n_values]
    sums = {m: {k: np.zeros(4) for k in horizons} for m in mods}
    device = device_of(model)
    for batch in chunks(idx_val, batch_size):
        inputs = {}
        for m in mods:
            present = np.asarray(val[m].present)[batch]
            if present.any():
                _, ctx = info(manifest, m)
                inputs[m] = make_input(np.asarray(val[m].x[batch])[:, :, :ctx], np.asarray(val[m].chan)[batch], present, device)
        if not inputs:
            continue
        out = model(inputs, patch_mask=None)
        for m in inputs:
            p, ctx = info(manifest, m)
            x = np.asarray(val[m].x[batch], dtype=np.float64)
            valid = valid_channels(val[m], batch)
            fc = to_numpy(out.forecast[m])
            if fc.shape != (len(batch), x.shape[1], len(horizons), p):
                raise ValueError(f"forecast[{m!r}] has shape {fc.shape}; the contract says "
                                 f"{(len(batch), x.shape[1], len(horizons), p)} = [B, C, K, P]")
            last = x[:, :, ctx - 1:ctx]
            for j, k in enumerate(horizons):
                y = x[:, :, ctx + (k - 1) * p:ctx + k * p]
                s = sums[m][k]
                s[0] += ((fc[:, :, j] - y) ** 2)[valid].sum()
                s[1] += ((last - y) ** 2)[valid].sum()
                ridge = ridges.get((m, k))
                if ridge is not None and valid.any():
                    lag = ridge.w.shape[0]
                    s[2] += ((ridge.predict(x[:, :, ctx - lag:ctx][valid]) - y[valid]) ** 2).sum()
                s[3] += valid.sum() * p

    rows = []
    for k in horizons:
        per_mod, pooled, excluded = {}, np.zeros(4), []
        for m in mods:
            s = sums[m][k]
            if s[3] == 0:
                continue
            has_ridge = ridges.get((m, k)) is not None
            mse, pers = s[0] / s[3], s[1] / s[3]
            rid = s[2] / s[3] if has_ridge else None
            per_mod[m] = {"mse": mse, "mse_persistence": pers, "mse_ridge": rid,
                          "skill_vs_persistence": skill(mse, pers), "skill_vs_ridge": skill(mse, rid),
                          "n_values": int(s[3]), "ridge_alpha": ridges[m, k].alpha if has_ridge else None}
            if has_ridge:
                pooled += s
            else:
                excluded.append(m)
        row: dict[str, Any] = {"horizon_s": k * patch_s, "horizon_patches": k}
        if pooled[3] > 0:
            mse, pers, rid = pooled[0] / pooled[3], pooled[1] / pooled[3], pooled[2] / pooled[3]
            row.update(mse=mse, mse_persistence=pers, mse_ridge=rid, skill_vs_persistence=skill(mse, pers),
                       skill_vs_ridge=skill(mse, rid), n_values=int(pooled[3]))
        else:
            row.update(mse=None, mse_persistence=None, mse_ridge=None, skill_vs_persistence=None, skill_vs_ridge=None,
                       n_values=0, reason="no val window with a present modality that also has train windows")
        if excluded:
            row["excluded_from_pool"] = {m: "no train windows to fit its ridge" for m in excluded}
        row["per_modality"] = per_mod
        rows.append(row)
    return rows
