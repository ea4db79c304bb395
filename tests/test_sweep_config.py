"""Sweep YAMLs are checked before any trial starts: every bad space names its key (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neuraflex_ray.config import ConfigError
from neuraflex_ray.tune import load_sweep

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "jobs" / "configs" / "moe_debug.yaml")


def sweep_file(tmp_path: Path, **changes) -> Path:
    raw = {"name": "s", "output_dir": str(tmp_path / "sweeps"), "base": BASE,
           "resources": {"num_workers": 1}, "overrides": {"train": {"ep_size": 1}},
           "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    raw.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("config", ["tune_moe_debug.yaml", "tune_neurofm_debug.yaml", "tune_blt_debug.yaml",
                                    "tune_sae_debug.yaml"])
def test_shipped_sweeps_load(config):
    sweep = load_sweep(REPO / "jobs" / "configs" / config)
    assert sweep.cfg.space and sweep.base.train.num_workers == 1
    assert Path(sweep.base.data.output_dir).is_absolute()  # trials run in another working directory
    if sweep.base.model_type == "sae":
        assert Path(sweep.base.data.activations).is_absolute()


def test_resources_and_overrides_reach_every_trial(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, resources={"num_workers": 1, "cpus_per_worker": 2}))
    cfg = sweep.base
    assert (cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.ep_size) == (1, 2, 1)
    assert sweep.trial_raw({"train.lr": 0.5})["train"]["lr"] == 0.5


@pytest.mark.parametrize("space, needle", [
    ({"model.nope": {"type": "uniform", "low": 0, "high": 1}}, "space.model.nope"),
    ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.1}}, "space.train.lr: empty range"),
    ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "space.train.lr: loguniform needs low > 0"),
    ({"model.top_k": {"type": "choice", "values": []}}, "space.model.top_k: choice with no values"),
    ({"model.top_k": {"type": "choice", "values": [1, 8]}}, "model.top_k=8"),
    ({"model.top_k": {"type": "int", "low": 1.5, "high": 3}}, "space.model.top_k: type int needs whole"),
    ({"model.dim": {"type": "uniform", "low": 64, "high": 128}}, "space.model.dim"),
    ({"train.lr": {"type": "normal", "low": 0, "high": 1}}, "space.train.lr: type 'normal'"),
    ({"train.lr": {"type": "uniform", "high": 1}}, "space.train.lr: type uniform needs numbers low and high"),
    ({"data.seq_len": {"type": "choice", "values": [32, 64]}}, "space.data.seq_len: the dataset is built once"),
    ({"train.num_workers": {"type": "choice", "values": [1, 2]}}, "resources section"),
    ({}, "space: empty"),
])
def test_invalid_space_fails_before_any_trial_naming_the_key(tmp_path, space, needle):
    with pytest.raises(ConfigError) as e:
        load_sweep(sweep_file(tmp_path, space=space))
    assert needle in str(e.value)


@pytest.mark.parametrize("changes, needle", [
    ({"metric": "val_accuracy"}, "metric: 'val_accuracy' is not reported"),
    ({"mode": "up"}, "mode: 'up'"),
    ({"num_trials": 0}, "num_trials must be >= 1"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type: 'hyperband'"),
    ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor must be > 1"),
    ({"search": {"algorithm": "bayes"}}, "search.algorithm: 'bayes'"),
    ({"search": {"algorithm": "grid"}}, "space.train.lr: search.algorithm=grid takes choice parameters only"),
    ({"search": {"algorithm": "grid"}, "num_trials": 3, "space": {"model.top_k": {"type": "choice", "values": [1, 2]}}},
     "num_trials=3: the grid has 2 points"),
    ({"search": {"points_to_evaluate": [{"train.warmup_steps": 3}]}}, "points_to_evaluate[0].train.warmup_steps"),
    ({"search": {"points_to_evaluate": [{}]}}, "points_to_evaluate[0]: no value for"),
    ({"resources": {"gpus": 1}}, "resources.gpus: unknown"),
    ({"base": "missing.yaml"}, "base: no such file"),
    ({"overrides": {"train": {"ep_size": 1, "checkpoint_every": 30, "eval_every": 20}}},
     "train.checkpoint_every=30 is not a multiple"),
    ({"scheduler": {"type": "pbt"}, "search": {"algorithm": "random"},
      "space": {"model.aux_loss_weight": {"type": "uniform", "low": 0, "high": 1}}}, "PBT continues a trial"),
    ({"scheduler": {"type": "pbt"}}, "search.algorithm: Ray Tune refuses a search algorithm beside PBT"),
    ({"sapce": {}}, "unknown config key 'sapce'"),
])
def test_invalid_sweep_settings_name_the_field(tmp_path, changes, needle):
    with pytest.raises(ConfigError) as e:
        load_sweep(sweep_file(tmp_path, **changes))
    assert needle in str(e.value)


def test_neurofm_sweeps_may_search_augmentations(tmp_path):
    """data.augment acts on training batches, not on the dataset built once per sweep: searchable."""
    path = sweep_file(tmp_path, base=str(REPO / "jobs" / "configs" / "neurofm_debug.yaml"), overrides={},
                      space={"data.augment.noise_std": {"type": "uniform", "low": 0.0, "high": 0.2}})
    sweep = load_sweep(path)
    assert sweep.trial_raw({"data.augment.noise_std": 0.1})["data"]["augment"]["noise_std"] == 0.1
    with pytest.raises(ConfigError, match="data.augment.noise_std"):
        load_sweep(sweep_file(tmp_path, base=str(REPO / "jobs" / "configs" / "neurofm_debug.yaml"), overrides={},
                              space={"data.augment.noise_std": {"type": "uniform", "low": -1.0, "high": 0.2}}))
