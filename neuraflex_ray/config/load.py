"""YAML files, dotted overrides and type checks: raw dicts in, typed `JobConfig` out.

Every key is checked against the section dataclasses (`schema.py`): an unknown key, a value of the
wrong type or an unknown flavour raises `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from neuraflex_ray.config.family import ConfigError, get_family
from neuraflex_ray.config.schema import JobConfig

# --------------------------------------------------------------------------------------------
# Loading, overrides, type checks
# --------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(value: Any, tp: Any, path: str, apply_flavour: bool = True) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise ConfigError."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {}, f"{path}.", apply_flavour)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(
            f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}; "
            f"set it to a {tp.__name__}, e.g. {path}={_example(tp)}"
        )
    if isinstance(tp, types.GenericAlias) and tp.__origin__ is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(v, tp.__args__[0], f"{path}[{i}]", apply_flavour) for i, v in enumerate(value)]
    if isinstance(tp, types.GenericAlias) and tp.__origin__ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _check_type(v, tp.__args__[1], f"{path}.{k}", apply_flavour) for k, v in value.items()}
    return value


def _example(tp: type) -> str:
    return {int: "8", float: "0.001", str: "name", bool: "true"}[tp]


def _merge_defaults(cls: type, name: str, value: Any) -> Any:
    """A mapping field (data.modalities) merges over its defaults, so `data.modalities.eeg.rate=256`
    changes one number instead of dropping every other modality."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not isinstance(default, dict):
        return value
    merged = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in default.items()}
    for k, v in value.items():
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def build(cls: type, raw: dict[str, Any], prefix: str, apply_flavour: bool = True,
          flavours: dict[str, dict[str, Any]] | None = None) -> Any:
    """A `cls` dataclass from a raw mapping, every key and type checked. `flavours`: the named presets
    of a model section (its `flavour` key picks one; explicit keys override it)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    migrate = getattr(cls, "migrate_raw", None)  # a section that reads an older spelling of its keys
    if migrate is not None:
        raw = migrate(raw)
    types_ = _field_types(cls)
    if cls is JobConfig:  # the model and data sections take the classes of the model type's family
        family = get_family(raw.get("model_type", JobConfig.model_type))
        types_ = {**types_, "model": family.model_config, "data": family.data_config}
        flavours_of = {"model": family.flavours}
    else:
        flavours_of = {}
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        known = ", ".join(sorted(types_))
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{prefix.rstrip('.') or '(top level)'}' are: {known}"
        )
    raw = dict(raw)
    if flavours and apply_flavour:
        flavour = raw.get("flavour", cls.flavour)
        if flavour not in flavours:
            raise ConfigError(f"{prefix}flavour: unknown flavour {flavour!r}; choose one of {sorted(flavours)}")
        raw = _over(flavours[flavour], raw)
    if cls is JobConfig:  # an absent section still takes its model type's class
        raw.setdefault("model", {})
        raw.setdefault("data", {})
    kwargs = {}
    for name, value in raw.items():
        if apply_flavour:
            value = _merge_defaults(cls, name, value)
        if name in flavours_of:
            kwargs[name] = build(types_[name], value or {}, f"{prefix}{name}.", apply_flavour, flavours_of[name])
        else:
            kwargs[name] = _check_type(value, types_[name], f"{prefix}{name}", apply_flavour)
    return cls(**kwargs)


def _over(base: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` over `base`, nested mappings merged key by key: a flavour's nested section (the BLT's
    `global_model`) keeps the keys the YAML does not set."""
    out = dict(base)
    for k, v in raw.items():
        out[k] = _over(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `raw` with `a.b.c` set to `value`, creating sections on the way."""
    raw = dict(raw)
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        child = node.get(p)
        node[p] = dict(child) if isinstance(child, dict) else {}
        node = node[p]
    node[parts[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw (YAML-loaded) dict; values parse as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        key, _, text = item.partition("=")
        value = yaml.safe_load(text) if text != "" else ""
        if isinstance(value, str) and _looks_float(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        raw = set_dotted(raw, key, value)
    return raw


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_raw(path: str | Path, field: str = "--config") -> dict[str, Any]:
    """A YAML config file as a plain dict (floats written like 1e-3 made floats)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: no such file {str(p)!r}; pass a YAML file such as jobs/configs/moe_debug.yaml")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{field}: {str(p)!r} must hold a YAML mapping of sections, got {type(raw).__name__}")
    # Floats written like 1e-3 are strings in YAML 1.1; accept them where a float is expected.
    return _coerce_float_strings(raw)


def config_from_raw(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a job config from a raw dict (a loaded YAML file with overrides applied)."""
    from neuraflex_ray.config.validate import validate

    cfg = build(JobConfig, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job config from YAML (or defaults), apply overrides, validate."""
    raw = load_raw(path) if path is not None else {}
    return config_from_raw(apply_overrides(raw, overrides or []))


def _coerce_float_strings(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _coerce_float_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_coerce_float_strings(v) for v in node]
    if isinstance(node, str) and _looks_float(node) and any(c in node.lower() for c in "e."):
        return float(node)
    return node
