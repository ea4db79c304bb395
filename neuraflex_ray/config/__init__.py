"""Typed run configuration: one object travels from the YAML file to every stage.

A job config is a YAML file with the sections `model`, `data` and `train` (plus `name`, `output_dir`,
`model_type` and `finetune`), overridden from the command line with dotted `key=value` pairs:

    python jobs/train_moe.py --config jobs/configs/moe_debug.yaml train.max_steps=50 model.top_k=1

`model_type` names the model family (`family.py`: the registry and the interface a family
implements); the `model` and `data` sections are that family's. Everything is checked here, in the
driver, before any Ray worker starts: an unknown key, a value of the wrong type or an impossible
combination raises `ConfigError` naming the field and the fix.
"""

from neuraflex_ray.config.family import (
    BUILTIN,
    DEFAULT_MODEL_TYPE,
    ConfigError,
    Family,
    get_family,
    register_family,
)
from neuraflex_ray.config.lm import MODEL_FLAVOURS, DataConfig, ModelConfig, model_for_data
from neuraflex_ray.config.load import apply_overrides, build, config_from_raw, load_config, load_raw, set_dotted
from neuraflex_ray.config.schema import FinetuneConfig, JobConfig, TrainConfig
from neuraflex_ray.config.series import (
    CURRICULUM_MODES,
    NEUROFM_FLAVOURS,
    AugmentConfig,
    CurriculumStage,
    ModalitySpec,
    NeuroFMConfig,
    RecordingSpec,
    SeriesDataConfig,
    neurofm_for_data,
)
from neuraflex_ray.config.validate import validate

__all__ = ["BUILTIN", "CURRICULUM_MODES", "DEFAULT_MODEL_TYPE", "MODEL_FLAVOURS", "NEUROFM_FLAVOURS", "AugmentConfig",
           "ConfigError", "CurriculumStage", "DataConfig", "Family", "FinetuneConfig", "JobConfig", "ModalitySpec",
           "ModelConfig", "NeuroFMConfig", "RecordingSpec", "SeriesDataConfig", "TrainConfig", "apply_overrides",
           "build", "config_from_raw", "get_family", "load_config", "load_raw", "model_for_data", "neurofm_for_data",
           "register_family", "set_dotted", "validate"]
