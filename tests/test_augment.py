"""Training-time augmentations (pipelines/augment.py), their config and NeuroTask's hook.

CPU only, tiny tensors and a tiny NeuroFM, no Ray and no process group.
"""

from __future__ import annotations

import dataclasses

import pytest

from neuraflex_ray.config import ConfigError, JobConfig, load_config
from neuraflex_ray.config.schema import AugmentConfig

ALL_ON = AugmentConfig(modality_dropout=0.5, noise_std=0.3, time_mask_prob=0.7, time_mask_s=1.3, time_warp=0.2)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

NEURO = ["model_type=neurofm", "train.strategy=fsdp"]


def test_augment_config_loads_and_travels_to_the_workers():
    cfg = load_config(None, [*NEURO, "data.augment.modality_dropout=0.2", "data.augment.noise_std=0.05",
                             "data.augment.time_mask_prob=0.5", "data.augment.time_mask_s=0.5", "data.augment.time_warp=0.1"])
    assert cfg.data.augment == AugmentConfig(0.2, 0.05, 0.5, 0.5, 0.1) and cfg.data.augment.enabled
    assert JobConfig.from_dict(cfg.to_dict()) == cfg  # how Ray workers rebuild it
    assert not load_config(None, NEURO).data.augment.enabled  # all off by default


@pytest.mark.parametrize("overrides, field, valid_range", [
    (["data.augment.modality_dropout=1.0"], "data.augment.modality_dropout", "[0, 1)"),
    (["data.augment.modality_dropout=-0.1"], "data.augment.modality_dropout", "[0, 1)"),
    (["data.augment.noise_std=-0.1"], "data.augment.noise_std", ">= 0"),
    (["data.augment.noise_std=.nan"], "data.augment.noise_std", ">= 0"),
    (["data.augment.time_mask_prob=1.5"], "data.augment.time_mask_prob", "[0, 1]"),
    (["data.augment.time_mask_prob=0.5"], "data.augment.time_mask_s", "(0, data.context_s=4.0)"),
    (["data.augment.time_mask_prob=0.5", "data.augment.time_mask_s=4.0"], "data.augment.time_mask_s", "(0, data.context_s"),
    (["data.augment.time_warp=0.6"], "data.augment.time_warp", "[0, 0.5]"),
    (["data.augment.time_warp=0.5", "data.context_s=1.0", "data.horizons_s=[2.0]"], "data.augment.time_warp", "below 0.5"),
    (["data.augment.time_wrap=0.1"], "data.augment.time_wrap", "valid keys"),
    (["data.augment.noise_std=high"], "data.augment.noise_std", "expected float"),
])
def test_bad_augment_config_names_field_and_range(overrides, field, valid_range):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*NEURO, *overrides])
    assert field in str(e.value) and valid_range in str(e.value), str(e.value)


def test_augment_is_not_part_of_the_dataset():
    """The build's fingerprint and the plan its Ray tasks write from ignore data.augment: changing it
    neither rebuilds the dataset nor changes a Parquet row."""
    from pipelines.series_prep import plan_layout
    from pipelines.timeseries import _fingerprint

    off = load_config(None, NEURO).data
    on = dataclasses.replace(off, augment=ALL_ON)
    assert _fingerprint(on, []) == _fingerprint(off, [])
    assert plan_layout(on) == plan_layout(off)
    # Control: a data field that does change the output changes the fingerprint.
    assert _fingerprint(dataclasses.replace(off, hop_s=1.0), []) != _fingerprint(off, [])
