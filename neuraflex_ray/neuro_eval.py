"""Held-out evaluation of NeuroFM: every model number stands next to a baseline fitted on TRAINING windows only.

Three questions, each answered on the val windows (the late part of every recording):

1. Forecasting. Given the context, predict horizon patch k. The model is compared with persistence
   (the last context sample held over the patch: free, and hard to beat at short leads) and with a ridge
   autoregression (last `lag_patches` patches of one channel -> the P samples of patch k; one ridge per
   modality and horizon, channels pooled). skill = 1 - mse_model / mse_baseline: > 0 beats the baseline.
2. Masked-channel reconstruction. One EEG channel is hidden entirely (every context patch masked and its
   samples zeroed) and the model reconstructs it from the other channels; the baseline is a ridge that
   predicts the channel from the other channels at the same instant. Scored by R^2 = 1 - SSE/SST.
3. Cross-modal retrieval. A window embedded through modality a alone should be nearest (cosine) to the
   same window embedded through modality b alone; top-1 accuracy next to chance (1/n).

Baselines are fitted in closed form with numpy ((X'X + lambda I) w = X'y, intercept unpenalised) from
sufficient statistics streamed over the train windows; their alpha is chosen on the last slice of the
TRAIN windows, never on val. Inputs are duck-typed: `train`/`val` map modality -> an object with
`x` float32 [W, C, T] (context + future samples), `chan` int [W, C] (0 = padding) and `present` bool [W]
(pipelines.timeseries.SeriesArrays); the model follows notes/neurofm_contract.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-8, 3))  # relative to the mean feature variance (see RidgeStats)
DEFAULT_ALPHA = 1e-3  # used when the train windows are too few to hold a slice out
HELD_FRACTION = 0.2  # the last 20% of the (ordered) train windows choose alpha
SPATIAL_STRIDE = 4  # masked-channel ridge: fit on every 4th context sample of the train windows (neighbours are alike)
CHUNK = 256  # windows per numpy chunk when accumulating ridge statistics


# -----------------------------------------------------------------------------
# closed-form ridge from streamed sums


class RidgeStats:
    """Sums over rows (x [F], y [O]) from which a ridge with an unpenalised intercept is solved in closed form.

    Streaming X'X, X'y, ... lets a fit run over millions of rows chunk by chunk, and scoring a held slice
    from its own sums means choosing alpha never needs the rows again.
    """

    def __init__(self, n_in: int, n_out: int):
        self.n = 0
        self.sx, self.sy = np.zeros(n_in), np.zeros(n_out)
        self.sxx, self.sxy, self.syy = np.zeros((n_in, n_in)), np.zeros((n_in, n_out)), np.zeros(n_out)

    def add(self, x: np.ndarray, y: np.ndarray) -> RidgeStats:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).reshape(len(x), -1)
        return self.add_sums(len(x), x.sum(0), y.sum(0), x.T @ x, x.T @ y, (y * y).sum(0))

    def add_sums(self, n: int, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, sxy: np.ndarray, syy: np.ndarray) -> RidgeStats:
        self.n += n
        self.sx += sx
        self.sy += sy
        self.sxx += sxx
        self.sxy += sxy
        self.syy += syy
        return self

    def merged(self, other: RidgeStats) -> RidgeStats:
        out = RidgeStats(len(self.sx), len(self.sy))
        out.n = self.n + other.n
        for k in ("sx", "sy", "sxx", "sxy", "syy"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(w [F, O], b [O]) minimising sum |y - x w - b|^2 + lam |w|^2 with lam = alpha * n * mean feature variance.

        Centring removes the intercept from the penalty; scaling lam by the data makes alpha unit-free.
        """
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        g = self.sxx - n * np.outer(mx, mx)
        c = self.sxy - n * np.outer(mx, my)
        lam = alpha * max(float(np.trace(g)) / len(g), 1e-12)
        w = np.linalg.solve(g + lam * np.eye(len(g)), c)
        return w, my - mx @ w

    def sse(self, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Sum of squared errors of x w + b over the rows summed here, per output column."""
        cross = np.einsum("fo,fo->o", self.sxy, w) + b * self.sy
        pred2 = np.einsum("fo,fg,go->o", w, self.sxx, w) + 2 * b * (self.sx @ w) + self.n * b * b
        return self.syy - 2 * cross + pred2


@dataclass
class Ridge:
    w: np.ndarray  # [F, O]
    b: np.ndarray  # [O]
    alpha: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.w + self.b


def fit_ridge(fit: RidgeStats, held: RidgeStats, alphas: tuple[float, ...] = ALPHAS) -> Ridge | None:
    """Pick alpha by the held slice's error of a ridge fitted on `fit`, then refit on fit + held (both train)."""
    total = fit.merged(held)
    if total.n < 2:
        return None
    alpha = DEFAULT_ALPHA
    if fit.n >= 2 and held.n >= 1:
        errors = [float(held.sse(*fit.solve(a)).sum()) for a in alphas]
        alpha = alphas[int(np.argmin(errors))]
    return Ridge(*total.solve(alpha), alpha)


# -----------------------------------------------------------------------------
# small helpers


def _n_windows(arrays: dict[str, Any]) -> int:
    counts = {m: len(a.present) for m, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"every modality must hold the same windows (rows); got counts {counts}")
    return next(iter(counts.values()), 0)


def _subset(n: int, limit: int | None) -> np.ndarray:
    """Window indices 0..n-1, or `limit` of them evenly spread (so every recording keeps its share)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def _split(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train windows -> (fit part, held slice): the held slice is the END of the train order, as val is of each recording."""
    if len(idx) < 5:
        return idx, idx[:0]
    cut = int(round(len(idx) * (1 - HELD_FRACTION)))
    return idx[:cut], idx[cut:]


def _chunks(idx: np.ndarray, size: int):
    for lo in range(0, len(idx), size):
        yield idx[lo:lo + size]


def _valid(a: Any, idx: np.ndarray) -> np.ndarray:
    """[B, C] True where the modality is present in the window and the channel slot is not padding."""
    return np.asarray(a.present)[idx][:, None] & (np.asarray(a.chan)[idx] > 0)


def _info(manifest: dict, m: str) -> tuple[int, int]:
    """(P samples per patch, context samples) of modality m."""
    n_ctx = int(manifest["context_patches"])
    p = int(manifest["modalities"][m]["patch_len"])
    return p, n_ctx * p


def _series_input_cls() -> type:
    try:
        from neuraflex_ray.models.neurofm import SeriesInput
    except ModuleNotFoundError as e:  # only while the model module is being written; any other import error surfaces
        if e.name != "neuraflex_ray.models.neurofm":
            raise
        return _SeriesInput
    return SeriesInput


@dataclass
class _SeriesInput:
    """Stand-in for neuraflex_ray.models.neurofm.SeriesInput (same fields) for when that module is absent."""

    x: torch.Tensor
    chan: torch.Tensor
    present: torch.Tensor


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _make_input(x: np.ndarray, chan: np.ndarray, present: np.ndarray, device: torch.device) -> Any:
    cls = _series_input_cls()
    return cls(x=torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device),
               chan=torch.as_tensor(np.asarray(chan, dtype=np.int64), device=device),
               present=torch.as_tensor(np.asarray(present, dtype=bool), device=device))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _ratio_skill(mse: float | None, base: float | None) -> float | None:
    if mse is None or base is None or base <= 0:
        return None
    return 1.0 - mse / base


# -----------------------------------------------------------------------------
# 1. forecasting


def fit_forecast_ridges(train: dict[str, Any], manifest: dict, idx: np.ndarray | None = None, *,
                        lag_patches: int = 4) -> dict[tuple[str, int], Ridge | None]:
    """One ridge autoregression per (modality, horizon k) on the train windows `idx` (default: all).

    Rows: every valid channel of every window where the modality is present (channels pooled).
    x = the last L = min(lag_patches, N) * P context samples, y = the P samples of horizon patch k.
    """
    idx = np.arange(_n_windows(train)) if idx is None else idx
    fit_idx, held_idx = _split(idx)
    out: dict[tuple[str, int], Ridge | None] = {}
    for m in manifest["modalities"]:
        if m not in train:
            continue
        a = train[m]
        p, ctx = _info(manifest, m)
        lag = min(lag_patches, int(manifest["context_patches"])) * p
        stats = {(part, k): RidgeStats(lag, p) for part in ("fit", "held") for k in manifest["horizon_patches"]}
        for part, part_idx in (("fit", fit_idx), ("held", held_idx)):
            for chunk in _chunks(part_idx, CHUNK):
                valid = _valid(a, chunk)
                if not valid.any():
                    continue
                x = np.asarray(a.x[chunk])
                feats = x[:, :, ctx - lag:ctx][valid]
                for k in manifest["horizon_patches"]:
                    stats[part, k].add(feats, x[:, :, ctx + (k - 1) * p:ctx + k * p][valid])
        for k in manifest["horizon_patches"]:
            out[m, k] = fit_ridge(stats["fit", k], stats["held", k])
    return out


def _forecast(model, train, val, manifest, idx_val, idx_train, batch_size, lag_patches) -> list[dict]:
    horizons = [int(k) for k in manifest["horizon_patches"]]
    patch_s = float(manifest["patch_s"])
    mods = [m for m in manifest["modalities"] if m in val]
    ridges = fit_forecast_ridges(train, manifest, idx_train, lag_patches=lag_patches)
    # sums[m][k] = [sse_model, sse_persistence, sse_ridge, n_values]
    sums = {m: {k: np.zeros(4) for k in horizons} for m in mods}
    device = _device(model)
    for batch in _chunks(idx_val, batch_size):
        inputs = {}
        for m in mods:
            present = np.asarray(val[m].present)[batch]
            if present.any():
                _, ctx = _info(manifest, m)
                inputs[m] = _make_input(np.asarray(val[m].x[batch])[:, :, :ctx], np.asarray(val[m].chan)[batch], present, device)
        if not inputs:
            continue
        out = model(inputs, patch_mask=None)
        for m in inputs:
            p, ctx = _info(manifest, m)
            x = np.asarray(val[m].x[batch], dtype=np.float64)
            valid = _valid(val[m], batch)
            fc = _np(out.forecast[m])
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
                          "skill_vs_persistence": _ratio_skill(mse, pers), "skill_vs_ridge": _ratio_skill(mse, rid),
                          "n_values": int(s[3]), "ridge_alpha": ridges[m, k].alpha if has_ridge else None}
            if has_ridge:
                pooled += s
            else:
                excluded.append(m)
        row: dict[str, Any] = {"horizon_s": k * patch_s, "horizon_patches": k}
        if pooled[3] > 0:
            mse, pers, rid = pooled[0] / pooled[3], pooled[1] / pooled[3], pooled[2] / pooled[3]
            row.update(mse=mse, mse_persistence=pers, mse_ridge=rid, skill_vs_persistence=_ratio_skill(mse, pers),
                       skill_vs_ridge=_ratio_skill(mse, rid), n_values=int(pooled[3]))
        else:
            row.update(mse=None, mse_persistence=None, mse_ridge=None, skill_vs_persistence=None, skill_vs_ridge=None,
                       n_values=0, reason="no val window with a present modality that also has train windows")
        if excluded:
            row["excluded_from_pool"] = {m: "no train windows to fit its ridge" for m in excluded}
        row["per_modality"] = per_mod
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# 2. masked-channel reconstruction


def _by_id(a: Any, idx: np.ndarray, ids: np.ndarray, t_end: int, stride: int = 1) -> np.ndarray:
    """Context samples laid out by channel id instead of slot, one row per instant: [B, T', D], 0 where an id is absent.

    Keying by id keeps the ridge's features meaning the same electrode even if montages differ between recordings.
    """
    x = np.asarray(a.x[idx])[:, :, :t_end:stride]
    b, c = np.nonzero(_valid(a, idx))
    z = np.zeros((len(idx), x.shape[2], len(ids)), dtype=np.float64)
    z[b, :, np.searchsorted(ids, np.asarray(a.chan)[idx][b, c])] = x[b, c]
    return z


# The masked-channel task is scored on multi-channel montages (the 64-channel PhysioNet EEG in the
# samples): a 1-2 electrode headband has no neighbours to predict a channel from.
MIN_MONTAGE_CHANNELS = 16


def _eligible(a: Any, idx: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid-by-id [W, D], windows with a full montage [W]) over `idx`, without touching samples."""
    valid = _valid(a, idx)
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
    fit_idx, held_idx = _split(idx)
    cols = {int(t): int(np.searchsorted(ids, t)) for t in targets}
    stats = {(part, t): RidgeStats(len(ids) - 1, 1) for part in ("fit", "held") for t in cols}
    for part, part_idx in (("fit", fit_idx), ("held", held_idx)):
        for chunk in _chunks(part_idx, CHUNK):
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


def _masked_channel(model, train, val, manifest, idx_val, idx_train, batch_size, modality, every) -> dict:
    none = {"model": None, "ridge": None}
    if modality not in manifest["modalities"] or modality not in val or modality not in train:
        return {**none, "reason": f"no {modality!r} modality in the data"}
    a_tr, a_va = train[modality], val[modality]
    p, ctx = _info(manifest, modality)
    n_ctx = int(manifest["context_patches"])
    ids = np.unique(np.concatenate([np.asarray(a.chan)[i][_valid(a, i)] for a, i in ((a_tr, idx_train), (a_va, idx_val))]))
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
    device = _device(model)
    s = {t: np.zeros(6) for t in ridges}  # sse_model, sse_ridge, sum y, sum y^2, n values, n windows
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
            out = model({modality: _make_input(x, chan, np.ones(len(sub), bool), device)},
                        patch_mask={modality: torch.as_tensor(mask, device=device)})
            rec = _np(out.recon[modality])
            if rec.shape != (len(sub), x.shape[1], n_ctx, p):
                raise ValueError(f"recon[{modality!r}] has shape {rec.shape}; the contract says "
                                 f"{(len(sub), x.shape[1], n_ctx, p)} = [B, C, N, P]")
            rec = rec.reshape(len(sub), x.shape[1], ctx)[rows, slot]
            s[t] += (((rec - y) ** 2).sum(), ((z[keep] @ w + b - y) ** 2).sum(), y.sum(), (y * y).sum(), y.size, len(sub))
    names = {int(i): k.split(":", 1)[1] for k, i in manifest.get("channel_ids", {}).items() if k.startswith(modality + ":")}
    per_channel, totals = [], np.zeros(3)  # sse_model, sse_ridge, sst
    for t, st in s.items():
        sst = st[3] - st[2] ** 2 / st[4] if st[4] else 0.0
        if sst <= 0:
            continue
        per_channel.append({"id": t, "name": names.get(t, str(t)), "n_windows": int(st[5]),
                            "model": 1 - st[0] / sst, "ridge": 1 - st[1] / sst, "ridge_alpha": ridges[t].alpha})
        totals += (st[0], st[1], sst)
    if not per_channel:
        return {**none, "reason": f"no chosen {modality!r} channel could be scored (constant in val, or too few train rows)"}
    return {"model": 1 - totals[0] / totals[2], "ridge": 1 - totals[1] / totals[2], "modality": modality,
            "channels": per_channel, "n_windows": int(ok_va.sum()),
            "pooling": "1 - sum(SSE) / sum(SST) over the channels, SST about each channel's val mean"}


# -----------------------------------------------------------------------------
# 3. cross-modal retrieval


def _top1(sim: np.ndarray) -> float:
    """Share of rows whose best column is the diagonal; ties share the hit (a constant embedding scores 1/n, not 1)."""
    best = sim.max(1, keepdims=True)
    ties = sim >= best - 1e-6 * np.maximum(np.abs(best), 1.0)
    hit = np.diag(ties) / ties.sum(1)
    return float(hit.mean())


def _embed(model, a: Any, windows: np.ndarray, m: str, ctx: int, batch_size: int, device) -> np.ndarray:
    out = []
    for batch in _chunks(windows, batch_size):
        x = np.asarray(a.x[batch])[:, :, :ctx]
        inputs = {m: _make_input(x, np.asarray(a.chan)[batch], np.ones(len(batch), bool), device)}
        if hasattr(model, "projection"):  # NeuroFM: the projected space the contrastive loss aligned
            out.append(_np(model(inputs, decode=False, per_modality=True).modality_embeddings[m]))
        else:
            out.append(_np(model.embed(inputs)))
    e = np.concatenate(out).astype(np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _retrieval(model, val, manifest, idx_val, batch_size) -> dict:
    mods = [m for m in manifest["modalities"] if m in val]
    has = {m: _valid(val[m], idx_val).any(1) for m in mods}
    pairs = []
    device = _device(model)
    for i, a in enumerate(mods):
        for b in mods[i + 1:]:
            windows = idx_val[has[a] & has[b]]
            if len(windows) < 2:
                continue
            ea = _embed(model, val[a], windows, a, _info(manifest, a)[1], batch_size, device)
            eb = _embed(model, val[b], windows, b, _info(manifest, b)[1], batch_size, device)
            sim = ea @ eb.T
            top1 = 0.5 * (_top1(sim) + _top1(sim.T))
            pairs.append({"a": a, "b": b, "n": len(windows), "model": top1, "chance": 1.0 / len(windows)})
    if not pairs:
        return {"model": None, "chance": None, "pairs": [], "reason": "no two modalities co-occur in >= 2 val windows"}
    return {"model": float(np.mean([p["model"] for p in pairs])), "chance": float(np.mean([p["chance"] for p in pairs])),
            "pairs": pairs, "pooling": "mean over pairs (each pair weighs the same); top-1 averages a->b and b->a"}


# -----------------------------------------------------------------------------
# entry points


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
    idx_val = _subset(_n_windows(val), max_windows)
    idx_train = _subset(_n_windows(train), max_train_windows) if train else np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = {
                "forecast": _forecast(model, train, val, manifest, idx_val, idx_train, batch_size, lag_patches),
                "masked_channel_r2": _masked_channel(model, train, val, manifest, idx_val, idx_train, batch_size,
                                                     eeg_modality, channel_every),
                "retrieval_top1": _retrieval(model, val, manifest, idx_val, batch_size),
            }
    finally:
        model.train(was_training)
    result.update(n_val_windows=len(idx_val), n_train_windows=len(idx_train), lag_patches=lag_patches,
                  forecast_pooling="every predicted value weighs the same across modalities")
    return _plain(result)


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, so the result is JSON-ready."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


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
