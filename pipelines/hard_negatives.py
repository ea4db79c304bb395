"""Training windows ordered so that a batch holds hard negatives (`data.hard_negatives`).

The cross-modal contrastive loss asks a window seen through one modality to pick the same window
seen through another, among the batch's other windows. Windows of other recordings are easy to tell
apart (another person, another sensor); windows of the same recording a few seconds away are not,
and telling them apart is what makes an embedding specific to its window. So the training split is
written as units of `run` windows: a unit is `run` windows of one recording whose starts lie
MIN_GAP_S to MAX_GAP_S apart (neighbours within seconds overlap too much to be told apart; beyond
20 s they are ordinary negatives), and the windows left over are grouped `run` at a time. Units are
shuffled (seeded) and laid end to end, so with a batch size that is a multiple of `run` every unit
lands whole in one batch, and on one rank's slice when the micro-batch is a multiple of it too.
"""

from __future__ import annotations

import numpy as np

MIN_GAP_S, MAX_GAP_S = 4.0, 20.0


def runs_of(starts: list[float], run: int, hop_s: float) -> tuple[list[list[float]], list[float]]:
    """(runs of `run` starts spaced MIN_GAP_S..MAX_GAP_S apart, the starts left over) of one recording.

    Starts are taken every `stride` windows (stride x hop >= MIN_GAP_S), so a run's neighbours are
    one stride apart; a run ends early where a gap (a rejected window, the split) exceeds MAX_GAP_S."""
    ordered = sorted(starts)
    stride = max(1, int(np.ceil(MIN_GAP_S / hop_s - 1e-9)))
    runs, left = [], []
    for offset in range(stride):
        current: list[float] = []
        for t in ordered[offset::stride]:
            if current and not (MIN_GAP_S - 1e-9 <= t - current[-1] <= MAX_GAP_S + 1e-9):
                left += current
                current = []
            current.append(t)
            if len(current) == run:
                runs.append(current)
                current = []
        left += current
    return runs, left


def hard_negative_order(windows: list[tuple[str, float]], run: int, hop_s: float,
                        rng: np.random.Generator) -> list[tuple[str, float]]:
    """The training windows [(recording, start)] as shuffled units of `run` (see the module docstring)."""
    by_recording: dict[str, list[float]] = {}
    for name, t in windows:
        by_recording.setdefault(name, []).append(t)
    units: list[list[tuple[str, float]]] = []
    left: list[tuple[str, float]] = []
    for name in sorted(by_recording):
        runs, rest = runs_of(by_recording[name], run, hop_s)
        units += [[(name, t) for t in r] for r in runs]
        left += [(name, t) for t in rest]
    left = [left[i] for i in rng.permutation(len(left))]
    full = len(left) // run * run
    units += [left[i:i + run] for i in range(0, full, run)]
    order = [w for i in rng.permutation(len(units)) for w in units[i]]
    return order + left[full:]  # the last ragged unit at the end, where a dropped last batch takes it
