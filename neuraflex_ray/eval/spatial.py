"""Masked-channel reconstruction: one EEG channel is hidden entirely (every context patch masked and
its samples zeroed) and the model reconstructs it from the other channels, beside a ridge that predicts
the channel from the other channels at the same instant. Scored by R^2 = 1 - SSE/SST.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from neuraflex_ray.eval.common import chunks, device_of, info, make_input, to_numpy, valid_channels
from neuraflex_ray.eval.forecast import CHUNK
from neuraflex_ray.eval.ridge import Ridge, RidgeStats, fit_ridge, split_fit_held

SPATIAL_STRIDE = 4  # masked-channel ridge: fit on every 4th context sample of the train windows (neighbours are alike)


def _by_id(a: Any, idx: np.ndarray, ids: np.ndarray, t_end: int, stride: int = 1) -> np.ndarray:
    """Context samples laid out by channel id instead of slot, one row per instant: [B, T', D], 0 where an id is absent.

    Keying by id keeps the ridge's features meaning the same electrode even if montages differ between recordings.
    """
    x = np.asarray(a.x[idx])[:, :, :t_end:stride]
    b, c = np.nonzero(valid_channels(a, idx))
    z = np.zeros((len(idx), x.shape[2], len(ids)), dtype=np.float64)
    z[b, :, np.searchsorted(ids, np.asarray(a.chan)[idx][b, c])] = x[b, c]
    return z


# The masked-channel task is scored on multi-channel montages (the 64-channel PhysioNet EEG in the
# samples): a 1-2 electrode headband has no neighbours to predict a channel from.
MIN_MONTAGE_CHANNELS = 16


def _eligible(a: Any, idx: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid-by-id [W, D], windows with a full montage [W]) over `idx`, without touching samples."""
    valid = valid_channels(a, idx)
    v = np.zeros((len(idx), len(ids)), dtype=bool)
    b, c = np.nonzero(valid)
    v[b, np.searchsorted(ids, np.asarray(a.chan)[idx][b, c])] = True
    return v, valid.sum(1) >= MIN_MONTAGE_CHANNELS


def fit_spatial_ridges(train: Any, targets: np.ndarray, ids: np.ndarray, ctx: int,
                       idx: np.ndarray | None = None) -> dict[int, Ridge | None]:
    """For each target channel id: a ridge predicting its sample from every other channel's sample at the same instant.

    Rows: every SPATIAL_STRIDE-th context sample of each train window (in `idx`) where the target is valid and
    the window has a full montage (>= MIN_MONTAGE_CHANNELS valid); absent channels enter as 0, as in the data. The sums over all
    D ids are taken once per set of windows and each target's X'X, X'y are blocks of them.
    """
    idx = np.arange(len(train.present)) if idx is None else idx
    fit_idx, held_idx = split_fit_held(idx)
    cols = {int(t): int(np.searchsorted(ids, t)) for t in targets}
    stats = {(part, t): RidgeStats(len(ids) - 1, 1) for part in ("fit", "held") for t in cols}
    for part, part_idx in (("fit", fit_idx), ("held", held_idx)):
        for chunk in chunks(part_idx, CHUNK):
            v, ok = _eligible(train, chunk, ids)
            if not ok.any():
                continue
            z = _by_id(train, chunk, ids, ctx, SPATIAL_STRIDE)
            joint = {}  # window selection -> (n, sum, gram) over all ids
            for t, j in cols.items():
                sel = ok & v[:, j]
                if not sel.any():
                    continue
                key = sel.tobytes()
                if key not in joint:
                    rows = z[sel].reshape(-1, len(ids))
                    joint[key] = (len(rows), rows.sum(0), rows.T @ rows)
                n, sm, g = joint[key]
                o = np.arange(len(ids)) != j
                stats[part, t].add_sums(n, sm[o], sm[j:j + 1], g[np.ix_(o, o)], g[o, j:j + 1], g[j, j:j + 1])
    return {t: fit_ridge(stats["fit", t], stats["held", t]) for t in cols}


def masked_channel(models: dict[str, Any], train, val, manifest, idx_val, idx_train, batch_size, modality,
                   every) -> dict:
    """R^2 of every model in `models` (name -> model, e.g. zero_shot / adapted) and of the ridge, on
    every `every`-th channel of the full-montage val windows."""
    none = {**{name: None for name in models}, "ridge": None}
    if modality not in manifest["modalities"] or modality not in val or modality not in train:
        return {**none, "reason": f"no {modality!r} modality in the data"}
    a_tr, a_va = train[modality], val[modality]
    p, ctx = info(manifest, modality)
    n_ctx = int(manifest["context_patches"])
    ids = np.unique(np.concatenate([np.asarray(a.chan)[i][valid_channels(a, i)]
                                    for a, i in ((a_tr, idx_train), (a_va, idx_val))]))
    if len(ids) < 2:
        return {**none, "reason": f"fewer than 2 {modality!r} channels"}
    v_tr, ok_tr = _eligible(a_tr, idx_train, ids)
    v_va, ok_va = _eligible(a_va, idx_val, ids)
    usable = (v_va & ok_va[:, None]).any(0) & (v_tr & ok_tr[:, None]).any(0)
    targets = ids[usable][::every]
    if len(targets) == 0:
        return {**none, "reason": f"no {modality!r} channel valid in windows with >= "
                                 f"{MIN_MONTAGE_CHANNELS} channels in both train and val"}
    ridges = {t: r for t, r in fit_spatial_ridges(a_tr, targets, ids, ctx, idx_train).items() if r is not None}
    # ridge weights over all D ids with 0 on the target itself, so one row layout serves every target
    weights = {t: (np.insert(r.w[:, 0], int(np.searchsorted(ids, t)), 0.0), float(r.b[0])) for t, r in ridges.items()}
    names_m = list(models)
    k = len(names_m)
    s = {t: np.zeros(k + 5) for t in ridges}  # sse per model, sse_ridge, sum y, sum y^2, n values, n windows
    windows = idx_val[ok_va]
    v_win = v_va[ok_va]
    for lo in range(0, len(windows), batch_size):
        batch, v = windows[lo:lo + batch_size], v_win[lo:lo + batch_size]
        z = _by_id(a_va, batch, ids, ctx)  # [B, T, D]
        for t, (w, b) in weights.items():
            j = int(np.searchsorted(ids, t))
            keep = v[:, j]
            if not keep.any():
                continue
            sub = batch[keep]
            chan = np.asarray(a_va.chan)[sub]
            slot = np.argmax(chan == t, axis=1)
            rows = np.arange(len(sub))
            x = np.array(np.asarray(a_va.x[sub])[:, :, :ctx], dtype=np.float32)
            y = x[rows, slot].astype(np.float64)
            x[rows, slot] = 0.0  # the hidden channel's samples never reach the model, masked or not
            mask = np.zeros((len(sub), x.shape[1], n_ctx), dtype=bool)
            mask[rows, slot] = True
            sse = []
            for model in models.values():
                device = device_of(model)
                out = model({modality: make_input(x, chan, np.ones(len(sub), bool), device)},
                            patch_mask={modality: torch.as_tensor(mask, device=device)})
                rec = to_numpy(out.recon[modality])
                if rec.shape != (len(sub), x.shape[1], n_ctx, p):
                    raise ValueError(f"recon[{modality!r}] has shape {rec.shape}; the contract says "
                                     f"{(len(sub), x.shape[1], n_ctx, p)} = [B, C, N, P]")
                sse.append(((rec.reshape(len(sub), x.shape[1], ctx)[rows, slot] - y) ** 2).sum())
            s[t] += (*sse, ((z[keep] @ w + b - y) ** 2).sum(), y.sum(), (y * y).sum(), y.size, len(sub))
    names = {int(i): k.split(":", 1)[1] for k, i in manifest.get("channel_ids", {}).items() if k.startswith(modality + ":")}
    per_channel, totals = [], np.zeros(k + 2)  # sse per model, sse_ridge, sst
    for t, st in s.items():
        sst = st[k + 2] - st[k + 1] ** 2 / st[k + 3] if st[k + 3] else 0.0
        if sst <= 0:
            continue
        per_channel.append({"id": t, "name": names.get(t, str(t)), "n_windows": int(st[k + 4]),
                            **{name: 1 - st[i] / sst for i, name in enumerate(names_m)},
                            "ridge": 1 - st[k] / sst, "ridge_alpha": ridges[t].alpha})
        totals += (*st[:k + 1], sst)
    if not per_channel:
        return {**none, "reason": f"no chosen {modality!r} channel could be scored (constant in val, or too few train rows)"}
    return {**{name: 1 - totals[i] / totals[k + 1] for i, name in enumerate(names_m)},
            "ridge": 1 - totals[k] / totals[k + 1], "modality": modality,
            "channels": per_channel, "n_windows": int(ok_va.sum()),
            "pooling": "1 - sum(SSE) / sum(SST) over the channels, SST about each channel's val mean"}
