"""Downstream decoding from FROZEN NeuroFM embeddings, beside the features a physiologist would use.

For each labelled task of every recording in `probe_labels.py` that the export was pretrained on
(labels from the recording's own protocol, never from the signals), the same classifier is fitted
twice on the probe-train windows and scored on the probe-test windows (the pretraining's held-out
part, after a guard):

- model:    the window's embedding, `NeuroFM.embed` over all the session's modalities together, no gradient;
- baseline: per channel, mean, std, linear slope and Welch log band powers (BANDS_HZ), plus the heart rate
            from ECG R-peaks (`heart_rate_bpm`), all from the same normalised context samples.

Every task is scored at three time cuts (`ProbeSession.cuts_s`: the pretraining's split and two
earlier ones; train on the windows before a cut, test on those after it), and reports the mean
difference model - baseline over the cuts with a 95 % interval from a paired moving-block bootstrap
of each cut's test windows (blocks of about BLOCK_S seconds: overlapping windows and slow physiology
are not independent), `splits` holding each cut's figures. `model` and `baseline` stay the scores
at the pretraining's split.

Classifier: median imputation (a window with too few R-peaks has no heart rate) + StandardScaler +
LogisticRegression(class_weight="balanced", C=1 fixed). C is not tuned: time-ordered folds of the
train side are long single-class stretches (400 s of rest, then blocks of trials), so a CV score would
say little; a fixed C on standardised features treats both feature sets alike. Scored by balanced
accuracy (chance 0.5 whatever the class counts), with per-class recall and window counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import signal

from neuraflex_ray.atomic import write_json_atomic
from neuraflex_ray.config import ConfigError
from neuraflex_ray.eval.bootstrap import block_resampled_diffs, interval_of_mean
from neuraflex_ray.eval.common import device_of, make_input, plain, to_numpy
from neuraflex_ray.eval.probe_cases import BASIC_MOTIONS, probe_basic_motions
from neuraflex_ray.eval.probe_classifier import N_BOOT, C, balanced_accuracy, decode
from neuraflex_ray.eval.probe_labels import SOURCES
from neuraflex_ray.eval.probe_tasks import ProbeSession, TaskWindows, dense_hops, load_session, tasks_at

BATCH = 64  # windows per embed call
BLOCK_S = 30.0  # bootstrap blocks span about this many seconds of test windows

# Welch band powers per modality (Hz, [lo, hi)). A 4 s context gives 0.25 Hz bins, so no band starts lower;
# bands are clipped to the modality's Nyquist frequency and dropped when they lie above it.
BANDS_HZ: dict[str, tuple[tuple[float, float], ...]] = {
    # heart-rate fundamental and its first harmonics (30-240 bpm); QRS energy; high-frequency QRS and muscle noise
    "ecg": ((0.5, 4.0), (4.0, 15.0), (15.0, 40.0)),
    # phasic skin-conductance responses (rise times of 1-3 s); faster than any SCR: noise and movement
    "eda": ((0.25, 1.0), (1.0, 4.0)),
    # breathing (6-36 breaths/min); its harmonics, sighs, speech; above any breathing: noise
    "resp": ((0.1, 0.6), (0.6, 2.0), (2.0, 8.0)),
}
R_PEAK_BAND_HZ = (5.0, 30.0)  # QRS energy: above P/T waves and baseline wander
MIN_RR_S = 0.33  # R-peaks at least this far apart (<= 180 bpm)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def heart_rate_bpm(x: np.ndarray, rate: float) -> np.ndarray:
    """x [B, T] ECG windows -> [B] heart rate from the median R-R interval, NaN with fewer than 3 R-peaks.

    Band-pass (R_PEAK_BAND_HZ) and square, so either QRS polarity works; a peak must reach 30% of the
    window's largest and be MIN_RR_S from the next. The median R-R survives one missed or extra beat.
    On this session it agreed with the same detector on the raw 1 kHz ECG within 3 bpm on every window.
    """
    hi = min(R_PEAK_BAND_HZ[1], 0.45 * rate)
    out = np.full(len(x), np.nan)
    if hi <= R_PEAK_BAND_HZ[0]:  # a rate too low to see a QRS complex
        return out
    sos = signal.butter(3, [R_PEAK_BAND_HZ[0], hi], btype="band", fs=rate, output="sos")
    energy = signal.sosfiltfilt(sos, x.astype(np.float64), axis=-1) ** 2
    for i, row in enumerate(energy):
        peaks, _ = signal.find_peaks(row, height=0.3 * row.max(), distance=math.ceil(MIN_RR_S * rate))
        if len(peaks) >= 3:
            out[i] = 60.0 * rate / float(np.median(np.diff(peaks)))
    return out


def classical_features(windows: dict[str, np.ndarray], rates: dict[str, float]) -> tuple[np.ndarray, list[str]]:
    """windows: modality -> [B, C, T] normalised context samples -> ([B, F] features, their names)."""
    cols, names = [], []
    for m, x in windows.items():
        x = x.astype(np.float64)
        rate, t = rates[m], x.shape[-1]
        tc = np.arange(t) / rate
        tc -= tc.mean()
        mean = x.mean(-1)
        slope = ((x - mean[..., None]) * tc).sum(-1) / (tc * tc).sum()  # least-squares slope, per second
        freqs, psd = signal.welch(x, fs=rate, nperseg=t, axis=-1)  # one Hann segment: 1/context_s resolution
        feats = {"mean": mean, "std": x.std(-1), "slope": slope}
        for lo, hi in BANDS_HZ.get(m, ()):
            hi = min(hi, rate / 2)
            sel = (freqs >= lo) & (freqs < hi)
            if lo < hi and sel.any():
                feats[f"logpow_{lo:g}-{hi:g}Hz"] = np.log10(psd[..., sel].sum(-1) * (freqs[1] - freqs[0]) + 1e-12)
        for c in range(x.shape[1]):
            for k, v in feats.items():
                cols.append(v[:, c])
                names.append(f"{m}[{c}].{k}")
        if m == "ecg":
            cols.append(heart_rate_bpm(x[:, 0], rate))
            names.append("ecg[0].heart_rate_bpm")
    return np.stack(cols, 1), names


@torch.no_grad()
def embeddings(model: torch.nn.Module, session: ProbeSession, starts: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """[W, d] frozen embeddings of the context windows at `starts`, every modality of the session together."""
    device = device_of(model)
    out = []
    for lo in range(0, len(starts), batch_size):
        chunk = starts[lo:lo + batch_size]
        b = len(chunk)
        inputs = {m: make_input(x, np.tile(session.chan_ids[m], (b, 1)),
                                np.ones(b, bool), device) for m, x in session.cut(chunk).items()}
        out.append(to_numpy(model.embed(inputs)))
    return np.concatenate(out) if out else np.zeros((0, model.cfg.dim), np.float32)


class EmbeddingCache:
    """Frozen embeddings by window start: the cuts score overlapping sets of the same labelled windows."""

    def __init__(self, model: torch.nn.Module, session: ProbeSession, batch_size: int = BATCH):
        self.model, self.session, self.batch_size = model, session, batch_size
        self.rows: dict[int, np.ndarray] = {}

    def __call__(self, starts: np.ndarray) -> np.ndarray:
        keys = [round(float(t) / self.session.grid_s) for t in starts]
        todo = sorted({k for k in keys if k not in self.rows})
        if todo:
            new = embeddings(self.model, self.session, np.array(todo) * self.session.grid_s, self.batch_size)
            self.rows.update(zip(todo, new, strict=True))
        return np.stack([self.rows[k] for k in keys]) if keys else np.zeros((0, self.model.cfg.dim), np.float32)


def _counts_of(task: TaskWindows) -> dict[str, dict[str, int]]:
    return {side: {cls: int((task.y[side] == k).sum()) for k, cls in enumerate(task.classes)} for side in ("train", "test")}


@dataclass
class CutScore:
    """One task scored at one time cut."""

    figures: dict[str, Any]  # what the task's `splits` holds for this cut
    draws: np.ndarray | None  # bootstrap draws of model - baseline; None when the cut cannot be scored
    fits: dict[str, dict[str, Any]]  # "model" / "baseline" -> decode()'s result, with the feature count
    baseline_features: list[str]


def score_cut(embed: EmbeddingCache, session: ProbeSession, task: TaskWindows, c: float = C, seed: int = 0) -> CutScore:
    """One cut of one task: both classifiers, the difference and its paired block-bootstrap interval."""
    counts = _counts_of(task)
    cut = session.split_s if task.cut_s is None else task.cut_s
    out: dict[str, Any] = {"cut_s": cut, "n_train": counts["train"], "n_test": counts["test"],
                           "test_seen_by_pretraining": float(np.mean(task.starts["test"] < session.split_s))
                           if len(task.starts["test"]) else None}
    empty = [f"{side}/{cls}" for side, n in counts.items() for cls, k in n.items() if k == 0]
    if empty:
        return CutScore({**out, "reason": f"no window of {empty}"}, None, {}, [])
    fits, names = {}, []
    for kind in ("model", "baseline"):
        feats = {}
        for side, starts in task.starts.items():
            if kind == "model":
                feats[side] = embed(starts)
            else:
                feats[side], names = classical_features(session.cut(starts), session.rates)
        fits[kind] = {**decode(feats, task, c), "n_features": int(feats["train"].shape[1])}
        out[kind] = fits[kind]["bacc"]
    test = task.starts["test"]
    block = max(1, round(BLOCK_S * len(test) / max(float(test[-1] - test[0]), BLOCK_S)))
    draws = block_resampled_diffs(balanced_accuracy, task.y["test"], fits["model"]["pred"], fits["baseline"]["pred"],
                                  block=block, n_boot=N_BOOT, seed=seed)
    lo, hi, skipped = interval_of_mean([draws])
    out.update(diff=out["model"] - out["baseline"], ci_low=lo, ci_high=hi, block_windows=block, skipped_resamples=skipped)
    return CutScore(out, draws, fits, names)


def task_result(session: ProbeSession, task: TaskWindows, at_split: CutScore, c: float = C) -> dict[str, Any]:
    """One task's result at the pretraining's split: balanced accuracy of the embedding and of the
    classical features, counts, labels."""
    counts = _counts_of(task)
    spans = {side: [float(s[0]), float(s[-1] + session.context_s)] if len(s) else None for side, s in task.starts.items()}
    out: dict[str, Any] = {
        "model": None, "baseline": None, "n_train": counts["train"], "n_test": counts["test"], "labels": task.labels,
        "chance": 0.5, "windows_s": spans, "rejected_windows": task.rejected, "dropped_at_split": task.dropped_at_split,
        "split": {"split_s": session.split_s, "guard_s": session.guard_s, "train_end_s": session.train_end_s,
                  "test_begin_s": session.test_begin_s, "context_s": session.context_s},
        "pretrained_on_session": session.pretrained_on, "classifier": f"impute median + standardise + logistic regression "
                                                                      f"(L2, C={c:g}, class_weight=balanced)"}
    if at_split.draws is None:
        empty = [f"{side}/{cls}" for side, n in counts.items() for cls, k in n.items() if k == 0]
        return {**out, "reason": f"no window of {empty}: both classes must occur on both sides of the split"}
    fits = at_split.fits
    out.update({kind: fits[kind]["bacc"] for kind in fits}, recall={kind: fits[kind]["recall"] for kind in fits},
               n_features={kind: fits[kind]["n_features"] for kind in fits}, baseline_features=at_split.baseline_features)
    return out


def probe(export_dir: str | Path, *, cache_dir: str = "", hop_s: float = 1.0, c: float = C, batch_size: int = BATCH,
          device: str = "cpu") -> dict[str, Any]:
    """Score a NeuroFM export's frozen embeddings on every labelled task: {task: {model, baseline, n_train,
    n_test, labels, ...}}. `hop_s` spaces the labelled windows (halved per task while a class has fewer than
    MIN_TEST_PER_CLASS test windows: `dense_hops`); `cache_dir` holds the sample packages."""
    from neuraflex_ray.checkpoint import load_exported

    model, meta = load_exported(export_dir, device=device)
    if not hasattr(model, "embed"):
        raise ConfigError(f"a {meta['model_type']} export has no window embeddings; the probe decodes them from a "
                          f"time-series foundation model (NeuroFM)")
    out: dict[str, Any] = {}
    missing = []
    for source in SOURCES.values():
        try:
            session = load_session(meta, source, cache_dir)
        except ConfigError as e:  # not pretrained on this recording: its channels have no embedding
            missing.append(f"{source.name} ({e})")
            continue
        out.update(probe_session(model, session, hop_s=hop_s, c=c, batch_size=batch_size))
    cases = probe_basic_motions(model, meta, cache_dir, c)
    if cases is not None:
        out[BASIC_MOTIONS] = cases
    else:
        missing.append("basic_motions (the export has no acc channels X, Y, Z)")
    if not out:
        raise ConfigError("the export was pretrained on none of the labelled recordings:\n  " + "\n  ".join(missing))
    for line in missing:
        print(f"[probe] skipped {line.split(' (')[0]}: the export was not pretrained on its recording", flush=True)
    return plain(out)


def probe_session(model: torch.nn.Module, session: ProbeSession, *, hop_s: float = 1.0, c: float = C,
                  batch_size: int = BATCH) -> dict[str, Any]:
    """{task: result} for every task of one labelled session: at the pretraining's split (the last of
    its cuts, scored once), and across the cuts."""
    embed = EmbeddingCache(model, session, batch_size)
    hops = dense_hops(session, hop_s)
    earlier = [{t.name: t for t in tasks_at(session, hops, cut)} for cut in session.cuts_s()[:-1]]
    out = {}
    for task in tasks_at(session, hops):
        at_split = score_cut(embed, session, task, c, seed=len(earlier))
        scores = [score_cut(embed, session, tasks[task.name], c, seed=k) for k, tasks in enumerate(earlier)]
        out[task.name] = {**task_result(session, task, at_split, c), "hop_s": hops[task.name],
                          **across_cuts([*scores, at_split])}
    return out


def across_cuts(scores: list[CutScore]) -> dict[str, Any]:
    """{"diff", "ci_low", "ci_high", "splits"}: model - baseline averaged over the cuts that can be
    scored, its interval from the cuts' bootstrap draws averaged draw by draw, and each cut's figures."""
    splits = [s.figures for s in scores]
    draws = [s.draws for s in scores if s.draws is not None]
    if not draws:
        return {"diff": None, "ci_low": None, "ci_high": None, "splits": splits}
    lo, hi, _ = interval_of_mean(draws)
    return {"diff": float(np.mean([f["diff"] for f in splits if "diff" in f])), "ci_low": lo, "ci_high": hi,
            "splits": splits}


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _counts(n: dict[str, int]) -> str:
    return " / ".join(f"{k} {v}" for k, v in n.items())


def format_table(result: dict[str, Any]) -> str:
    """A readable table of probe()'s result."""
    lines = ["NeuroFM frozen-embedding probe: logistic regression, balanced accuracy on held-out data (chance 1 / classes: "
             "0.5, BasicMotions 0.25)",
             f"{'task':<28} {'model':>7} {'baseline':>8}   {'train windows':<24} {'test windows':<24}"]
    for name, r in result.items():
        lines.append(f"{name:<28} {_num(r['model']):>7} {_num(r['baseline']):>8}   {_counts(r['n_train']):<24} "
                     f"{_counts(r['n_test']):<24}")
        if r.get("reason"):
            lines.append(f"    ({r['reason']})")
        if r.get("diff") is not None:
            spans = r["ci_low"] <= 0 <= r["ci_high"]
            lines.append(f"    model - baseline over {len(r['splits'])} time cuts: {r['diff']:+.3f} "
                         f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] 95% block bootstrap"
                         + (" (spans zero: no difference shown)" if spans else ""))
        lines.append(f"    labels: {r['labels']}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """The result as JSON at `path` (written whole or not at all)."""
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    return out
