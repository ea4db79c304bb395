"""Confidence intervals by resampling whole units (documents, recordings), not single positions.

Neighbouring bytes of one document are not independent, so an interval over positions would be far
too narrow; resampling documents with replacement keeps each document's positions together.
"""

from __future__ import annotations

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


def target_documents(blocks: np.ndarray, eos: int) -> np.ndarray:
    """int [n, L - 1]: the held-out document of each predicted position of blocks [n, L] that hold a split's
    documents in order, each followed by `eos` (which belongs to the document it ends)."""
    flat = np.asarray(blocks).reshape(-1)
    doc = np.concatenate([[0], np.cumsum(flat[:-1] == eos)]).reshape(np.shape(blocks))
    return doc[:, 1:]
