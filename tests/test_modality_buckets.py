"""Training batches regrouped by modality set (pipelines/modality_buckets.py): no padding, nothing
repeated, nothing lost but a ragged tail, and the same order on every call (ranks and resumes agree)."""

from __future__ import annotations

import numpy as np

from pipelines.modality_buckets import bucket_by_modality, signature
from pipelines.timeseries import SeriesArrays


def stream(n_batches: int = 7, size: int = 8, seed: int = 0) -> list[dict[str, SeriesArrays]]:
    """Global batches of mixed windows: EEG with 1 or 3 channels, ECG + EDA together, or EDA alone.
    Each window's id is written into its first EEG/ECG/EDA sample so it can be followed."""
    rng = np.random.default_rng(seed)
    out, wid = [], 0
    for _ in range(n_batches):
        kinds = rng.integers(0, 4, size)
        mods = {m: SeriesArrays(np.zeros((size, 3, 16), np.float32), np.zeros((size, 3), np.int64), np.zeros(size, bool))
                for m in ("eeg", "ecg", "eda")}
        for i, k in enumerate(kinds):
            held = {0: {"eeg": 1}, 1: {"eeg": 3}, 2: {"ecg": 1, "eda": 1}, 3: {"eda": 1}}[int(k)]
            for m, c in held.items():
                mods[m].present[i] = True
                mods[m].chan[i, :c] = np.arange(1, c + 1)
                mods[m].x[i, 0, 0] = wid
            wid += 1
        out.append(mods)
    return out


def window_ids(batch: dict[str, SeriesArrays]) -> list[int]:
    return [int(next(a.x[i, 0, 0] for a in batch.values() if a.present[i]))
            for i in range(len(batch["eeg"].present))]


def test_batches_hold_one_modality_set_and_every_window_once():
    size, src = 8, stream()
    out = list(bucket_by_modality(src, size))
    assert all(len(b["eeg"].present) == size for b in out)
    sigs = [{signature(b, i) for i in range(size)} for b in out]
    # Only the end-of-epoch leftovers may be mixed: under 4 signatures x 7 windows, so the last 3 batches.
    assert all(len(s) == 1 for s in sigs[:-3]) and len(out) > 3, sigs
    assert any(len(s) > 1 for s in sigs[-3:]), sigs  # (the stream does leave some)
    ids = [w for b in out for w in window_ids(b)]
    assert len(ids) == len(set(ids))  # nothing repeated
    assert 7 * size - len(ids) < size  # nothing lost but a ragged tail
    again = [window_ids(b) for b in bucket_by_modality(stream(), size)]
    assert again == [window_ids(b) for b in out]  # a pure function of the input order


def test_a_batch_keeps_each_window_whole():
    out = list(bucket_by_modality(stream(), 8))
    src = {w: (i, b) for b in stream() for i, w in enumerate(window_ids(b))}
    for batch in out:
        for i, w in enumerate(window_ids(batch)):
            j, orig = src[w]
            for m in batch:
                assert batch[m].present[i] == orig[m].present[j]
                assert np.array_equal(batch[m].chan[i], orig[m].chan[j]) and np.array_equal(batch[m].x[i], orig[m].x[j])
