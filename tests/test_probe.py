"""The frozen-embedding probe on the real systole task recording, through a real export.

One module-wide export: the real systole dataset built by the Ray Data pipeline, an untrained tiny
NeuroFM saved as a DCP checkpoint (as the FSDP strategy writes one, from one process) and exported by
`export_checkpoint`, so the probe reads exactly the metadata a trained export carries. Labels are
checked against the Task1_Stim.npy onsets read here on their own, not through the probe's code.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from neuraflex_ray.checkpoint import DCP_DIR, TRAIN_STATE, export_checkpoint
from neuraflex_ray.cli import main
from neuraflex_ray.config import ConfigError, SeriesDataConfig, load_config, neurofm_for_data
from neuraflex_ray.eval.probe import classical_features, heart_rate_bpm
from neuraflex_ray.eval.probe_classifier import decode, fit_classifier
from neuraflex_ray.eval.probe_labels import (
    FMRI_EVENT,
    FNIRS_TAPPING,
    HRF_DELAY_S,
    HRF_TAIL_S,
    POST_VS_PRE,
    REST_AFTER_S,
    SOURCES,
    SYSTOLE,
    TASK_VS_REST,
)
from neuraflex_ray.eval.probe_tasks import (
    MIN_TEST_PER_CLASS,
    all_tasks,
    data_config_from_export,
    dense_hops,
    load_session,
    sample_grid_s,
)
from neuraflex_ray.models.neurofm import NeuroFM
from pipelines.neuro_samples import PACKAGES, fetch_package
from pipelines.timeseries import build_series_dataset

EPS = 1e-6


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, ray_session):
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("probe")
    # hop 16 s: the pretraining windows are not what the probe reads, only the manifest is
    manifest = build_series_dataset(SeriesDataConfig(samples=["systole", "pyphysio", "nitime_events"], hop_s=16.0,
                                                     output_dir=str(root / "data")))
    cfg = neurofm_for_data(load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny"]).model,
                           manifest)
    torch.manual_seed(0)
    ckpt = root / "checkpoint"
    dcp.save({"model": NeuroFM(cfg).state_dict()}, checkpoint_id=str(ckpt / DCP_DIR), no_dist=True)
    (ckpt / TRAIN_STATE).write_text(json.dumps({"strategy": "fsdp", "model_type": "neurofm",
                                                "model_config": dataclasses.asdict(cfg), "step": 0}))
    return export_checkpoint(ckpt, root / "data", root / "export")


@pytest.fixture(scope="module")
def meta(export_dir):
    return json.loads((export_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def session(meta):
    return load_session(meta, SYSTOLE)


@pytest.fixture(scope="module")
def tasks(session):
    return {t.name: t for t in all_tasks(session, hop_s=1.0)}


@pytest.fixture(scope="module")
def onsets(session):
    """The protocol's image onsets (s), read straight from the package file (the streams start at 0 s)."""
    stim = np.load(fetch_package("systole", *PACKAGES["systole"]) / "Task1_Stim.npy")
    idx = np.flatnonzero(stim)
    assert len(idx) == 72 and sorted(set(stim[idx])) == [1.0, 2.0]
    return idx / 1000.0


def test_the_probe_keeps_the_pretrainings_split(session, meta):
    rec = next(r for r in meta["data"]["recordings"] if r["name"] == SYSTOLE.session)
    assert session.split_s == pytest.approx(rec["split_s"] - rec["start_s"])
    assert session.guard_s == pytest.approx(rec["split_guard_s"]) and session.guard_s > 0
    assert session.pretrained_on is True
    assert session.context_s == meta["data"]["context_s"]
    assert set(session.arrays) == {"ecg", "eda", "resp"}
    # every modality's window starts on a whole sample
    assert all(abs(session.grid_s * r - round(session.grid_s * r)) < EPS for r in session.rates.values())


def test_task_vs_rest_labels_follow_the_onsets(session, tasks, onsets):
    task = tasks[TASK_VS_REST]
    assert task.classes == ("rest", "task")
    period, ctx = float(np.median(np.diff(onsets))), session.context_s
    assert 10.5 < period < 10.8  # the protocol's trial spacing
    for side in ("train", "test"):
        for t, y in zip(task.starts[side], task.y[side], strict=True):
            if y == 0:  # rest: no onset inside the window nor in the trial period before it
                assert not ((onsets >= t - period - EPS) & (onsets < t + ctx)).any(), t
            else:  # task: between two onsets of one block (gap < 2 periods), or within a period of the block's last
                prev = onsets[onsets <= t + EPS].max()
                inside = onsets[(onsets > t + EPS) & (onsets < t + ctx - EPS)]  # at most one: ctx < period
                after = onsets[onsets >= t + ctx - EPS]
                if len(inside):
                    assert inside[0] - prev < 2 * period, t
                else:
                    assert (len(after) and after[0] - prev < 2 * period) or t + ctx <= prev + period + EPS, t
        counts = np.bincount(task.y[side], minlength=2)
        assert (counts > 0).all(), (side, counts)
    # the ~400 s before the first trial is rest, the middle of every block of trials is task
    first_train = dict(zip(task.starts["train"], task.y["train"], strict=True))
    assert first_train[100.0] == 0 and first_train[450.0] == 1 and first_train[1000.0] == 1
    assert dict(zip(task.starts["test"], task.y["test"], strict=True))[1500.0] == 0  # after the last trial


def test_post_vs_pre_onset_windows_touch_their_onset(session, tasks, onsets):
    task = tasks[POST_VS_PRE]
    assert task.classes == ("pre", "post")
    g, ctx = session.grid_s, session.context_s
    for side in ("train", "test"):
        for t, y in zip(task.starts[side], task.y[side], strict=True):
            if y == 1:  # starts at or just after an onset: no sample from before it
                assert ((t - onsets >= -EPS) & (t - onsets < g - EPS)).any(), t
            else:  # ends at or just before an onset: no sample from after it
                assert ((onsets - (t + ctx) >= -EPS) & (onsets - (t + ctx) < g - EPS)).any(), t
    # every onset whose windows fit on a side gives one window of each class there
    fits_test = (onsets - ctx >= session.test_begin_s) & (onsets + g + ctx <= session.duration_s)
    assert np.bincount(task.y["test"], minlength=2).tolist() == [fits_test.sum()] * 2 == [13, 13]
    fits_train = onsets + g + ctx <= session.train_end_s
    assert np.bincount(task.y["train"], minlength=2).tolist() == [fits_train.sum()] * 2


def test_no_window_crosses_the_guard(session, tasks):
    for task in tasks.values():
        train, test = task.starts["train"], task.starts["test"]
        assert len(train) and len(test)
        assert train.min() >= 0 and train.max() + session.context_s <= session.train_end_s + EPS
        assert test.min() >= session.test_begin_s - EPS and test.max() + session.context_s <= session.duration_s + EPS
        # so no train window overlaps a test window, with at least 2 guards between them
        assert test.min() - (train.max() + session.context_s) >= 2 * session.guard_s - EPS
        assert task.dropped_at_split > 0  # windows near the split existed and were left out, not moved


def test_classifier_is_fitted_on_train_rows_only(session, tasks):
    task = tasks[POST_VS_PRE]
    feats = {side: classical_features(session.cut(task.starts[side]), session.rates)[0] for side in ("train", "test")}
    res = decode(feats, task)
    rng = np.random.default_rng(0)
    shuffled = dataclasses.replace(task, y={**task.y, "test": rng.permutation(task.y["test"][::-1])})
    noisy = {**feats, "test": rng.normal(size=feats["test"].shape)}
    other = decode(noisy, shuffled)
    alone = fit_classifier(feats["train"], task.y["train"])
    for clf in (other["classifier"], alone):
        np.testing.assert_array_equal(clf[-1].coef_, res["classifier"][-1].coef_)
        np.testing.assert_array_equal(clf[-1].intercept_, res["classifier"][-1].intercept_)
    assert other["bacc"] != res["bacc"]  # the test rows did change the score, just not the fit


def test_heart_rate_matches_r_peaks_at_the_source_rate(session, tasks):
    """Per-window heart rate at the model's ECG rate vs R-peaks found on the raw 1 kHz ECG."""
    from scipy import signal

    starts = tasks[TASK_VS_REST].starts["train"][::10]
    hr = heart_rate_bpm(session.cut(starts)["ecg"][:, 0], session.rates["ecg"])
    raw = np.load(fetch_package("systole", *PACKAGES["systole"]) / "Task1_ECG.npy")
    sos = signal.butter(3, [5, 30], btype="band", fs=1000, output="sos")
    energy = signal.sosfiltfilt(sos, raw) ** 2
    peaks = signal.find_peaks(energy, height=0.2 * np.percentile(energy, 99.5), distance=330)[0] / 1000
    ref = np.array([60 / np.median(np.diff(peaks[(peaks >= t) & (peaks < t + session.context_s)])) for t in starts])
    assert np.isfinite(hr).all()
    assert np.percentile(np.abs(hr - ref), 95) < 1.5 and 50 < np.median(hr) < 100


def test_sample_grid():
    assert sample_grid_s([128.0, 16.0, 16.0]) == 1 / 16
    assert sample_grid_s([160.0, 128.0]) == 1 / 32
    assert sample_grid_s([256.0]) == 1 / 256


def test_an_export_without_the_split_is_refused(meta):
    data = {k: v for k, v in meta["data"].items() if k != "data_config"}
    with pytest.raises(ConfigError, match="data_config.val_fraction"):
        data_config_from_export({**meta, "data": data})
    ids = {k: v for k, v in meta["data"]["channel_ids"].items() if k != "resp:RESP"}
    with pytest.raises(ConfigError, match="resp:RESP"):
        load_session({**meta, "data": {**meta["data"], "channel_ids": ids}}, SYSTOLE)
    # An export never trained on a modality (the quickstart's has no fNIRS): a ConfigError, which the
    # probe turns into a skipped recording, never a crash inside the session's preparation.
    mods = {k: v for k, v in meta["data"]["modalities"].items() if k != "fnirs"}
    with pytest.raises(ConfigError, match=r"\['fnirs'\] of session 'pyphysio_fnirs'.*data.samples including pyphysio"):
        load_session({**meta, "data": {**meta["data"], "modalities": mods}}, SOURCES["fnirs_tapping"])
    fnirs_ids = {k: v for k, v in meta["data"]["channel_ids"].items() if k != "fnirs:S1_D1 hbo"}
    with pytest.raises(ConfigError, match="fnirs:S1_D1 hbo"):  # a channel named by the file, not the source
        load_session({**meta, "data": {**meta["data"], "channel_ids": fnirs_ids}}, SOURCES["fnirs_tapping"])


def test_cli_probe_end_to_end(export_dir, tmp_path, capsys, session):
    out = tmp_path / "probe.json"
    assert main(["probe", "--export", str(export_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "balanced accuracy" in printed and TASK_VS_REST in printed
    result = json.loads(out.read_text())
    assert set(result) == {TASK_VS_REST, POST_VS_PRE, FNIRS_TAPPING, FMRI_EVENT}
    for name, r in result.items():
        assert 0.0 <= r["model"] <= 1.0 and 0.0 <= r["baseline"] <= 1.0, name
        for side in ("n_train", "n_test"):
            assert len(r[side]) == 2 and min(r[side].values()) > 0, (name, r[side])
        split = r["split"]  # each task on its own recording's split
        assert r["windows_s"]["train"][1] <= split["train_end_s"] + EPS
        assert r["windows_s"]["test"][0] >= split["test_begin_s"] - EPS
        assert r["n_features"]["model"] == 32  # the tiny flavour's dim
    for name in (TASK_VS_REST, POST_VS_PRE):
        assert result[name]["labels"].startswith("Task1_Stim.npy onsets")
        assert result[name]["split"]["split_s"] == pytest.approx(session.split_s)
    assert result[POST_VS_PRE]["n_test"] == {"pre": 13, "post": 13}  # one pair per onset: no hop adds any
    # Issue 27: >= 40 test windows per class where the data holds them, by halving the hop per task.
    for name in (TASK_VS_REST, FNIRS_TAPPING, FMRI_EVENT):
        r = result[name]
        assert min(r["n_test"].values()) >= MIN_TEST_PER_CLASS or r["hop_s"] < 1.0, (name, r["n_test"], r["hop_s"])
        assert f"hop {r['hop_s']:g} s" in r["labels"]
    # Three time cuts, the last the pretraining's split; the mean difference and its interval over them.
    for name, r in result.items():
        cuts = [c["cut_s"] for c in r["splits"]]
        assert cuts == sorted(cuts) and len(cuts) == 3 and cuts[-1] == pytest.approx(r["split"]["split_s"]), name
        scored = [c for c in r["splits"] if "diff" in c]
        assert r["diff"] == pytest.approx(np.mean([c["model"] - c["baseline"] for c in scored]))
        assert r["ci_low"] <= r["ci_high"] and all(c["ci_low"] <= c["ci_high"] for c in scored)
        assert r["splits"][-1]["model"] == r["model"] and r["splits"][-1]["test_seen_by_pretraining"] == 0.0
        assert r["splits"][0]["test_seen_by_pretraining"] > 0  # an earlier cut tests on pretraining-train time
    assert "time cuts" in printed


def test_dense_hops_halve_until_every_class_has_enough_test_windows(session):
    coarse = {t.name: t for t in all_tasks(session, hop_s=4.0)}
    hops = dense_hops(session, hop_s=4.0, min_per_class=30)
    assert hops[POST_VS_PRE] == 4.0  # its windows are one pair per onset, whatever the hop
    for name, hop in hops.items():
        fine = next(t for t in all_tasks(session, hop) if t.name == name)
        fewest = min(int((fine.y["test"] == k).sum()) for k in range(2))
        if hop < 4.0:  # halved only because the coarser hop left a class short
            assert min(int((coarse[name].y["test"] == k).sum()) for k in range(2)) < 30
            assert fewest >= 30 or hop / 2 < max(session.grid_s, 0.25), (name, hop, fewest)


def test_every_cut_keeps_train_and_test_windows_apart(session):
    for cut in session.cuts_s():
        for task in all_tasks(session, hop_s=1.0, cut_s=cut):
            train, test = task.starts["train"], task.starts["test"]
            assert len(train) and len(test) and task.cut_s == cut
            assert train.max() + session.context_s <= cut - session.guard_s + EPS
            assert test.min() >= cut + session.guard_s - EPS


def test_cli_probe_bad_export(tmp_path, capsys):
    assert main(["probe", "--export", str(tmp_path / "nowhere")]) == 2
    assert "--export" in capsys.readouterr().err


def test_fewshot_scores_lora_and_the_linear_probe_without_touching_the_export(export_dir, meta):
    from neuraflex_ray.eval.fewshot import fewshot_task
    from neuraflex_ray.finetune.lora import fingerprint

    before = fingerprint(export_dir)
    session = load_session(meta, SYSTOLE)
    task = next(t for t in all_tasks(session) if t.name == TASK_VS_REST)
    out = fewshot_task(export_dir, session, task, shots=(1, 5), repeats=1, steps=2)
    assert set(out["shots"]) == {"1", "5"} and out["n_test"] == len(task.y["test"])
    for row in out["shots"].values():
        assert 0.0 <= row["linear"] <= 1.0 and 0.0 <= row["lora"] <= 1.0 and row["draws"] == 1
    assert fingerprint(export_dir) == before  # adapters live in memory; the base export is unchanged


@pytest.mark.parametrize(("source", "events", "duration_s"), [("fnirs_tapping", 31, 4.915), ("fmri_events", 576, 0.0)])
def test_haemodynamic_labels_follow_the_protocol_events(meta, source, events, duration_s):
    """Response windows lie where the haemodynamic response is, rest windows clear of every response;
    the events are read from the recording's own label file, on the session clock."""
    session = load_session(meta, SOURCES[source])
    assert len(session.onsets_s) == events and np.allclose(session.durations_s, duration_s, atol=0.01)
    on, end = session.onsets_s, session.onsets_s + session.durations_s
    for task in all_tasks(session, hop_s=1.0):
        for side in ("train", "test"):
            assert (np.bincount(task.y[side], minlength=2) > 0).all(), (task.name, side)
            for t, y in zip(task.starts[side], task.y[side], strict=True):
                if y == 1:
                    assert ((on + HRF_DELAY_S <= t + EPS) & (t + session.context_s <= end + HRF_TAIL_S + EPS)).any(), t
                else:
                    assert not ((t < end + REST_AFTER_S - EPS) & (t + session.context_s > on + EPS)).any(), t


def test_basic_motions_probe_on_the_archive_split_and_two_reshuffles():
    """The case-level probe: four activities, the accelerometer as the export's acc X/Y/Z; an untrained
    tiny model beside summary statistics, which tell standing from running easily."""
    from neuraflex_ray.eval.probe_cases import probe_basic_motions

    cfg = dataclasses.replace(load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny"]).model,
                              modalities=["acc"], patch_lens=[8], context_patches=16, horizon_patches=[1],
                              n_channel_ids=4)
    torch.manual_seed(0)
    meta = {"data": {"channel_ids": {"acc:X": 1, "acc:Y": 2, "acc:Z": 3}, "modalities": {"acc": {"rate": 32.0}},
                     "context_s": 4.0}}
    r = probe_basic_motions(NeuroFM(cfg).eval(), meta)
    assert r["chance"] == 0.25 and len(r["splits"]) == 3 and r["splits"][0]["split"] == "archive"
    assert r["n_test"] == {"Standing": 10, "Running": 10, "Walking": 10, "Badminton": 10}
    assert r["baseline"] > 0.6 and 0.0 <= r["model"] <= 1.0
    assert r["ci_low"] <= r["ci_high"] and r["diff"] == pytest.approx(np.mean([s["diff"] for s in r["splits"]]))
    assert probe_basic_motions(NeuroFM(cfg).eval(), {"data": {**meta["data"], "channel_ids": {}}}) is None


def test_sae_rows_carry_the_stimulus_phase_the_probe_gives_the_same_window(export_dir, meta, session, tasks):
    """NeuroFM's interpretability labels (`activation_labels`, on the dataset's file clock) agree with the
    probe's task-vs-rest labels (session clock) wherever both label a window; unlabelled rows get -1."""
    from neuraflex_ray.checkpoint import export_family
    from pipelines.timeseries import read_series

    task = tasks[TASK_VS_REST]
    probe = {round(float(t), 3): task.classes[y] for side in ("train", "test")
             for t, y in zip(task.starts[side], task.y[side], strict=True)}
    offset = next(r["start_s"] for r in meta["data"]["recordings"] if r["name"] == SYSTOLE.session)
    recs, starts = zip(*[read_series(meta["data"]["output_dir"], split)[1:] for split in ("train", "val")], strict=True)
    recs, starts = np.concatenate(recs).astype(str), np.concatenate(starts)
    n = len(recs)
    acts = {"activation": np.zeros((n, 4), np.float32), "recording": recs, "start_s": starts,
            "modalities": np.full(n, "ecg+eda+resp"), "position": np.zeros(n, np.int32)}
    rows = export_family(export_dir).activation_labels(export_dir, meta, acts)
    got = [rows.kinds[k] if k >= 0 else "" for k in rows.kind]
    assert {"systole: task", "systole: rest"} <= set(got) and "" in got
    assert {g.split(": ")[0] for g in got if g} <= {"systole", "fnirs_tapping", "fmri_events"}
    compared = 0
    for rec, start, label in zip(recs, starts, got, strict=True):
        t = round(float(start) - offset, 3)
        if rec == SYSTOLE.session and t in probe:
            assert label == f"systole: {probe[t]}", t
            compared += 1
    assert compared >= 20
    assert rows.describe(0)["modalities"] == "ecg+eda+resp"
