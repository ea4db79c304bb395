"""The recordings with labels, and the rules that turn their protocol's events into labelled windows.

Each `ProbeSource` names a session of a sample set, where its events are (files of the recording's
own protocol, never the signals the model sees) and its tasks; `probe.py` scores every source whose
session the export was pretrained on.

- systole: systole==0.3.1's `Task1_{ECG,EDA,Respiration}.npy` (one participant, 1 kHz, 25.6 min)
  rating the valence of neutral and disgusting pictures (Legrand et al. 2020, Sci. Rep. 10, as
  systole's `import_dataset1` describes it). `Task1_Stim.npy` on the same clock is 0 except at the 72
  trial onsets (1 = neutral image, 2 = disgusting image): 6 blocks of 12 trials ~10.65 s apart, ~40 s
  of rest between blocks, ~400 s of rest before the first trial.
- fnirs_tapping: pyphysio==4.10.0's `fnirs.ph` (26 channels, HbO/HbR, 10.17 Hz, 14.4 min) and its
  `fnirs_tapping.ph` on the same samples: 31 finger-tapping blocks of 4.9 s, 15-37 s apart.
- fmri_events: nitime==0.12.1's `event_related_fmri.csv` (one BOLD series, TR 2 s, 112 min) and its
  `events` column: six event types x 96 trials, each on the scan where it happens.

Haemodynamic signals answer seconds late: their tasks label the window where the response is, not
where the event is (HRF_DELAY_S after the onset), and count as rest only windows clear of every
response (REST_AFTER_S after an event ends).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from neuraflex_ray.eval.probe_tasks import (
    EPS,
    ProbeSession,
    ProbeSource,
    TaskWindows,
    by_side,
    span_labels,
    span_windows,
)
from pipelines.fnirs import read_netcdf_series
from pipelines.neuro_samples import EVENT_FMRI_TR_S

STIM_FILE = "Task1_Stim.npy"
STIM_RATE = 1000.0  # Task1_Stim.npy is sampled with the ECG/EDA/respiration files, at 1 kHz from their first sample
HRF_DELAY_S = 2.0  # a haemodynamic response starts rising about this long after the event
HRF_TAIL_S = 6.0  # and is still up this long after the event ends
REST_AFTER_S = 15.0  # and back at baseline by this long after the event ends


# ---------------------------------------------------------------------------------------------
# systole: picture onsets
# ---------------------------------------------------------------------------------------------


def trial_blocks(onsets_s: np.ndarray) -> tuple[float, np.ndarray]:
    """(trial period, block spans [K, 2]): the period is the median onset-to-onset interval; a gap of more
    than two periods starts a new block; a block spans [first onset, last onset + period)."""
    gaps = np.diff(onsets_s)
    period = float(np.median(gaps))
    cuts = np.flatnonzero(gaps > 2 * period) + 1
    spans = [(b[0], b[-1] + period) for b in np.split(onsets_s, cuts)]
    return period, np.array(spans, dtype=np.float64)


TASK_VS_REST = "systole_task_vs_rest"
POST_VS_PRE = "systole_post_vs_pre_onset"


def task_vs_rest(session: ProbeSession, hop_s: float = 1.0, cut_s: float | None = None) -> TaskWindows:
    """Windows every hop_s: 'task' when the window lies inside a block of trials, 'rest' when it touches
    none (so no onset lies in the window nor in the trial period before it); windows that straddle a
    block's edge are left out."""
    period, spans = trial_blocks(session.onsets_s)
    starts, y = span_windows(session, spans, spans, hop_s)
    labels = (f"{STIM_FILE} onsets (systole==0.3.1, picture valence-rating task): trial period = median onset interval "
              f"({period:.2f} s); a block = onsets less than 2 periods apart, spanning [first onset, last onset + period) "
              f"({len(spans)} blocks); task = the {session.context_s:g} s window lies inside a block; rest = it overlaps "
              f"no block (no onset within it nor in the period before it); windows straddling a block edge are "
              f"unlabelled; hop {hop_s:g} s")
    return by_side(session, TASK_VS_REST, ("rest", "task"), labels, starts, y, cut_s)


def post_vs_pre_onset(session: ProbeSession, cut_s: float | None = None) -> TaskWindows:
    """Per image onset: 'post' = the window starting at the first grid time at or after the onset, 'pre' =
    the window ending at the last grid time at or before it (neither holds a sample from the other side)."""
    g, ctx = session.grid_s, session.context_s
    post = np.ceil(session.onsets_s / g - EPS) * g
    pre = np.floor(session.onsets_s / g + EPS) * g - ctx
    labels = (f"{STIM_FILE} onsets (systole==0.3.1, {len(session.onsets_s)} image onsets): post = the {ctx:g} s window "
              f"starting at the first sample at or after an onset, pre = the {ctx:g} s window ending at the last sample at "
              f"or before it (start grid {g:g} s)")
    starts = np.concatenate([pre, post])
    y = np.concatenate([np.zeros(len(pre), np.int64), np.ones(len(post), np.int64)])
    return by_side(session, POST_VS_PRE, ("pre", "post"), labels, starts, y, cut_s)


def systole_events(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stim = np.load(root / STIM_FILE)
    idx = np.flatnonzero(stim)
    return idx / STIM_RATE, stim[idx].astype(np.int64), np.zeros(len(idx))  # sample 0 = the streams' sample 0


# ---------------------------------------------------------------------------------------------
# Haemodynamic recordings: the response, not the event
# ---------------------------------------------------------------------------------------------


def response_vs_rest(session: ProbeSession, name: str, classes: tuple[str, str], what: str, hop_s: float,
                     cut_s: float | None) -> TaskWindows:
    """'response' when the window lies within [onset + HRF_DELAY_S, end + HRF_TAIL_S] of an event,
    'rest' when it overlaps no [onset, end + REST_AFTER_S]; the rest are unlabelled."""
    _, inside, clear = response_spans(classes)(session.onsets_s, session.durations_s)
    starts, y = span_windows(session, inside, clear, hop_s)
    labels = (f"{what}: {classes[1]} = the {session.context_s:g} s window lies within [onset + {HRF_DELAY_S:g} s, end "
              f"+ {HRF_TAIL_S:g} s] of an event (the haemodynamic response), {classes[0]} = it overlaps no [onset, end "
              f"+ {REST_AFTER_S:g} s]; the rest unlabelled; {len(session.onsets_s)} events; hop {hop_s:g} s")
    return by_side(session, name, classes, labels, starts, y, cut_s)


def response_spans(classes: tuple[str, str]) -> Callable[[np.ndarray, np.ndarray], tuple[tuple[str, str], np.ndarray,
                                                                                             np.ndarray]]:
    """The response rule as spans: inside [onset + HRF_DELAY_S, end + HRF_TAIL_S], clear of [onset, end +
    REST_AFTER_S] (`ProbeSource.phases`)."""
    def spans(onsets: np.ndarray, durations: np.ndarray) -> tuple[tuple[str, str], np.ndarray, np.ndarray]:
        ends = onsets + durations
        return classes, np.stack([onsets + HRF_DELAY_S, ends + HRF_TAIL_S], 1), np.stack([onsets, ends + REST_AFTER_S], 1)
    return spans


def block_spans(onsets: np.ndarray, durations: np.ndarray) -> tuple[tuple[str, str], np.ndarray, np.ndarray]:
    """systole's task-vs-rest rule as spans (`ProbeSource.phases`): a window inside a block of trials is
    'task', one clear of every block 'rest'."""
    spans = trial_blocks(onsets)[1]
    return ("rest", "task"), spans, spans


FNIRS_TAPPING = "fnirs_tapping_vs_rest"
FMRI_EVENT = "fmri_event_vs_none"


def fnirs_events(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tapping, rate = read_netcdf_series(str(root / "fnirs_tapping.ph"))  # on fnirs.ph's samples
    edges = np.diff(np.r_[0.0, (tapping > 0.5).astype(float), 0.0])
    on, off = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return on / rate, np.ones(len(on), np.int64), (off - on) / rate


def fmri_events(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    events = np.genfromtxt(root / "event_related_fmri.csv", delimiter=",", names=True)["events"].astype(np.int64)
    idx = np.flatnonzero(events)
    return idx * EVENT_FMRI_TR_S, events[idx], np.zeros(len(idx))  # an event is the scan it happens on


SOURCES: dict[str, ProbeSource] = {
    "systole": ProbeSource("systole", "systole", "systole_task1", systole_events,
                           lambda s, hop_s, cut_s: [task_vs_rest(s, hop_s, cut_s), post_vs_pre_onset(s, cut_s)],
                           block_spans),
    "fnirs_tapping": ProbeSource(
        "fnirs_tapping", "pyphysio", "pyphysio_fnirs", fnirs_events,
        lambda s, hop_s, cut_s: [response_vs_rest(s, FNIRS_TAPPING, ("rest", "tapping"),
                                                  "fnirs_tapping.ph blocks (pyphysio==4.10.0)", hop_s, cut_s)],
        response_spans(("rest", "tapping"))),
    "fmri_events": ProbeSource(
        "fmri_events", "nitime_events", "nitime_event_fmri", fmri_events,
        lambda s, hop_s, cut_s: [response_vs_rest(s, FMRI_EVENT, ("none", "event"),
                                                  "event_related_fmri.csv events (nitime==0.12.1)", hop_s, cut_s)],
        response_spans(("none", "event"))),
}
SYSTOLE = SOURCES["systole"]


def window_phases(recordings: np.ndarray, starts_s: np.ndarray, context_s: float, cache_dir: str = "") -> np.ndarray:
    """Each window's stimulus phase, "<source>: <class>" (for example "systole: task"), by its source's
    `phases` rule, where the recording is a labelled source's session; "" elsewhere and where the rule
    leaves the window unlabelled. `starts_s` are on the clock of the session's files (the dataset's
    start_s column), which the sources' events are on too."""
    recordings = np.asarray(recordings).astype(str)
    out = np.full(len(recordings), "", dtype=object)
    for source in SOURCES.values():
        rows = np.flatnonzero(recordings == source.session)
        if not len(rows) or source.phases is None:
            continue
        onsets, _, durations = source.read_events(cache_dir)
        classes, inside, clear = source.phases(np.asarray(onsets, np.float64), np.asarray(durations, np.float64))
        y = span_labels(np.asarray(starts_s, np.float64)[rows], context_s, inside, clear)
        out[rows] = [f"{source.name}: {classes[v]}" if v >= 0 else "" for v in y]
    return out
