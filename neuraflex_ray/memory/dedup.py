"""Liorhybrid's "librarian", measured: entries with the same next token whose keys are nearly equal
are merged into the first of them, whose count then carries their weight in p_kNN (so merging
changes the index's size, not the distribution a query sees, up to the merged keys' spread)."""

from __future__ import annotations

import math

import faiss
import numpy as np

PROBE_NEIGHBOURS = 8  # candidates per entry: its nearest keys in its own IVF cell


def merge_near_duplicates(keys: np.ndarray, values: np.ndarray, max_msd: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keep bool [n], counts int32 [n]) : an entry is dropped when an earlier entry with the same value
    lies within `max_msd` mean squared difference per dimension among its PROBE_NEIGHBOURS nearest (an
    IVF search of one cell: approximate, so some duplicates survive); its count goes to the earliest
    entry of its chain. counts[i] is the number of entries entry i stands for (0 where dropped)."""
    n, width = keys.shape
    parent = np.arange(n)
    if max_msd > 0 and n > 1:
        nlist = max(1, min(int(math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatL2(width)
        ivf = faiss.IndexIVFFlat(quantizer, width, nlist)
        sample = np.random.default_rng(seed).choice(n, size=min(n, 256 * nlist), replace=False)
        ivf.train(keys[np.sort(sample)])
        ivf.add(keys)
        ivf.nprobe = 1
        dist, idx = ivf.search(keys, min(PROBE_NEIGHBOURS, n))
        rows = np.arange(n)[:, None]
        safe = np.maximum(idx, 0)
        close = (idx >= 0) & (idx < rows) & (values[safe] == values[:, None]) & (dist <= max_msd * width)
        earliest = np.where(close, idx, n).min(1)
        parent = np.where(earliest < n, earliest, np.arange(n))
        while True:  # parent[i] < i, so chains end
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    keep = parent == np.arange(n)
    counts = np.bincount(parent, minlength=n).astype(np.int32)
    return keep, counts
