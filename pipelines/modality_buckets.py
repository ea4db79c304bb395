"""Training batches of windows that hold the same modalities (`data.batch_by_modality`).

A mixed dataset's windows differ in what they hold: one recording gives EEG alone, another ECG + EDA
+ respiration, a third 64 EEG channels. A batch is padded to the union of its windows: every modality
any window holds is encoded for every window, and every channel up to the widest. In the debug
datasets' random 16-window batches most of the encoder's work went to padding (MFU counts only the
valid tokens, so it read 3-11 %). Grouping windows by (modality, channel count) signature before
batching removes the padding: each global batch is one signature. It also made the held-out tests
worse, and the model now skips padded channels itself (`neuraflex_ray/models/neurofm_rows.py`), so
it is off by default (`benchmarks/RESULTS.md`, Training throughput).

The order is a pure function of the input order: every rank regroups the same global stream the same
way, so ranks agree on each batch's modality set (FSDP needs that), and a resumed run that skips the
first k regrouped batches lands on the same data. Windows left in part-filled groups at the end of an
epoch are batched together, mixed, and a last ragged batch is dropped as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from pipelines.timeseries import SeriesArrays

Row = dict[str, tuple[np.ndarray, np.ndarray, bool]]  # modality -> (x, chan, present) of one window


def signature(arrays: dict[str, SeriesArrays], i: int) -> tuple[tuple[str, int], ...]:
    """Window i's (modality, valid channels) pairs, for the modalities it holds."""
    return tuple((m, int((a.chan[i] > 0).sum())) for m, a in arrays.items() if a.present[i])


def _stack(rows: list[Row]) -> dict[str, SeriesArrays]:
    return {m: SeriesArrays(x=np.stack([r[m][0] for r in rows]), chan=np.stack([r[m][1] for r in rows]),
                            present=np.array([r[m][2] for r in rows], dtype=bool))
            for m in rows[0]}


def bucket_by_modality(batches: Iterable[dict[str, SeriesArrays]], size: int) -> Iterator[dict[str, SeriesArrays]]:
    """Regroup a stream of global batches into batches of `size` windows of one signature each."""
    groups: dict[tuple[tuple[str, int], ...], list[Row]] = {}
    for arrays in batches:
        for i in range(len(next(iter(arrays.values())).present)):
            rows = groups.setdefault(signature(arrays, i), [])
            rows.append({m: (a.x[i], a.chan[i], bool(a.present[i])) for m, a in arrays.items()})
            if len(rows) == size:
                yield _stack(rows)
                rows.clear()
    rest = [row for rows in groups.values() for row in rows]  # groups in first-seen order: deterministic
    for start in range(0, len(rest) - size + 1, size):
        yield _stack(rest[start:start + size])
