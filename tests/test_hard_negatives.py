"""Hard negatives (`data.hard_negatives`): the training split written as runs of neighbouring windows."""

from __future__ import annotations

import numpy as np
import pytest

from neuraflex_ray.config import ConfigError, RecordingSpec, load_config
from pipelines.hard_negatives import MAX_GAP_S, MIN_GAP_S, hard_negative_order, runs_of
from pipelines.timeseries import build_series_dataset, read_series
from tests.test_timeseries_pipeline import _cfg


def test_runs_are_neighbours_four_to_twenty_seconds_apart():
    starts = [2.0 * i for i in range(40)]  # hop 2 s, one gap where windows were rejected
    starts = [t for t in starts if not 30 <= t <= 44]
    runs, left = runs_of(starts, 4, hop_s=2.0)
    assert sorted([t for r in runs for t in r] + left) == sorted(starts)  # every window once
    for r in runs:
        gaps = np.diff(r)
        assert len(r) == 4 and (gaps >= MIN_GAP_S).all() and (gaps <= MAX_GAP_S).all(), r


def test_order_keeps_every_window_and_lays_units_whole():
    rng = np.random.default_rng(0)
    windows = [(name, 2.0 * i) for name in ("a", "b", "c") for i in range(30)]
    order = hard_negative_order(windows, 4, 2.0, rng)
    assert sorted(order) == sorted(windows)
    units = [order[i:i + 4] for i in range(0, len(order) - len(order) % 4, 4)]
    same = [u for u in units if len({n for n, _ in u}) == 1]
    assert len(same) >= 0.8 * len(units)  # most units are one recording's neighbours
    for u in same:
        t = sorted(s for _, s in u)
        if (np.diff(t) <= MAX_GAP_S).all():
            assert (np.diff(t) >= MIN_GAP_S).all()
    assert hard_negative_order(windows, 4, 2.0, np.random.default_rng(0)) == order  # seeded


def test_the_built_training_split_holds_runs_in_stored_order(tmp_path, ray_session):
    from tests.test_timeseries_pipeline import _smooth

    t = np.arange(120 * 50) / 50
    np.save(tmp_path / "a.npy", np.stack([_smooth(t, 1), _smooth(t, 2)]))
    np.save(tmp_path / "b.npy", np.stack([_smooth(t, 3), _smooth(t, 4)]))
    recs = [RecordingSpec(path=str(tmp_path / f"{n}.npy"), modality="acc", rate=50.0, channels=["X", "Y"], session=n)
            for n in ("a", "b")]
    build_series_dataset(_cfg(tmp_path, recs, hard_negatives=4))
    _, names, starts = read_series(str(tmp_path / "out"), "train")
    full = len(names) // 4 * 4
    runs = 0
    for i in range(0, full, 4):
        if len(set(names[i:i + 4])) == 1:
            gaps = np.diff(np.sort(starts[i:i + 4]))
            runs += bool((gaps >= MIN_GAP_S - 1e-6).all() and (gaps <= MAX_GAP_S + 1e-6).all())
    assert runs >= 0.8 * (full // 4)


def test_bad_settings_are_config_errors():
    base = "jobs/configs/neurofm_debug.yaml"
    with pytest.raises(ConfigError, match=r"data.hard_negatives=9: use 0 \(off\) or 2..6"):
        load_config(base, ["data.hard_negatives=9"])
    with pytest.raises(ConfigError, match="data.batch_by_modality both regroup"):
        load_config(base, ["data.hard_negatives=4", "data.batch_by_modality=true"])
    with pytest.raises(ConfigError, match="train.micro_batch_size=6 is not a multiple of data.hard_negatives=4"):
        load_config(base, ["data.hard_negatives=4", "train.micro_batch_size=6"])
    with pytest.raises(ConfigError, match="unknown sample set 'nope'"):
        load_config(base, ["data.samples=[nope]"])
    assert load_config(base, ["data.samples=[pyphysio, plux_extra]"]).data.samples == ["pyphysio", "plux_extra"]
