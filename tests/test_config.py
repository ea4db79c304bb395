"""Config errors surface in the driver, before any worker starts, naming the field and the fix."""

import pytest

from neuraflex_ray.config import ConfigError, JobConfig, load_config

DEBUG = "jobs/configs/moe_debug.yaml"


def test_debug_config_loads_with_overrides():
    cfg = load_config(DEBUG, ["train.lr=1e-3", "model.top_k=1", "train.max_steps=7"])
    assert isinstance(cfg, JobConfig)
    assert cfg.train.lr == 1e-3 and cfg.model.top_k == 1 and cfg.train.max_steps == 7
    assert JobConfig.from_dict(cfg.to_dict()) == cfg


def test_flavour_preset_then_explicit_keys():
    cfg = load_config(None, ["model.flavour=small", "model.dim=256"])
    assert cfg.model.dim == 256 and cfg.model.n_layers == 8 and cfg.model.num_experts == 8


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        (["train.learning_rate=1e-3"], "train.learning_rate", "valid keys"),
        (["train.max_steps=ten"], "train.max_steps", "expected int"),
        (["model.num_experts=6", "train.ep_size=4", "train.num_workers=4"], "model.num_experts", "train.ep_size"),
        (["train.num_workers=3", "train.ep_size=2"], "train.num_workers", "divisor"),
        (["model.top_k=8"], "model.top_k", "<="),
        (["data.seq_len=512"], "data.seq_len", "model.max_seq_len"),
        (["train.zero_stage=3"], "train.zero_stage", "stage 3"),
        (["model.flavour=huge"], "flavour", "choose one of"),
        (["train.precision=bf16"], "train.precision", "use_gpu"),
    ],
)
def test_bad_config_names_field_and_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, overrides)
    assert field in str(e.value) and fix in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config"):
        load_config("jobs/configs/nope.yaml")


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEBUG, ["train.lr"])


def test_flavour_sizes():
    from neuraflex_ray.models.moe_lm import param_counts

    def total(flavour: str) -> int:
        return param_counts(load_config(None, [f"model.flavour={flavour}", "model.vocab_size=32768"]).model)["total"]

    assert 0.9e9 < total("1b") < 1.2e9  # the ~1B-total GPU flavour
    assert total("debug") < 10e6 < total("small")
