"""Bootstrap intervals (eval/bootstrap.py) on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from neuraflex_ray.eval.bootstrap import paired_block_interval


def _mean_of_pred(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(pred))


def test_identical_predictions_differ_by_exactly_zero():
    y = np.arange(50) % 2
    pred = (np.arange(50) % 3 == 0).astype(int)
    r = paired_block_interval(lambda t, p: float(np.mean(t == p)), y, pred, pred, block=5)
    assert r["diff"] == r["ci_low"] == r["ci_high"] == 0.0


def test_independent_windows_give_the_normal_theory_interval():
    """With block 1 and a mean, the bootstrap interval is mean +- 1.96 sd / sqrt(n) to a few percent."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 400)
    r = paired_block_interval(_mean_of_pred, np.zeros(400), x, np.zeros(400), block=1, n_boot=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(400)
    assert r["diff"] == pytest.approx(x.mean())
    assert r["ci_low"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert r["ci_high"] == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_blocks_widen_the_interval_of_autocorrelated_windows():
    """Neighbouring windows of a slow signal are not independent: resampling single windows would
    claim too much. On an AR(1) series with phi 0.95 the block interval is several times wider, and
    close to the true spread of the mean over many independent series."""
    rng = np.random.default_rng(1)

    def series(n: int = 600) -> np.ndarray:
        x = np.zeros(n)
        for t in range(1, n):
            x[t] = 0.95 * x[t - 1] + rng.normal()
        return x

    x = series()
    zeros = np.zeros_like(x)
    narrow = paired_block_interval(_mean_of_pred, zeros, x, zeros, block=1)
    wide = paired_block_interval(_mean_of_pred, zeros, x, zeros, block=60)
    width_narrow, width_wide = narrow["ci_high"] - narrow["ci_low"], wide["ci_high"] - wide["ci_low"]
    assert width_wide > 3 * width_narrow
    true_width = 2 * 1.96 * np.std([series().mean() for _ in range(300)])
    assert 0.5 * true_width < width_wide < 1.5 * true_width


def test_unscorable_resamples_are_skipped_and_counted():
    def needs_both_classes(y: np.ndarray, pred: np.ndarray) -> float:
        if len(np.unique(y)) < 2:
            raise ValueError("one class")
        return float(np.mean(y == pred))

    y = np.r_[np.zeros(30, int), np.ones(30, int)]  # long single-class runs: a block resample can miss one
    r = paired_block_interval(needs_both_classes, y, y, 1 - y, block=25, n_boot=500)
    assert r["diff"] == 1.0 and r["skipped"] > 0 and r["ci_low"] == r["ci_high"] == 1.0
    rare = np.r_[np.zeros(58, int), np.ones(2, int)]  # most resamples never see the rare class
    with pytest.raises(ValueError, match="could be scored"):
        paired_block_interval(needs_both_classes, rare, rare, 1 - rare, block=20, n_boot=200)
