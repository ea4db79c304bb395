"""The Ray Data time-series pipeline on real file formats (EDF, HDF5, NPY, Parquet) and real samples.

Synthetic recordings are smooth sums of sines written with the formats' own writers, so the tests can
say exactly where each sample of each window came from. One module-wide build serves the alignment,
split, normalisation and missing-modality checks; bad inputs get their own (small) builds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyedflib.highlevel as edf
import pytest

from neuraflex_ray.config import ModalitySpec, RecordingSpec, SeriesDataConfig
from pipelines.neuro_samples import SampleDownloadError, fetch_package, sample_sources
from pipelines.neuro_sources import BadRecording, read_source, recording_source
from pipelines.series_prep import estimate_offset, resample
from pipelines.timeseries import build_series_dataset, load_series_datasets, read_series, series_batch

ALIGN_OFFSET_S = 3.0  # the HDF5 stream starts this long after the EDF stream
SHIFT = (2.0, 10.0)  # the NPY stream's mean before and after 80 s


def _smooth(t: np.ndarray, seed: int, fmax: float = 5.0) -> np.ndarray:
    """A smooth random signal: 8 sines between 0.3 Hz and fmax with random phases."""
    rng = np.random.default_rng(seed)
    f, a, ph = rng.uniform(0.3, fmax, 8), rng.uniform(0.5, 1.5, 8), rng.uniform(0, 2 * np.pi, 8)
    return (a[:, None] * np.sin(2 * np.pi * f[:, None] * t[None, :] + ph[:, None])).sum(axis=0)


def _write_edf(path: Path, data: np.ndarray, labels: list[str], rate: int) -> None:
    headers = edf.make_signal_headers(labels, sample_frequency=rate, physical_min=-20.0, physical_max=20.0)
    edf.write_edf(str(path), data, headers)


def _write_h5(path: Path, data: np.ndarray, rate: float, channels: list[str]) -> None:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", data=data)
        ds.attrs["rate"] = rate
        ds.attrs["channels"] = channels


def _write_parquet(path: Path, data: np.ndarray, channels: list[str]) -> None:
    pq.write_table(pa.table({c: data[i] for i, c in enumerate(channels)}), path)


def _cfg(tmp: Path, recordings: list[RecordingSpec], **kw) -> SeriesDataConfig:
    return SeriesDataConfig(samples=[], recordings=recordings, output_dir=str(tmp / "out"),
                            cache_dir=str(tmp / "cache"), **kw)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, ray_session) -> tuple[dict, Path, SeriesDataConfig]:
    """Three sessions: 'align' (EDF ecg + HDF5 eeg starting ALIGN_OFFSET_S later, same signal),
    'shift' (NPY resp whose mean jumps at 80 s), 'motion' (Parquet acc)."""
    root = tmp_path_factory.mktemp("series")
    t256 = np.arange(60 * 256) / 256
    _write_edf(root / "ecg.edf", _smooth(t256, 1)[None, :], ["ECG"], 256)
    t200 = ALIGN_OFFSET_S + np.arange(57 * 200) / 200  # the same signal, from 3 s on the session clock
    _write_h5(root / "eeg.h5", np.stack([_smooth(t200, 1), 0.5 * _smooth(t200, 1)]), 200.0, ["C3", "C4"])
    t50 = np.arange(100 * 50) / 50
    resp = _smooth(t50, 2, fmax=2.0) + np.where(t50 < 80, SHIFT[0], SHIFT[1])
    np.save(root / "resp.npy", resp[None, :])
    t100 = np.arange(40 * 100) / 100
    _write_parquet(root / "acc.parquet", np.stack([_smooth(t100, s) for s in (3, 4, 5)]), ["X", "Y", "Z"])
    recordings = [
        RecordingSpec(path=str(root / "ecg.edf"), modality="ecg", session="align"),
        RecordingSpec(path=str(root / "eeg.h5"), modality="eeg", session="align", start_s=ALIGN_OFFSET_S),
        RecordingSpec(path=str(root / "resp.npy"), modality="resp", rate=50.0, channels=["airflow"], session="shift"),
        RecordingSpec(path=str(root / "acc.parquet"), modality="acc", rate=100.0, session="motion"),
    ]
    cfg = _cfg(root, recordings)
    return build_series_dataset(cfg), root / "out", cfg


# --------------------------------------------------------------------------------------------
# Resampling and alignment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,target,freq", [(1000.0, 128.0, 10.0), (160.0, 128.0, 12.5), (4000.0, 128.0, 3.0),
                                              (1 / 1.89, 4.0, 0.1), (50.0, 16.0, 1.5)])
def test_resampling_keeps_a_sines_frequency(rate, target, freq):
    n = int(rate * 200)
    x = np.sin(2 * np.pi * freq * np.arange(n) / rate)[None, :]
    y = resample(x, rate, target)[0]
    assert abs(len(y) - n * target / rate) <= 1
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak = np.fft.rfftfreq(len(y), 1 / target)[np.argmax(spectrum)]
    assert abs(peak - freq) <= target / len(y) + 1e-9  # within one FFT bin
    assert abs(y.std() - x.std()) < 0.05 * x.std()  # amplitude kept, no step at the ends


def test_estimate_offset_recovers_a_known_offset():
    rate = 100.0
    rng = np.random.default_rng(0)
    ref = np.stack([_smooth(np.arange(6000) / rate, s, fmax=8.0) for s in (1, 2, 3)])
    other = ref[:, 137:4137] * 3.0 + 5.0 + 0.2 * rng.standard_normal((3, 4000))  # starts 1.37 s later, other gain
    assert estimate_offset(ref, other, rate, max_lag_s=10.0) == pytest.approx(1.37, abs=0.5 / rate)
    assert estimate_offset(other, ref, rate) == pytest.approx(-1.37, abs=0.5 / rate)  # and the other way round
    t = np.arange(4000) / rate + 2.345  # a sub-sample offset is refined past the sample grid
    assert estimate_offset(ref[0], _smooth(t, 1, fmax=8.0), rate) == pytest.approx(2.345, abs=0.2 / rate)


def test_estimate_offset_on_the_real_two_hub_recording():
    """sync_acc_1/2: two PLUX hubs whose clocks disagree; at the files' 1 kHz the three axes agree on
    17.605 s (the headers' wall clocks say 22.014 s). At the pipeline's 32 Hz it must find the same."""
    a, b = [read_source(s, ModalitySpec(32.0, 6)) for s in sample_sources("plux") if s.session == "plux_acc_two_hubs"]
    assert estimate_offset(a.data, b.data, 1000.0, 30.0) == pytest.approx(17.605, abs=0.002)
    assert estimate_offset(resample(a.data, 1000.0, 32.0), resample(b.data, 1000.0, 32.0), 32.0,
                           30.0) == pytest.approx(17.605, abs=0.01)


def test_a_users_plux_file_reads_with_its_own_metadata():
    """OpenSignals .h5 as a user's recording: rate and labels from the devices' attrs; a file whose two
    devices run at different rates is refused."""
    root = Path(sample_sources("plux")[0].path).parent  # the cached PLUX recordings
    s = read_source(recording_source(RecordingSpec(path=str(root / "emg_1000_hz_8_16_bits.h5"), modality="emg"), 0),
                    ModalitySpec(256.0, 2))
    assert (s.rate, s.channels, s.data.shape) == (1000.0, ["PORT6_CHN1", "PORT5_CHN1"], (2, 30600))
    with pytest.raises(BadRecording, match=r"emg_1000_hz_16_bits\.h5: its devices record at different rates"):
        read_source(recording_source(RecordingSpec(path=str(root / "emg_1000_hz_16_bits.h5"), modality="emg"), 0),
                    ModalitySpec(256.0, 2))


def test_npz_rate_and_channels_are_checked_against_the_config(tmp_path):
    x = np.stack([_smooth(np.arange(2000) / 100, s) for s in (1, 2)]).T  # [N, C]: samples first
    np.savez(tmp_path / "rec.npz", data=x, rate=np.array(100.0), channels=np.array(["a", "b"]))
    s = read_source(recording_source(RecordingSpec(path=str(tmp_path / "rec.npz"), modality="ecg"), 0), ModalitySpec(128.0, 2))
    assert (s.rate, s.channels, s.data.shape) == (100.0, ["a", "b"], (2, 2000))
    spec = RecordingSpec(path=str(tmp_path / "rec.npz"), modality="ecg", rate=128.0)
    with pytest.raises(BadRecording, match=r"rec\.npz: the file says 100 Hz but the config says rate=128"):
        read_source(recording_source(spec, 0), ModalitySpec(128.0, 2))


def test_streams_of_one_session_share_one_clock(synthetic):
    """The EDF (256 Hz) and HDF5 (200 Hz) streams carry one signal, the second from 3 s on: on the
    session clock their windows must coincide sample for sample."""
    manifest, out, _ = synthetic
    rec = next(r for r in manifest["recordings"] if r["name"] == "align")
    assert rec["start_s"] == pytest.approx(ALIGN_OFFSET_S) and rec["duration_s"] == pytest.approx(57.0)
    for split in ("train", "val"):
        arrays, recordings, starts = read_series(str(out), split)
        mine = recordings == "align"
        ecg, eeg = arrays["ecg"].x[mine, 0], arrays["eeg"].x[mine, :2]
        assert mine.sum() > 0 and starts[mine].min() >= ALIGN_OFFSET_S - 1e-9
        assert np.abs(ecg - eeg[:, 0]).max() < 0.01  # (10 ms off the true offset gives 0.5)
        assert np.abs(ecg - eeg[:, 1]).max() < 0.01  # half the amplitude, the same after normalisation
        flat_ecg, flat_eeg = ecg.ravel(), eeg[:, 0].ravel()
        lags = [np.dot(flat_ecg[20:-20], np.roll(flat_eeg, k)[20:-20]) for k in range(-5, 6)]
        assert int(np.argmax(lags)) == 5  # the best lag is 0 samples


def test_align_to_places_a_device_without_a_shared_clock(tmp_path, ray_session):
    """Two devices saw one motion; the second file's own clock says nothing (start_s 0), so the
    pipeline must place it by cross-correlation with the file named in align_to."""
    offset = 4.25
    t = np.arange(50 * 100) / 100
    np.save(tmp_path / "hub1.npy", np.stack([_smooth(t, 7), _smooth(t, 8)]))
    np.save(tmp_path / "hub2.npy", np.stack([_smooth(t + offset, 7), _smooth(t + offset, 8)]) * 3.0 + 1.0)
    recordings = [
        RecordingSpec(path=str(tmp_path / "hub1.npy"), modality="acc", rate=100.0, channels=["x1", "y1"], session="s"),
        RecordingSpec(path=str(tmp_path / "hub2.npy"), modality="acc", rate=100.0, channels=["x2", "y2"], session="s",
                      align_to=str(tmp_path / "hub1.npy"), max_lag_s=10.0),
    ]
    manifest = build_series_dataset(_cfg(tmp_path, recordings))
    streams = {s["name"]: s for s in manifest["recordings"][0]["streams"]}
    assert streams["hub2"]["placed_by"] == "cross-correlation"
    assert streams["hub2"]["start_s"] == pytest.approx(offset, abs=1 / 32)  # within one sample at the 32 Hz target


# --------------------------------------------------------------------------------------------
# Split, normalisation, missing modalities, layout
# --------------------------------------------------------------------------------------------


def test_no_window_crosses_the_split(synthetic):
    manifest, out, _ = synthetic
    split_s = {r["name"]: r["split_s"] for r in manifest["recordings"]}
    window = manifest["context_s"] + max(manifest["horizons_s"])
    for split in ("train", "val"):
        _, recordings, starts = read_series(str(out), split)
        assert len(starts) == manifest[f"{split}_windows"] > 0
        for name, t in zip(recordings, starts, strict=True):
            rec = next(r for r in manifest["recordings"] if r["name"] == name)
            if split == "train":
                assert rec["start_s"] - 1e-9 <= t and t + window <= split_s[name] + 1e-9
            else:
                assert split_s[name] - 1e-9 <= t and t + window <= rec["start_s"] + rec["duration_s"] + 1e-9
            k = (t - rec["start_s"]) / manifest["patch_s"]
            assert abs(k - round(k)) < 1e-6  # on the patch grid: a whole sample of every modality


def test_normalisation_uses_training_statistics_only(synthetic):
    manifest, out, _ = synthetic
    rec = next(r for r in manifest["recordings"] if r["name"] == "shift")
    stats = manifest["norm_stats"]["shift"]["resp"]
    raw = np.load(Path(rec["streams"][0]["file"]))
    x16 = resample(raw, 50.0, 16.0)[0]
    train = x16[: round((rec["split_s"] - rec["split_guard_s"]) * 16)]  # resampling smears the last samples of the train part
    assert 0 < rec["split_guard_s"] < 2
    assert stats["channels"] == ["airflow"]
    assert stats["mean"][0] == pytest.approx(train.mean(), rel=1e-6) and stats["std"][0] == pytest.approx(train.std(), rel=1e-6)
    assert stats["mean"][0] == pytest.approx(SHIFT[0], abs=0.1)  # not the whole recording's (about 3.6)
    tr, tr_rec, _ = read_series(str(out), "train")
    va, va_rec, _ = read_series(str(out), "val")
    assert abs(tr["resp"].x[tr_rec == "shift", 0].mean()) < 0.1
    assert va["resp"].x[va_rec == "shift", 0].mean() > (SHIFT[1] - SHIFT[0]) / stats["std"][0] * 0.8


def test_missing_modality_is_absent_and_zero(synthetic):
    manifest, out, _ = synthetic
    assert list(manifest["modalities"]) == ["eeg", "ecg", "resp", "acc"]  # data.modalities order, present ones only
    arrays, recordings, _ = read_series(str(out), "train")
    has = {"align": {"eeg", "ecg"}, "shift": {"resp"}, "motion": {"acc"}}
    for m, a in arrays.items():
        for name, modalities in has.items():
            rows = recordings == name
            assert (a.present[rows] == (m in modalities)).all()
            if m not in modalities:
                assert not a.x[rows].any() and not a.chan[rows].any()
            else:
                assert (a.chan[rows][:, : len(manifest["norm_stats"][name][m]["channels"])] > 0).all()
    assert (arrays["eeg"].chan[recordings == "align"][:, 2:] == 0).all()  # 2 of 64 channels, rest padding


def test_layout_and_ray_loading_follow_the_contract(synthetic):
    manifest, out, _ = synthetic
    ids = manifest["channel_ids"]
    assert list(ids) == sorted(ids) and list(ids.values()) == list(range(1, len(ids) + 1))
    assert manifest["n_channel_ids"] == len(ids) + 1 and "eeg:C3" in ids and "resp:airflow" in ids
    eeg = manifest["modalities"]["eeg"]
    assert (eeg["patch_len"], eeg["context_samples"], eeg["future_samples"]) == (32, 512, 128)
    assert manifest["context_patches"] == 16 and manifest["horizon_patches"] == [1, 2, 4]
    schema = pq.read_schema(out / manifest["val_shards"][0])
    assert schema.field("x_eeg").type == pa.list_(pa.float32()) and schema.field("chan_eeg").type == pa.list_(pa.int32())
    assert schema.field("present_eeg").type == pa.bool_() and schema.field("start_s").type == pa.float64()
    train, val, m = load_series_datasets(str(out))
    batch = next(iter(val.iter_batches(batch_size=4, batch_format="numpy")))
    arrays = series_batch(batch, m)
    assert arrays["eeg"].x.shape == (4, 64, 640) and arrays["eeg"].x.dtype == np.float32
    assert arrays["eeg"].chan.dtype == np.int64 and arrays["eeg"].present.dtype == bool
    direct, _, _ = read_series(str(out), "val")
    np.testing.assert_array_equal(arrays["eeg"].x, direct["eeg"].x[:4])  # val rows keep their order
    assert train.count() == manifest["train_windows"]


def test_build_is_deterministic_and_cached(synthetic, tmp_path):
    manifest, out, cfg = synthetic
    t = time.perf_counter()
    assert build_series_dataset(cfg)["created_at"] == manifest["created_at"]  # same inputs and config: reused
    assert time.perf_counter() - t < 5
    again = build_series_dataset(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")))
    assert again["fingerprint"] == manifest["fingerprint"] and again["norm_stats"] == manifest["norm_stats"]
    for split in ("train", "val"):
        a, rec_a, start_a = read_series(str(out), split)
        b, rec_b, start_b = read_series(str(tmp_path / "again"), split)
        assert list(rec_a) == list(rec_b) and np.array_equal(start_a, start_b)  # the same (shuffled) order
        for m in a:
            np.testing.assert_array_equal(a[m].x, b[m].x)
    _, rec, _ = read_series(str(out), "train")
    assert list(rec) != sorted(rec)  # train rows are shuffled across sessions


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, RecordingSpec]:
    root = tmp_path_factory.mktemp("bad")
    t = np.arange(30 * 64) / 64
    _write_h5(root / "no_rate.h5", np.stack([_smooth(t, 1)]), 0.0, ["C3"])  # rate attr 0
    nan = _smooth(t, 2)[None, :]
    nan[0, 500] = np.nan
    np.save(root / "nan.npy", nan)
    _write_parquet(root / "three.parquet", np.stack([_smooth(t, s) for s in (3, 4, 5)]), ["X", "Y", "Z"])
    _write_edf(root / "eeg256.edf", np.stack([_smooth(np.arange(30 * 256) / 256, 6)]), ["Cz"], 256)
    np.save(root / "good.npy", np.stack([_smooth(np.arange(60 * 64) / 64, 7)]))
    return {
        "no_rate.h5": RecordingSpec(path=str(root / "no_rate.h5"), modality="eeg"),
        "nan.npy": RecordingSpec(path=str(root / "nan.npy"), modality="ecg", rate=64.0),
        "three.parquet": RecordingSpec(path=str(root / "three.parquet"), modality="acc", rate=64.0,
                                       channels=["X", "W"]),  # two names for three columns
        "eeg256.edf": RecordingSpec(path=str(root / "eeg256.edf"), modality="eeg", rate=250.0),
        "good.npy": RecordingSpec(path=str(root / "good.npy"), modality="ecg", rate=64.0, channels=["ECG"]),
    }


@pytest.mark.parametrize("name,problem", [("no_rate.h5", "no valid sampling rate"), ("nan.npy", "NaN/inf"),
                                          ("three.parquet", "has 3 channels but `channels` lists 2"),
                                          ("eeg256.edf", "the file says 256 Hz but the config says rate=250")])
def test_bad_input_names_the_file_and_the_problem(bad_files, name, problem):
    with pytest.raises(BadRecording) as e:
        read_source(recording_source(bad_files[name], 3), ModalitySpec(rate=128.0, max_channels=64))
    msg = str(e.value)
    assert name in msg and problem in msg and "fix:" in msg and "data.recordings[3]" in msg


def test_bad_inputs_stop_the_build_before_anything_is_written(bad_files, tmp_path, ray_session):
    cfg = _cfg(tmp_path, [bad_files[n] for n in ("good.npy", "no_rate.h5", "nan.npy", "three.parquet")])
    with pytest.raises(BadRecording) as e:
        build_series_dataset(cfg)
    for name in ("no_rate.h5", "nan.npy", "three.parquet"):
        assert name in str(e.value)
    assert "good.npy" not in str(e.value) and not (tmp_path / "out").exists()


def test_bad_inputs_are_skipped_and_counted(bad_files, tmp_path, ray_session):
    cfg = _cfg(tmp_path, list(bad_files.values()), on_bad_input="skip")
    manifest = build_series_dataset(cfg)
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["eeg256.edf", "nan.npy", "no_rate.h5", "three.parquet"]
    assert "NaN" in skipped["nan.npy"] and "256 Hz" in skipped["eeg256.edf"]
    assert [r["name"] for r in manifest["recordings"]] == ["good"] and list(manifest["modalities"]) == ["ecg"]
    assert manifest["train_windows"] > 0 and manifest["val_windows"] > 0


# --------------------------------------------------------------------------------------------
# The real bundled samples
# --------------------------------------------------------------------------------------------


def test_unreachable_registry_names_the_package_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or local wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(SampleDownloadError) as e:
        fetch_package("nitime", "0.12.1", ["nitime/data/fmri_timeseries.csv"], cache_dir=str(tmp_path))
    assert "nitime==0.12.1" in str(e.value) and "fix:" in str(e.value) and "PIP_INDEX_URL" in str(e.value)
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())


def test_build_from_the_real_samples(tmp_path, ray_session):
    """PhysioNet EEG (EDF), systole ECG/EDA/respiration and nitime fMRI/spikes: downloaded once into the
    user's cache (the first run takes about a minute more), then built here."""
    cfg = SeriesDataConfig(samples=["physionet_eeg", "systole", "nitime"], output_dir=str(tmp_path / "neuro"))
    manifest = build_series_dataset(cfg)
    for key in ("modalities", "context_s", "patch_s", "horizons_s", "hop_s", "context_patches", "horizon_patches",
                "channel_ids", "n_channel_ids", "recordings", "train_windows", "val_windows", "skipped",
                "norm_stats", "fingerprint", "version"):
        assert key in manifest, key
    assert list(manifest["modalities"]) == ["eeg", "ecg", "eda", "resp", "fmri", "spikes"]
    for m in manifest["modalities"].values():
        assert set(m) == {"rate", "max_channels", "patch_len", "context_samples", "future_samples"}
    recs = {r["name"]: r for r in manifest["recordings"]}
    for r in recs.values():
        assert {"name", "modalities", "duration_s", "split_s", "train_windows", "val_windows"} <= set(r)
    eeg = recs["physionet_S001R02"]
    assert len(eeg["channels"]["eeg"]) == 64 and eeg["duration_s"] == pytest.approx(61.0)
    assert (eeg["train_windows"], eeg["val_windows"]) == (22, 4)
    task = recs["systole_task1"]
    assert task["modalities"] == ["ecg", "eda", "resp"] and task["duration_s"] == pytest.approx(1536.57)
    assert (task["train_windows"], task["val_windows"]) == (612, 151)
    assert len(recs["nitime_fmri"]["channels"]["fmri"]) == 31 and recs["nitime_fmri"]["duration_s"] == pytest.approx(472.5)
    assert recs["nitime_grasshopper"]["channels"]["spikes"] == ["unit_co200", "unit_co800"]
    assert manifest["skipped"] == [] and manifest["train_windows"] == sum(r["train_windows"] for r in recs.values())
    rows = {s: sum(pq.ParquetFile(tmp_path / "neuro" / f).metadata.num_rows for f in manifest[f"{s}_shards"])
            for s in ("train", "val")}
    assert rows == {"train": manifest["train_windows"], "val": manifest["val_windows"]}
    spikes, recordings, _ = read_series(str(tmp_path / "neuro"), "train")
    assert spikes["spikes"].present.sum() == recs["nitime_grasshopper"]["train_windows"]

    t = time.perf_counter()  # unchanged inputs and config: the build is reused
    again = build_series_dataset(cfg)
    assert again["fingerprint"] == manifest["fingerprint"] and time.perf_counter() - t < 5
    assert json.loads((tmp_path / "neuro" / "manifest.json").read_text())["created_at"] == manifest["created_at"]


def test_artifact_rejection_drops_only_windows_that_hold_the_artifact():
    from pipelines.series_prep import _reject_artifacts

    rate = 16.0
    arrays = {"resp": np.zeros((1, int(60 * rate)), np.float32), "eeg": np.zeros((2, int(60 * 128)), np.float32)}
    arrays["eeg"][1, int(30.5 * 128)] = 500.0  # an electrode popping off at 30.5 s
    plan = {"reject_abs_z": 20.0, "window_s": 5.0, "modalities": {"resp": {"rate": rate}, "eeg": {"rate": 128.0}}}
    starts = [float(t) for t in range(0, 55, 2)]
    kept, dropped = _reject_artifacts(starts, arrays, plan)
    assert [t for t in starts if t not in kept] == [26.0, 28.0, 30.0] and dropped == 3
    assert _reject_artifacts(starts, arrays, {**plan, "reject_abs_z": 0.0}) == (starts, 0)  # 0: off
