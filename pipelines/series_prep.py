"""One session -> resampled, aligned, split, normalised arrays and the plan of its windows.

    session's Sources --read_source--> Streams --resample--> each at its modality's rate
        --align (start_s, or cross-correlation for `align_to`)--> one clock, common overlap
        --split by time (early = train, late = held out, a guard between)--> per-channel mean/std
        from the train part --> normalised arrays + window starts on each side of the split

`prepare_session` runs as a Ray task of the dataset build (`timeseries.py`). Its helpers (`resample`,
`channel_stats`, ...) also turn served streams into model inputs (`neuraflex_ray/serving/neuro.py`).
"""

from __future__ import annotations

import json
import math
import pickle
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import signal

from neuraflex_ray.config import ModalitySpec, SeriesDataConfig
from pipelines.neuro_sources import BadRecording, Source, Stream, read_source

MAX_DENOMINATOR = 1000  # resample_poly up/down at most this: rates within ~1e-6 of the target
EPS = 1e-9


def plan_layout(cfg: SeriesDataConfig) -> dict[str, Any]:
    """Window layout in samples per modality, as plain data for the Ray tasks."""
    if not cfg.horizons_s or cfg.patch_s <= 0 or cfg.context_s <= 0 or cfg.hop_s <= 0:
        raise ValueError("data.context_s, data.patch_s, data.hop_s and data.horizons_s must be positive")
    n_ctx = round(cfg.context_s / cfg.patch_s)
    horizons = [round(h / cfg.patch_s) for h in cfg.horizons_s]
    modalities = {}
    for name, spec in cfg.modalities.items():
        p = round(spec.rate * cfg.patch_s)
        if p < 1 or abs(p - spec.rate * cfg.patch_s) > 1e-6:
            raise ValueError(f"data.modalities.{name}.rate={spec.rate} x data.patch_s={cfg.patch_s} is not a whole "
                             f"number of samples; pick a rate that is a multiple of {1 / cfg.patch_s:g} Hz")
        modalities[name] = {"rate": spec.rate, "max_channels": spec.max_channels, "patch_len": p,
                            "context_samples": n_ctx * p, "future_samples": max(horizons) * p}
    return {"modalities": modalities, "patch_s": cfg.patch_s, "hop_s": cfg.hop_s,
            "window_s": (n_ctx + max(horizons)) * cfg.patch_s, "context_patches": n_ctx,
            "horizon_patches": horizons, "val_fraction": cfg.val_fraction, "reject_abs_z": cfg.reject_abs_z}


def estimate_offset(ref: np.ndarray, other: np.ndarray, rate: float, max_lag_s: float = 0.0) -> float:
    """Seconds after ref's first sample at which other's first sample was taken (other[k] ~ ref[k + offset*rate]).

    Both at `rate`, 1-D or [C, N]: channel i of one is matched with channel i of the other (z-scored, so
    offsets and gains do not matter) and their cross-correlations are summed. Only lags within
    ±max_lag_s are considered (0: any lag with some overlap). The peak is refined to a fraction of a
    sample by a parabola through it and its two neighbours.
    """
    a, b = np.atleast_2d(ref), np.atleast_2d(other)
    lags = signal.correlation_lags(a.shape[1], b.shape[1], mode="full")
    xc = sum(signal.correlate(_zscore(a[i]), _zscore(b[i]), mode="full", method="fft")
             for i in range(min(len(a), len(b))))
    if max_lag_s > 0:
        xc = np.where(np.abs(lags) <= max_lag_s * rate, xc, -np.inf)
    k = int(np.argmax(xc))
    frac = 0.0
    if 0 < k < len(xc) - 1 and np.isfinite(xc[k - 1]) and np.isfinite(xc[k + 1]):
        y0, y1, y2 = xc[k - 1], xc[k], xc[k + 1]
        curvature = y0 - 2 * y1 + y2
        frac = 0.5 * (y0 - y2) / curvature if curvature < 0 else 0.0
    return float((lags[k] + frac) / rate)


def prepare_session(row: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Ray task: read a session's files and make them one normalised multi-modal recording.

    Never raises for a bad file: its reason goes to `skipped`, so the driver decides (error or skip)
    after every session has been looked at, and before anything is written.
    """
    session = row["session"]
    skipped: list[dict[str, str]] = []
    streams: list[Stream] = []
    for d in json.loads(row["sources"]):
        src = Source(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        try:
            streams.append(read_source(src, ModalitySpec(**{k: plan["modalities"][src.modality][k]
                                                           for k in ("rate", "max_channels")})))
        except BadRecording as e:
            skipped.append({"file": src.path, "reason": str(e)})
    streams, more = _usable_streams(session, streams, plan)
    skipped += more
    meta: dict[str, Any] = {"session": session, "skipped": skipped, "modalities": {}, "train_starts": [],
                            "val_starts": []}
    if not streams:
        return {"session": session, "meta": json.dumps(meta), "payload": b""}

    source_rates = [s.rate for s in streams]
    # Resampling filters the whole stream, so samples near the split mix both sides: keep windows
    # (and normalisation statistics) this far from the split, on the patch grid.
    guard = max(filter_reach_s(s.rate, plan["modalities"][s.modality]["rate"]) for s in streams)
    guard = math.ceil(guard / plan["patch_s"] - EPS) * plan["patch_s"]
    for s in streams:  # every stream at its modality's rate from here on
        target = plan["modalities"][s.modality]["rate"]
        s.data, s.rate = resample(s.data, s.rate, target), target
    offsets = _align(streams)
    t_begin = max(s.start_s for s in streams)
    t_end = min(s.start_s + s.duration_s for s in streams)
    if t_end <= t_begin:  # a clock problem, not a short recording: name every file of the session
        spans = ", ".join(f"{s.name} {s.start_s:g}-{s.start_s + s.duration_s:g} s" for s in streams)
        reason = f"session {session!r}: its streams do not overlap in time ({spans}); fix: check their start_s and session"
        meta["skipped"] += [{"file": s.source, "reason": reason} for s in streams]
        return {"session": session, "meta": json.dumps(meta), "payload": b""}
    if t_end - t_begin < plan["window_s"]:  # usable files, just too short for one window: noted, not skipped
        meta["short_s"] = t_end - t_begin
        return {"session": session, "meta": json.dumps(meta), "payload": b""}

    duration = t_end - t_begin
    patch = plan["patch_s"]
    split = math.floor(duration * (1 - plan["val_fraction"]) / patch + EPS) * patch  # on the patch grid
    arrays, norm_stats, channels = {}, {}, {}
    for m in plan["modalities"]:
        group = [s for s in streams if s.modality == m]
        if not group:
            continue
        rate = plan["modalities"][m]["rate"]
        n = math.floor(duration * rate + 1e-6)
        x = np.concatenate([_on_grid(s.data, s.start_s, rate, t_begin, n) for s in group])
        train = x[:, : max(round((split - guard) * rate), 1)]  # (a train part shorter than a sample: its first sample)
        mean, std = channel_stats(train)
        arrays[m] = ((x - mean[:, None]) / std[:, None]).astype(np.float32)
        channels[m] = [c for s in group for c in s.channels]
        norm_stats[m] = {"channels": channels[m], "mean": mean.tolist(), "std": std.tolist()}

    window = plan["window_s"]
    starts, rejected = {}, {}
    for part, (begin, end) in (("train", (0.0, split - guard)), ("val", (split + guard, duration))):
        starts[part], rejected[part] = _reject_artifacts(_window_starts(begin, end, window, plan["hop_s"], patch),
                                                         arrays, plan)
    meta.update(
        modalities={m: {"channels": channels[m], "samples": int(a.shape[1])} for m, a in arrays.items()},
        start_s=t_begin, duration_s=duration, split_s=t_begin + split, norm_stats=norm_stats,
        train_starts=starts["train"], val_starts=starts["val"], rejected_windows=rejected, split_guard_s=guard,
        streams=[{"name": s.name, "file": s.source, "modality": s.modality, "channels": s.channels,
                  "source_rate": rate_in, "start_s": s.start_s,
                  "placed_by": "cross-correlation" if s.name in offsets else "start_s"}
                 for s, rate_in in zip(streams, source_rates, strict=True)],
    )
    return {"session": session, "meta": json.dumps(meta), "payload": pickle.dumps(arrays)}


def _usable_streams(session: str, streams: list[Stream], plan: dict[str, Any]) -> tuple[list[Stream], list[dict]]:
    """Leave out streams that cannot share the session: too many channels or repeated channel names in
    one modality, or aligned to a stream that was left out."""
    skipped = []
    for m in sorted({s.modality for s in streams}):
        group = [s for s in streams if s.modality == m]
        names = [c for s in group for c in s.channels]
        cap = plan["modalities"][m]["max_channels"]
        problem = (f"its {m} files have {len(names)} channels together, more than data.modalities.{m}.max_channels="
                   f"{cap}" if len(names) > cap else
                   f"its {m} files repeat channel names {sorted({c for c in names if names.count(c) > 1})}"
                   if len(set(names)) < len(names) else "")
        if problem:
            reason = (f"session {session!r} ({', '.join(s.source for s in group)}): {problem}; fix: raise "
                      f"max_channels, give the files distinct channel names, or put them in different sessions")
            skipped += [{"file": s.source, "reason": reason} for s in group]
            streams = [s for s in streams if s.modality != m]
    for _ in range(len(streams)):  # a stream aligned to one that was left out goes too (and so on)
        names = {s.name for s in streams}
        lost = [s for s in streams if s.align_to and s.align_to not in names]
        skipped += [{"file": s.source, "reason": f"{s.source}: it is aligned to {s.align_to!r} of session {session!r}, "
                                                 f"which was left out; fix that file first"} for s in lost]
        streams = [s for s in streams if s not in lost]
    return streams, skipped


def resample_ratio(rate: float, target: float) -> Fraction:
    """up/down of the polyphase resampling from `rate` to `target` Hz."""
    return Fraction(target / rate).limit_denominator(MAX_DENOMINATOR)


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of x [C, N] for normalising; a flat channel gets std 1 and stays at zero."""
    mean, std = x.mean(axis=1), x.std(axis=1)
    return mean, np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)


def filter_reach_s(rate: float, target: float) -> float:
    """How far (s) resample_poly's filter reaches: its default Kaiser window has 10 * max(up, down)
    taps on each side at the upsampled rate; plus one output sample for the grid interpolation."""
    ratio = resample_ratio(rate, target)
    reach = 0.0 if ratio == 1 else 10 * max(ratio.numerator, ratio.denominator) / (rate * ratio.numerator)
    return reach + 1 / target


def resample(x: np.ndarray, rate: float, target: float) -> np.ndarray:
    """x [C, N] at `rate` -> at `target` Hz with a polyphase anti-aliasing filter (resample_poly)."""
    ratio = resample_ratio(rate, target)
    if ratio == 1:
        return x.astype(np.float64, copy=False)
    # padtype="line": the filter sees the signal's own trend past its ends, not zeros (which would put a
    # step from 0 to the DC level, e.g. an accelerometer's gravity, at both ends of every stream).
    return signal.resample_poly(x.astype(np.float64, copy=False), ratio.numerator, ratio.denominator, axis=1,
                                padtype="line")


def _align(streams: list[Stream]) -> dict[str, float]:
    """Place each stream that has `align_to` on its reference's clock by cross-correlation.

    Both are of one modality, so both are at its rate by now; the reference keeps its own start_s.
    """
    by_name = {s.name: s for s in streams}
    offsets: dict[str, float] = {}
    for s in streams:
        if s.align_to:
            ref = by_name[s.align_to]
            if ref.modality != s.modality or ref.align_to:
                raise ValueError(f"{s.source}: align_to must name a stream of the same modality that is not "
                                 f"itself aligned (got {ref.name!r}, {ref.modality})")
            offsets[s.name] = estimate_offset(ref.data, s.data, s.rate, s.max_lag_s)
            s.start_s = ref.start_s + offsets[s.name]
    return offsets


def _on_grid(x: np.ndarray, start_s: float, rate: float, t_begin: float, n: int) -> np.ndarray:
    """n samples of x (first sample at start_s) at times t_begin + k / rate: a slice when the clocks
    line up on a sample, else linear interpolation between neighbours (a sub-sample shift)."""
    pos = (t_begin - start_s) * rate
    i0 = math.floor(pos + 1e-6)
    frac = pos - i0
    if frac < 1e-6:
        out = x[:, i0: i0 + n]
        assert out.shape[1] == n, (out.shape, n, pos)  # t_begin/n come from the streams' overlap
        return out
    k = i0 + np.arange(n)
    return x[:, k] * (1 - frac) + x[:, np.minimum(k + 1, x.shape[1] - 1)] * frac


def _reject_artifacts(starts: list[float], arrays: dict[str, np.ndarray], plan: dict[str, Any]) -> tuple[list[float], int]:
    """Amplitude-based artifact rejection, the same fixed rule on both sides of the split: drop a window
    where any normalised sample exceeds reject_abs_z (an electrode popping off, a saturated amplifier).
    Returns the kept starts and how many were dropped."""
    limit = plan["reject_abs_z"]
    if not limit:
        return starts, 0
    keep = []
    for t in starts:
        peak = max(float(np.abs(a[:, round(t * r):round((t + plan["window_s"]) * r)]).max(initial=0.0))
                   for a, r in ((a, plan["modalities"][m]["rate"]) for m, a in arrays.items()))
        if peak <= limit:
            keep.append(t)
    return keep, len(starts) - len(keep)


def _window_starts(begin: float, end: float, window_s: float, hop_s: float, patch_s: float) -> list[float]:
    """Window starts (seconds from the session start) every hop_s from `begin`, on the patch grid, such
    that [start, start + window_s) lies inside [begin, end)."""
    if end - begin < window_s - EPS:
        return []
    t = begin + np.arange(math.floor((end - begin - window_s) / hop_s + EPS) + 1) * hop_s
    t = np.unique(np.round(t / patch_s) * patch_s)
    t = t[(t >= begin - EPS) & (t + window_s <= end + EPS)]
    return [round(float(v), 9) for v in t]


def _zscore(v: np.ndarray) -> np.ndarray:
    v = v - v.mean()
    sd = v.std()
    return v / sd if sd > 0 else v
