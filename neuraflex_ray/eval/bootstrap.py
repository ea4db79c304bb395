"""Confidence intervals by resampling whole units (documents, recordings, runs of windows), not single positions.

Neighbouring bytes of one document are not independent, so an interval over positions would be far
too narrow; resampling documents with replacement keeps each document's positions together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def ratio_interval(num: np.ndarray, den: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile interval of sum(num) / sum(den) when the groups (e.g. documents) are resampled with
    replacement. num, den, groups: one entry per position; groups: any integer labels."""
    _, g = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    n_groups = int(g.max()) + 1 if g.size else 0
    if n_groups < 2:
        raise ValueError(f"a bootstrap over groups needs at least 2 of them (got {n_groups})")
    num_g = np.bincount(g, weights=np.asarray(num, dtype=np.float64).ravel(), minlength=n_groups)
    den_g = np.bincount(g, weights=np.asarray(den, dtype=np.float64).ravel(), minlength=n_groups)
    picks = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    ratios = num_g[picks].sum(1) / np.maximum(den_g[picks].sum(1), 1e-12)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def block_resampled_diffs(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, pred_a: np.ndarray,
                          pred_b: np.ndarray, *, block: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot] metric(a) - metric(b) on paired moving-block resamples of one time-ordered test set
    (Kuensch 1989): both predictions are scored on the same resampled windows, drawn as runs of
    `block` consecutive windows so that neighbouring windows, which overlap and share slow physiology,
    stay together. NaN where `metric` cannot score a resample (it returns NaN or raises ValueError,
    say with one class missing)."""
    y, pred_a, pred_b = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    n = len(y)
    if n < 2 or not (len(pred_a) == len(pred_b) == n):
        raise ValueError(f"need >= 2 windows and one prediction of each per window (got {n}, {len(pred_a)}, {len(pred_b)})")
    block = int(min(max(1, block), n))
    starts = np.random.default_rng(seed).integers(0, n - block + 1, size=(n_boot, -(-n // block)))
    picks = (starts[..., None] + np.arange(block)).reshape(n_boot, -1)[:, :n]
    diffs = np.full(n_boot, np.nan)
    for i, idx in enumerate(picks):
        try:
            diffs[i] = metric(y[idx], pred_a[idx]) - metric(y[idx], pred_b[idx])
        except ValueError:
            pass
    return diffs


def interval_of_mean(draws: list[np.ndarray], *, level: float = 0.95) -> tuple[float, float, int]:
    """(low, high, skipped): percentile interval of the mean over several estimates' bootstrap draws
    ([n_boot] each, resampled independently, draw i of each averaged); draws with a NaN are left out."""
    mean = np.mean(np.stack(draws), 0)
    ok = mean[np.isfinite(mean)]
    if len(ok) < len(mean) // 2:
        raise ValueError(f"only {len(ok)} of {len(mean)} resamples could be scored: the test set is too small or one-sided")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ok, [tail, 100 - tail])
    return float(lo), float(hi), int(len(mean) - len(ok))


def paired_block_interval(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, pred_a: np.ndarray,
                          pred_b: np.ndarray, *, block: int, n_boot: int = 2000, level: float = 0.95,
                          seed: int = 0) -> dict[str, float]:
    """metric(y, pred_a) - metric(y, pred_b) with its paired moving-block bootstrap interval
    (block_resampled_diffs); resamples that cannot be scored are left out and counted.

    Returns {"diff", "ci_low", "ci_high", "block", "n_boot", "skipped"}."""
    draws = block_resampled_diffs(metric, y, pred_a, pred_b, block=block, n_boot=n_boot, seed=seed)
    lo, hi, skipped = interval_of_mean([draws], level=level)
    return {"diff": float(metric(np.asarray(y), np.asarray(pred_a)) - metric(np.asarray(y), np.asarray(pred_b))),
            "ci_low": lo, "ci_high": hi, "block": int(min(max(1, block), len(y))), "n_boot": n_boot, "skipped": skipped}
