"""Typed run configuration: one object travels from the YAML file to every stage.

A job config is a YAML file with the sections `model`, `data` and `train` (plus `name` and
`output_dir`), overridden from the command line with dotted `key=value` pairs:

    python jobs/train_moe.py --config jobs/configs/moe_debug.yaml train.max_steps=50 model.top_k=1

Everything is checked here, in the driver, before any Ray worker starts: an unknown key, a value of
the wrong type or an impossible combination raises `ConfigError` naming the field and the fix.
"""

from neuraflex_ray.config.load import apply_overrides, build, config_from_raw, load_config, load_raw, set_dotted
from neuraflex_ray.config.schema import (
    MODEL_FLAVOURS,
    NEUROFM_FLAVOURS,
    ConfigError,
    CurriculumStage,
    DataConfig,
    FinetuneConfig,
    JobConfig,
    ModalitySpec,
    ModelConfig,
    NeuroFMConfig,
    RecordingSpec,
    SeriesDataConfig,
    TrainConfig,
)
from neuraflex_ray.config.validate import validate

__all__ = ["MODEL_FLAVOURS", "NEUROFM_FLAVOURS", "ConfigError", "CurriculumStage", "DataConfig", "FinetuneConfig", "JobConfig",
           "ModalitySpec", "ModelConfig", "NeuroFMConfig", "RecordingSpec", "SeriesDataConfig", "TrainConfig",
           "apply_overrides", "build", "config_from_raw", "load_config", "load_raw", "set_dotted", "validate"]
