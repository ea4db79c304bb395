"""How a time-series file is read: a `Source` (what to read, cheap, picklable) becomes a `Stream`.

    RecordingSpec (a user's file) or a sample set (pipelines/neuro_samples.py) --> Source
    Source --read_source (inside Ray tasks)--> Stream [C, N]

A `Stream` is one modality's channels from one file at the file's own rate, with its start on the
session clock. Anything wrong with a file (rate missing or contradicting the spec, NaN/inf, a channel
count that does not match, a file that cannot be read) raises `BadRecording`, naming the file, the
problem and the fix.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import os
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pyedflib

from neuraflex_ray.config import ModalitySpec, RecordingSpec
from pipelines.errors import BadInput
from pipelines.fnirs import read_fnirs_netcdf


class BadRecording(BadInput):
    """A recording that cannot be used; the message names the file, the problem and the fix."""


@dataclasses.dataclass
class Stream:
    """One modality's channels from one file, at the file's own rate."""

    session: str
    name: str  # unique within the session (align_to refers to it)
    modality: str
    rate: float  # Hz
    channels: list[str]
    data: np.ndarray  # float64 or float32 [C, N]
    start_s: float  # first sample's time on the session clock
    source: str  # the file it came from
    align_to: str = ""  # another stream of the session: place this one by cross-correlation with it
    max_lag_s: float = 0.0  # search range of that cross-correlation (0: any overlap)

    @property
    def duration_s(self) -> float:
        return self.data.shape[1] / self.rate


@dataclasses.dataclass(frozen=True)
class Source:
    """What to read: a file, its reader, and what the config or sample table says about it."""

    session: str
    name: str
    path: str
    modality: str
    reader: str  # edf | hdf5 | npy | npz | parquet | text | fnirs_netcdf | spike_times
    rate: float = 0.0  # Hz; 0: from the file
    channels: tuple[str, ...] = ()  # expected (or, with `select`, given) channel names; empty: from the file
    select: tuple[str, ...] = ()  # hdf5 PLUX: raw channel keys to keep, e.g. "channel_5" or "<mac>/raw/channel_1";
    # text: columns to keep, by header name or (no header) by 0-based index
    time_column: str = ""  # text: a column of time stamps (seconds or ISO date-times); the rate is measured from it
    start_s: float = 0.0
    align_to: str = ""
    max_lag_s: float = 0.0
    what: str = ""  # how the error messages name it, e.g. "data.recordings[2]"


# --------------------------------------------------------------------------------------------
# Users' own files
# --------------------------------------------------------------------------------------------

READERS = {".edf": "edf", ".bdf": "edf", ".h5": "hdf5", ".hdf5": "hdf5", ".npy": "npy", ".npz": "npz",
           ".parquet": "parquet", ".csv": "text", ".tsv": "text", ".txt": "text"}


def recording_source(spec: RecordingSpec, index: int) -> Source:
    """The Source of `data.recordings[index]`; a file with no session is a session of its own."""
    what = f"data.recordings[{index}]"
    path = os.path.abspath(os.path.expanduser(spec.path))
    reader = READERS.get(Path(path).suffix.lower(), "")
    if not reader:
        raise BadRecording(f"{what}: {path}: unknown file type {Path(path).suffix!r}; "
                           f"use one of {sorted(READERS)} (EDF, HDF5, NPY/NPZ, Parquet, delimited text)")
    return Source(session=spec.session or Path(path).stem, name=Path(path).stem, path=path, modality=spec.modality,
                  reader=reader, rate=spec.rate, channels=tuple(spec.channels), start_s=spec.start_s, what=what,
                  align_to=Path(spec.align_to).stem if spec.align_to else "", max_lag_s=spec.max_lag_s)


def read_source(src: Source, modality: ModalitySpec) -> Stream:
    """Read and check one Source; raises BadRecording for anything unusable."""
    if not os.path.isfile(src.path):
        raise _bad(src, "no such file", "check the path")
    try:
        data, rate, channels = _READ[src.reader](src, modality)
    except BadRecording:
        raise
    except Exception as e:  # a corrupt or foreign file: report it as this file's problem, never crash the build
        raise _bad(src, f"cannot be read as {src.reader} ({type(e).__name__}: {e})",
                   "check that the file is complete and of the type its name says") from e
    data = np.asarray(data)
    if data.ndim == 1:
        data = data[None, :]
    return _checked(src, modality, data, rate, channels)


def _checked(src: Source, modality: ModalitySpec, data: np.ndarray, rate: float, channels: list[str]) -> Stream:
    if not rate or not np.isfinite(rate) or rate <= 0:
        raise _bad(src, f"no valid sampling rate (got {rate!r})", "set the recording's `rate` in Hz")
    if src.rate > 0 and abs(src.rate - rate) > 1e-6 * rate:
        raise _bad(src, f"the file says {rate:g} Hz but the config says rate={src.rate:g}",
                   "set `rate` to the file's rate, or 0 to take it from the file")
    if data.ndim != 2 or data.shape[1] < 2:
        raise _bad(src, f"expected channels x samples, got an array of shape {data.shape}", "store [channels, samples]")
    if src.channels and len(src.channels) != data.shape[0]:
        raise _bad(src, f"the file has {data.shape[0]} channels but `channels` lists {len(src.channels)}",
                   "list exactly the file's channels (or leave `channels` empty)")
    if data.shape[0] > modality.max_channels:
        raise _bad(src, f"{data.shape[0]} channels, more than data.modalities.{src.modality}.max_channels="
                        f"{modality.max_channels}", f"raise max_channels or select at most {modality.max_channels} channels")
    if not np.issubdtype(data.dtype, np.number):
        raise _bad(src, f"values of type {data.dtype} are not numbers", "store numeric samples")
    data = data.astype(np.float32 if data.dtype == np.float32 else np.float64, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        c = int(np.nonzero(bad.any(axis=1))[0][0])
        raise _bad(src, f"{int(bad.sum())} NaN/inf values (first in channel {channels[c]!r} at sample "
                        f"{int(np.argmax(bad[c]))})", "interpolate or cut out the gaps before building")
    return Stream(session=src.session, name=src.name, modality=src.modality, rate=float(rate),
                  channels=[str(c) for c in channels], data=data, start_s=src.start_s, source=src.path,
                  align_to=src.align_to, max_lag_s=src.max_lag_s)


def _bad(src: Source, problem: str, fix: str) -> BadRecording:
    where = f"{src.what}: " if src.what else ""
    return BadRecording(f"{where}{src.path}: {problem}; fix: {fix}")


def _names(src: Source, n: int, file_names: list[str] | None = None) -> list[str]:
    """Channel names: the config's if it gives them (count checked later), else the file's, else ch0..."""
    if src.channels:
        return list(src.channels)
    return file_names if file_names else [f"ch{i}" for i in range(n)]


def _orient(src: Source, a: np.ndarray, n_channels: int | None) -> np.ndarray:
    """[C, N] from a 1-D or 2-D array: the axis whose length is the channel count is channels; without a
    count the shorter axis is (recordings have far more samples than channels)."""
    if a.ndim == 1:
        return a[None, :]
    if a.ndim != 2:
        raise _bad(src, f"expected a 1-D or 2-D array, got shape {a.shape}", "store [channels, samples]")
    if n_channels is None:
        return a if a.shape[0] <= a.shape[1] else a.T
    if a.shape[0] == n_channels:
        return a
    if a.shape[1] == n_channels:
        return a.T
    raise _bad(src, f"an array of shape {a.shape} has no axis of {n_channels} channels (the `channels` given)",
               "list exactly the file's channels (or leave `channels` empty)")


def _read_edf(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    with pyedflib.EdfReader(src.path) as f:
        labels = [s.strip().rstrip(".") for s in f.getSignalLabels()]
        picks = list(range(len(labels)))
        if src.channels and set(src.channels) <= set(labels):
            picks = [labels.index(c) for c in src.channels]  # the config picks these channels out of the file
        rates = {float(f.getSampleFrequency(i)) for i in picks}
        if len(rates) != 1:
            raise _bad(src, f"the channels have different rates {sorted(rates)}",
                       "list in `channels` only channels of one rate (one stream per rate)")
        n = min(int(f.getNSamples()[i]) for i in picks)
        data = np.stack([f.readSignal(i)[:n] for i in picks])
    return data, rates.pop(), _names(src, len(picks), [labels[i] for i in picks])


def _read_hdf5(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    with h5py.File(src.path, "r") as f:
        devices = [k for k in f if isinstance(f[k], h5py.Group) and "sampling rate" in f[k].attrs and "raw" in f[k]]
        if devices:
            return _read_plux(src, f, devices)
        datasets = [k for k in f if isinstance(f[k], h5py.Dataset)]
        name = "data" if "data" in datasets else (datasets[0] if len(datasets) == 1 else None)
        if name is None:
            raise _bad(src, f"neither a PLUX (OpenSignals) file nor one dataset (top-level datasets: {datasets})",
                       "store the samples in a dataset named 'data' with attrs rate (Hz) and channels")
        ds = f[name]
        attrs = {**dict(f.attrs), **dict(ds.attrs)}
        rate = float(np.asarray(attrs["rate"]).item()) if "rate" in attrs else src.rate
        file_channels = [c.decode() if isinstance(c, bytes) else str(c) for c in attrs.get("channels", [])]
        count = len(src.channels) or len(file_channels) or None
        data = _orient(src, ds[()], count)
    return data, rate, _names(src, data.shape[0], file_channels)


def _read_plux(src: Source, f, devices: list[str]) -> tuple[np.ndarray, float, list[str]]:
    """OpenSignals .h5: one group per device (its MAC) with attrs 'sampling rate' and raw/channel_k
    datasets [N, 1] whose attrs carry 'label' and 'sensor'. All devices' raw channels unless `select`."""
    keys = [f"{d}/raw/{k}" for d in devices for k in sorted(f[d]["raw"], key=_channel_order) if k.startswith("channel_")]
    if src.select:
        keys = [_plux_key(src, f, devices, s) for s in src.select]
    if not keys:
        raise _bad(src, "a PLUX file with no raw channels", "record at least one analog channel")
    rates = {float(f[k.split("/")[0]].attrs["sampling rate"]) for k in keys}
    if len(rates) != 1:
        raise _bad(src, f"its devices record at different rates {sorted(rates)}",
                   "split it into one recording per rate")
    labels = [str(f[k].attrs.get("label", k.rsplit("/", 1)[-1])) for k in keys]
    if len(set(labels)) < len(labels):  # two devices with the same labels: keep them apart by device
        labels = [f"{k.split('/')[0]}/{lab}" for k, lab in zip(keys, labels, strict=True)]
    n = min(f[k].shape[0] for k in keys)  # devices recorded together may differ by a few samples
    data = np.stack([np.asarray(f[k][:n]).reshape(n).astype(np.float64) for k in keys])
    return data, rates.pop(), _names(src, len(keys), labels)


def _channel_order(key: str) -> int:
    return int(key.split("_")[-1]) if key.split("_")[-1].isdigit() else 0


def _plux_key(src: Source, f, devices: list[str], sel: str) -> str:
    if "/" in sel:
        if sel not in f:
            raise _bad(src, f"no dataset {sel!r}", "check the device MAC and channel key")
        return sel
    hits = [f"{d}/raw/{sel}" for d in devices if sel in f[d]["raw"]]
    if len(hits) != 1:
        raise _bad(src, f"raw channel {sel!r} found on {len(hits)} devices", "name it as '<device MAC>/raw/<channel>'")
    return hits[0]


def _read_npy(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    data = _orient(src, np.load(src.path, allow_pickle=False), len(src.channels) or None)
    return data, src.rate, _names(src, data.shape[0])


def _read_npz(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """An .npz with the samples in `data` (or its only array); optional `rate` and `channels` arrays
    are checked against the config."""
    with np.load(src.path, allow_pickle=False) as z:
        arrays = [k for k in z.files if k not in ("rate", "channels")]
        key = "data" if "data" in z.files else (arrays[0] if len(arrays) == 1 else None)
        if key is None:
            raise _bad(src, f"several arrays {z.files} and none named 'data'", "save the samples as data=...")
        file_rate = float(z["rate"]) if "rate" in z.files else 0.0
        file_channels = [str(c) for c in z["channels"]] if "channels" in z.files else []
        raw = z[key]
    if file_rate and src.rate and abs(file_rate - src.rate) > 1e-6 * file_rate:
        raise _bad(src, f"the file says {file_rate:g} Hz but the config says rate={src.rate:g}",
                   "set `rate` to the file's rate")
    data = _orient(src, raw, len(src.channels) or len(file_channels) or None)
    return data, src.rate or file_rate, _names(src, data.shape[0], file_channels)


def _read_parquet(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """One numeric column per channel, one row per sample; `channels` picks and orders columns."""
    names = pq.ParquetFile(src.path).schema_arrow.names
    wanted = list(src.channels) if src.channels and set(src.channels) <= set(names) else names
    table = pq.read_table(src.path, columns=wanted)
    data = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in wanted]) if wanted else np.zeros((0, 0))
    return data, src.rate, _names(src, len(wanted), wanted)


def _read_text(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """A delimited text table (tab, comma or spaces; .bz2/.gz compressed too), one row per sample. A
    first line that is not numbers is the header; `select` picks columns by name or 0-based index.
    With `time_column`, the rate is measured from its stamps: (rows - 1) / (last - first)."""
    with _open_text(src.path) as fh:
        lines = [ln for ln in (raw.strip() for raw in fh) if ln and not ln.startswith("#")]
    delim = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)
    first = [c.strip().strip('"') for c in lines[0].split(delim)]
    header = [] if all(_is_number(c) for c in first) else first
    rows = [[c.strip() for c in ln.split(delim)] for ln in lines[1 if header else 0:]]
    names = header or [str(i) for i in range(len(rows[0]))]
    wanted = list(src.select) or [n for n in names if n != src.time_column]
    missing = [w for w in [*wanted, *([src.time_column] if src.time_column else [])] if w not in names]
    if missing:
        raise _bad(src, f"no column {missing[0]!r} (columns: {names})", "name columns by header or 0-based index")
    data = np.array([[float(r[names.index(w)]) for w in wanted] for r in rows]).T
    rate = src.rate
    if src.time_column:
        t = np.array([_seconds(r[names.index(src.time_column)]) for r in rows])
        if not t[-1] > t[0]:
            raise _bad(src, f"column {src.time_column!r} does not increase", "give time stamps in order")
        rate = (len(t) - 1) / (t[-1] - t[0])
    return data, rate, _names(src, len(wanted), wanted if header else None)


def _open_text(path: str):
    if path.endswith(".bz2"):
        return bz2.open(path, "rt")
    if path.endswith(".gz"):
        return gzip.open(path, "rt")
    return open(path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _seconds(stamp: str) -> float:
    """Seconds from a number or an ISO date-time (with or without fractional seconds)."""
    return float(stamp) if _is_number(stamp) else datetime.fromisoformat(stamp).timestamp()


def _read_fnirs_netcdf(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """fNIRS raw intensity at two wavelengths, converted to HbO then HbR per channel (pipelines/fnirs.py)."""
    data, rate, names, _ = read_fnirs_netcdf(src.path)
    return data, rate, _names(src, data.shape[0], names)


def _read_spike_times(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """Spike times (µs, '#' header lines) -> spike counts per bin of 1/modality.rate over the trial."""
    times_s = np.loadtxt(src.path, comments="#", ndmin=1) * 1e-6
    n_bins = int(round(GRASSHOPPER_TRIAL_S * modality.rate))
    counts = np.bincount(np.floor(times_s * modality.rate).astype(np.int64), minlength=n_bins)[:n_bins]
    return counts.astype(np.float64)[None, :], modality.rate, _names(src, 1)


GRASSHOPPER_TRIAL_S = 10.0  # each trial's stimulus file is 200000 samples at 20 kHz; spikes lie in [0, 10) s

_READ = {"edf": _read_edf, "hdf5": _read_hdf5, "npy": _read_npy, "npz": _read_npz, "parquet": _read_parquet,
         "text": _read_text, "fnirs_netcdf": _read_fnirs_netcdf,
         "spike_times": _read_spike_times}
