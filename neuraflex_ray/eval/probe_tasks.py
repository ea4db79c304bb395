"""Labelled windows for the frozen-embedding probe (`probe.py`): a recording's session as the
pretraining prepared it, and its labelled windows split at a time cut.

Which recordings have labels, where the labels come from and the rules that turn them into windows
are in `probe_labels.py` (a `ProbeSource` each); labels come from the recordings' own protocol,
never from the signals the model sees.

The arrays are the pretraining's own: `prepare_session` (pipelines/series_prep.py) with a plan rebuilt
from the export's config.json["data"] gives the same resampling, the same time split and the same
train-part normalisation (checked against the export's norm_stats and split when it holds them). The
probe keeps to that split: probe-train windows lie wholly before split - guard (the part the model was
pre-trained on), probe-test windows wholly after split + guard (held out from pretraining too), so no
window of one side overlaps a window of the other and the classifier never sees a test window. The
earlier time cuts (`ProbeSession.cuts_s`) keep the same guard around themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from neuraflex_ray.config import ConfigError, ModalitySpec, SeriesDataConfig
from pipelines.neuro_samples import sample_sources
from pipelines.series_prep import MAX_DENOMINATOR, plan_layout, prepare_session

EPS = 1e-6  # seconds: slack for float window times that lie on the sample grid
CUT_STEP = 0.1  # the earlier time cuts lie this share of the session before the pretraining's split
# Issue 27: test sets of at least this many windows per class where the data holds them. Windows closer
# than the context overlap, so a finer hop adds windows, not independent evidence: the block bootstrap's
# blocks span the same seconds whatever the hop, which keeps the interval honest about that.
MIN_TEST_PER_CLASS = 40
MIN_HOP_S = 0.25  # no finer than this (and never finer than the session's sample grid)


@dataclass(frozen=True)
class ProbeSource:
    """A recording with labels: its sample set and session, where its events are, and its tasks."""

    name: str
    sample_set: str
    session: str  # the session name sample_sources(sample_set) gives
    # (the sample set's cache directory) -> (onsets s, codes, durations s), on the clock of the session's
    # files (0 = their first sample)
    events: Callable[[Path], tuple[np.ndarray, np.ndarray, np.ndarray]]
    tasks: Callable[[ProbeSession, float, float | None], list[TaskWindows]]  # (session, hop_s, cut_s)
    # (onsets s, durations s) -> (classes, inside [K, 2], clear [K, 2]): the source's stimulus phase of any
    # window (`span_labels`), the rule of its first task, for labels of windows the probe did not choose
    phases: Callable[[np.ndarray, np.ndarray], tuple[tuple[str, str], np.ndarray, np.ndarray]] | None = None

    def read_events(self, cache_dir: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(onsets s, codes, durations s) on the clock of the session's files."""
        first = next(s for s in sample_sources(self.sample_set, cache_dir) if s.session == self.session)
        return self.events(Path(first.path).parent)


@dataclass
class ProbeSession:
    """The session's normalised arrays on the session clock (0 = first common sample) and its events."""

    arrays: dict[str, np.ndarray]  # modality -> float32 [C, N] at rates[m]
    rates: dict[str, float]
    chan_ids: dict[str, np.ndarray]  # modality -> int64 [C], the export's channel ids
    context_s: float  # the model's context: context_patches * patch_s
    grid_s: float  # every window starts on a multiple of this: the finest grid on which every modality has a sample
    duration_s: float
    split_s: float  # session clock; the pretraining's split
    guard_s: float  # no window within this of the split, either side
    reject_abs_z: float  # the pretraining's artifact rule (0: none)
    onsets_s: np.ndarray  # event onsets, session clock
    onset_codes: np.ndarray  # what each event is (the source's codes)
    pretrained_on: bool | None  # the export's norm_stats name this session (None: the export does not say)
    source: ProbeSource | None = None
    durations_s: np.ndarray | None = None  # how long each event lasts (None: instants)

    @property
    def train_end_s(self) -> float:
        return self.split_s - self.guard_s

    @property
    def test_begin_s(self) -> float:
        return self.split_s + self.guard_s

    def context_samples(self, m: str) -> int:
        return round(self.context_s * self.rates[m])

    def cut(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """Context windows starting at `starts` (s): modality -> float32 [B, C, T_m]."""
        out = {}
        for m, a in self.arrays.items():
            first = np.round(np.asarray(starts) * self.rates[m]).astype(np.int64)
            out[m] = a[:, first[:, None] + np.arange(self.context_samples(m))].transpose(1, 0, 2)
        return out

    def cuts_s(self) -> list[float]:
        """The time cuts every probe is scored on: the pretraining's split and CUT_STEP x the session's
        length before it, twice (train on what precedes a cut, test on what follows)."""
        step = CUT_STEP * self.duration_s
        return [self.split_s - 2 * step, self.split_s - step, self.split_s]

    def side(self, starts: np.ndarray, cut_s: float | None = None) -> np.ndarray:
        """'train', 'test' or '' (the window reaches into the guard around the cut, default the
        pretraining's split, or past the end) per window start."""
        cut = self.split_s if cut_s is None else cut_s
        starts = np.asarray(starts, dtype=np.float64)
        end = starts + self.context_s
        train = (starts >= -EPS) & (end <= cut - self.guard_s + EPS)
        test = (starts >= cut + self.guard_s - EPS) & (end <= self.duration_s + EPS)
        return np.where(train, "train", np.where(test, "test", ""))


@dataclass
class TaskWindows:
    """One labelled task: window starts (s, session clock) and labels (index into `classes`) per side."""

    name: str
    classes: tuple[str, str]
    labels: str  # where the labels come from, and the rule
    starts: dict[str, np.ndarray]  # "train" / "test" -> float64 [W], sorted
    y: dict[str, np.ndarray]  # "train" / "test" -> int64 [W]
    rejected: dict[str, int]  # windows dropped by the artifact rule, per side
    dropped_at_split: int  # labelled windows that reach into the guard around the split
    cut_s: float | None = None  # the time cut the sides are split at (None: the pretraining's split)


# ---------------------------------------------------------------------------------------------
# The session, as the pretraining prepared it
# ---------------------------------------------------------------------------------------------


def data_config_from_export(meta: dict[str, Any]) -> SeriesDataConfig:
    """The export's dataset layout as a SeriesDataConfig (only what shapes the windows and the split)."""
    data = meta.get("data") or {}
    dc = data.get("data_config") or {}
    missing = [k for k in ("modalities", "channel_ids", "context_s", "patch_s", "horizons_s", "hop_s") if k not in data]
    missing += [f"data_config.{k}" for k in ("val_fraction", "reject_abs_z") if k not in dc]
    if missing:
        raise ConfigError(f"the export's config.json['data'] lacks {missing}: the probe needs the dataset's layout and "
                          f"split to keep to the pretraining's held-out part; re-export the checkpoint with "
                          f"`neuraflex-ray export` (it keeps them)")
    return SeriesDataConfig(
        samples=[], modalities={m: ModalitySpec(rate=float(s["rate"]), max_channels=int(s["max_channels"]))
                                for m, s in data["modalities"].items()},
        context_s=float(data["context_s"]), horizons_s=[float(h) for h in data["horizons_s"]],
        hop_s=float(data["hop_s"]), patch_s=float(data["patch_s"]), val_fraction=float(dc["val_fraction"]),
        reject_abs_z=float(dc["reject_abs_z"]))


def sample_grid_s(rates: list[float]) -> float:
    """Smallest step that is a whole number of samples at every rate (1/16 s for 128 and 16 Hz)."""
    fr = [Fraction(r).limit_denominator(MAX_DENOMINATOR) for r in rates]  # period of rate p/q is q/p
    return float(Fraction(math.lcm(*(f.denominator for f in fr)), math.gcd(*(f.numerator for f in fr))))


def load_session(meta: dict[str, Any], source: ProbeSource, cache_dir: str = "") -> ProbeSession:
    """The source's session prepared exactly as for pretraining, plus its events.

    Raises ConfigError when the export does not know a stream's modality or channel (its channel
    embedding would be missing), and ValueError when the prepared session contradicts the export's
    record of it (other normalisation or split: the probe would not be on the pretraining's split).
    """
    cfg = data_config_from_export(meta)
    plan = plan_layout(cfg)
    ids: dict[str, int] = meta["data"]["channel_ids"]
    sources = [s for s in sample_sources(source.sample_set, cache_dir) if s.session == source.session]
    # Modalities first (a source may name no channels: they come from its file), channels once read.
    unknown = sorted({s.modality for s in sources if s.modality not in plan["modalities"]})
    unknown += [f"{s.modality}:{c}" for s in sources for c in s.channels
                if s.modality in plan["modalities"] and f"{s.modality}:{c}" not in ids]
    if not unknown:
        row = {"session": source.session, "sources": json.dumps([dataclasses.asdict(s) for s in sources])}
        out = prepare_session(row, plan)
        prep = json.loads(out["meta"])
        if prep["skipped"] or not out["payload"]:
            raise ValueError(f"session {source.session!r} could not be prepared: {prep['skipped'] or prep.get('short_s')}")
        unknown = [f"{m}:{c}" for m, mod in prep["modalities"].items() for c in mod["channels"] if f"{m}:{c}" not in ids]
    if unknown:
        raise ConfigError(f"the export was not trained with {unknown} of session {source.session!r} (its "
                          f"channel_ids: {sorted(ids)}); the probe needs a NeuroFM trained with data.samples including "
                          f"{source.sample_set}")
    arrays = pickle.loads(out["payload"])
    _check_against_export(meta["data"], prep, source.session)
    start = float(prep["start_s"])
    onsets, codes, durations = source.read_events(cache_dir)
    rates = {m: float(plan["modalities"][m]["rate"]) for m in arrays}
    return ProbeSession(
        arrays=arrays, rates=rates,
        chan_ids={m: np.array([ids[f"{m}:{c}"] for c in prep["modalities"][m]["channels"]], np.int64) for m in arrays},
        context_s=plan["context_patches"] * plan["patch_s"], grid_s=sample_grid_s(list(rates.values())),
        duration_s=min(a.shape[1] / rates[m] for m, a in arrays.items()),
        split_s=float(prep["split_s"]) - start,  # prepare_session's split_s is on the file clock, like start_s
        guard_s=float(prep["split_guard_s"]), reject_abs_z=float(plan["reject_abs_z"] or 0.0),
        onsets_s=np.asarray(onsets, np.float64) - start, onset_codes=np.asarray(codes, np.int64),
        pretrained_on=source.session in meta["data"]["norm_stats"] if "norm_stats" in meta["data"] else None,
        source=source, durations_s=np.asarray(durations, np.float64))


def _check_against_export(data: dict[str, Any], prep: dict[str, Any], session: str) -> None:
    """The export's own record of the session (when it has one) must match what was just prepared."""
    stats = data.get("norm_stats", {}).get(session)
    if stats is not None:
        for m, s in prep["norm_stats"].items():
            ref = stats.get(m)
            if ref is None or not (np.allclose(ref["mean"], s["mean"], rtol=1e-9, atol=0)
                                   and np.allclose(ref["std"], s["std"], rtol=1e-9, atol=0)):
                raise ValueError(f"{session!r}/{m}: the normalisation differs from the one the export was trained with; "
                                 f"the probe's inputs would not be the pretraining's")
    for rec in data.get("recordings", []):
        if rec["name"] == session and (abs(rec["split_s"] - prep["split_s"]) > EPS
                                       or abs(rec["split_guard_s"] - prep["split_guard_s"]) > EPS):
            raise ValueError(f"{session!r}: split {prep['split_s']} s (guard {prep['split_guard_s']} s) differs from the "
                             f"pretraining's {rec['split_s']} s (guard {rec['split_guard_s']} s)")


# ---------------------------------------------------------------------------------------------
# Labelled windows -> sides of a cut
# ---------------------------------------------------------------------------------------------


def span_windows(session: ProbeSession, inside: np.ndarray, clear: np.ndarray,
                 hop_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(starts, labels) of windows every hop_s: 1 when the window lies inside one of the `inside` spans
    [K, 2], 0 when it overlaps none of the `clear` spans, unlabelled (left out) otherwise."""
    g, ctx = session.grid_s, session.context_s
    hop = max(1, round(hop_s / g)) * g
    starts = np.round(np.arange(math.floor((session.duration_s - ctx) / hop + EPS) + 1) * hop / g) * g
    y = span_labels(starts, ctx, inside, clear)
    keep = y >= 0
    return starts[keep], y[keep]


def span_labels(starts: np.ndarray, context_s: float, inside: np.ndarray, clear: np.ndarray) -> np.ndarray:
    """Per window [start, start + context_s): 1 when it lies inside one of the `inside` spans [K, 2], 0
    when it overlaps none of the `clear` spans, -1 (unlabelled) otherwise."""
    starts = np.asarray(starts, np.float64)
    ends = starts + context_s
    inside_any = ((inside[:, 0] <= starts[:, None] + EPS) & (ends[:, None] <= inside[:, 1] + EPS)).any(1)
    clear_all = ((ends[:, None] <= clear[:, 0] + EPS) | (starts[:, None] >= clear[:, 1] - EPS)).all(1)
    return np.where(inside_any, 1, np.where(clear_all, 0, -1)).astype(np.int64)


def by_side(session: ProbeSession, name: str, classes: tuple[str, str], labels: str, starts: np.ndarray,
             y: np.ndarray, cut_s: float | None = None) -> TaskWindows:
    """Labelled windows -> per side of the cut (windows touching its guard dropped), then the
    pretraining's artifact rule (a window with any |normalised sample| > reject_abs_z is dropped,
    the same rule on both sides)."""
    side = session.side(starts, cut_s)
    out_starts, out_y, rejected = {}, {}, {}
    for part in ("train", "test"):
        sel = side == part
        s, lab = starts[sel], y[sel]
        order = np.argsort(s, kind="stable")
        s, lab = s[order], lab[order]
        ok = _clean(session, s)
        out_starts[part], out_y[part], rejected[part] = s[ok], lab[ok], int((~ok).sum())
    return TaskWindows(name, classes, labels, out_starts, out_y, rejected, int((side == "").sum()), cut_s)


def _clean(session: ProbeSession, starts: np.ndarray) -> np.ndarray:
    ok = np.ones(len(starts), bool)
    if not session.reject_abs_z or not len(starts):
        return ok
    for x in session.cut(starts).values():
        ok &= np.abs(x).max(axis=(1, 2)) <= session.reject_abs_z
    return ok


def all_tasks(session: ProbeSession, hop_s: float = 1.0, cut_s: float | None = None) -> list[TaskWindows]:
    """Every labelled task of the session's source, split at `cut_s` (default: the pretraining's split)."""
    return session.source.tasks(session, hop_s, cut_s)


def _fewest_test(task: TaskWindows) -> int:
    return min(int((task.y["test"] == k).sum()) for k in range(len(task.classes)))


def dense_hops(session: ProbeSession, hop_s: float = 1.0, min_per_class: int = MIN_TEST_PER_CLASS) -> dict[str, float]:
    """{task: hop_s} per task: the largest of hop_s, hop_s / 2, ... at which every class holds
    `min_per_class` test windows at the pretraining's split; where none does, the finest hop that still
    added windows (the grid and MIN_HOP_S bound it; a task whose windows do not depend on the hop keeps
    hop_s)."""
    finest = max(session.grid_s, MIN_HOP_S)
    hops, fewest = {}, {}
    hop = hop_s
    while True:
        for task in all_tasks(session, hop):
            n = _fewest_test(task)
            if task.name not in hops or (fewest[task.name] < min_per_class and n > fewest[task.name]):
                hops[task.name], fewest[task.name] = hop, n
        if hop / 2 < finest - EPS or all(n >= min_per_class for n in fewest.values()):
            return hops
        hop /= 2


def tasks_at(session: ProbeSession, hops: dict[str, float], cut_s: float | None = None) -> list[TaskWindows]:
    """Every labelled task split at `cut_s`, each at its own hop (`dense_hops`)."""
    return [t for hop in sorted(set(hops.values()), reverse=True) for t in all_tasks(session, hop, cut_s)
            if hops[t.name] == hop]
