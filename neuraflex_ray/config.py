"""Typed run configuration: one object travels from the YAML file to every stage.

A job config is a YAML file with the sections `model`, `data` and `train` (plus `name` and
`output_dir`), overridden from the command line with dotted `key=value` pairs:

    python jobs/train_moe.py --config jobs/configs/moe_debug.yaml train.max_steps=50 model.top_k=1

Everything is checked here, in the driver, before any Ray worker starts: an unknown key, a value of
the wrong type or an impossible combination raises `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the field and how to fix it."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """NeuralFlex-MoE architecture. `flavour` picks a named preset; explicit keys override it."""

    flavour: str = "debug"
    vocab_size: int = 0  # 0: taken from the dataset's tokenizer (rounded up to a multiple of 64)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 256
    num_experts: int = 4
    top_k: int = 2
    expert_ffn_dim: int = 256
    dense_ffn_dim: int = 512
    moe_every: int = 1  # MoE FFN in every N-th layer (1: all layers), dense SwiGLU otherwise
    shared_expert_ffn_dim: int = 0  # >0 adds an always-on shared expert beside the routed ones
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    # Capacity only matters when training on the DeepSpeed path: the local path and evaluation
    # are dropless.
    capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True


# Presets. `debug` trains in minutes on 2 CPU cores; `small` is a single-GPU model; `1b` is
# about 1.0B total parameters (about 0.2B active, 32k vocab) for a multi-GPU node.
MODEL_FLAVOURS: dict[str, dict[str, Any]] = {
    "debug": {},
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, expert_ffn_dim=64,
                 dense_ffn_dim=128, max_seq_len=128),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, num_experts=8, top_k=2,
                  expert_ffn_dim=1024, dense_ffn_dim=2048, max_seq_len=1024),
    "1b": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, num_experts=16, top_k=2,
               expert_ffn_dim=1152, dense_ffn_dim=4096, max_seq_len=2048, moe_every=1,
               shared_expert_ffn_dim=1152),
}


@dataclass
class DataConfig:
    """Text pipeline: where the text comes from and how it becomes fixed-length token blocks."""

    # "stdlib" (the running interpreter's standard library source, zero download), a local
    # file / directory / glob (.txt .md .py .jsonl .parquet), or a remote URI (s3://, gs://).
    source: str = "stdlib"
    text_field: str = "text"  # column / JSON key that holds the text for .jsonl and .parquet
    tokenizer: str = ""  # path to a Hugging Face tokenizer.json; empty: train a byte-level BPE
    vocab_size: int = 4096  # size of the BPE trained when `tokenizer` is empty
    seq_len: int = 128  # tokens per training example; blocks hold seq_len + 1 tokens
    val_fraction: float = 0.05  # share of documents held out (split by document, deterministic)
    max_bytes: int = 0  # cap on the corpus size in bytes (0: no cap)
    output_dir: str = "data/text"  # Parquet shards + manifest.json go here
    seed: int = 0


@dataclass
class TrainConfig:
    strategy: str = "deepspeed"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    ep_size: int = 2
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 16  # validation micro-batches per rank per evaluation
    log_every: int = 10
    checkpoint_every: int = 100
    num_to_keep: int = 2
    max_failures: int = 1  # automatic restarts from the last checkpoint after a worker failure
    seed: int = 0
    resume_from: str = ""  # a run directory (or one checkpoint directory) to continue from
    inject_failure_at_step: int = 0  # testing: the last worker raises once at this step (0: never)


@dataclass
class JobConfig:
    name: str = "quickstart"
    output_dir: str = "runs"  # run directory = output_dir/name (TensorBoard, checkpoints, export)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Rebuild from `to_dict()` output (used inside Ray workers); no flavour re-application."""
        return _build(cls, d, "", apply_flavour=False)


# --------------------------------------------------------------------------------------------
# Loading, overrides, type checks
# --------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise ConfigError."""
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
        return [_check_type(v, tp.__args__[0], f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _example(tp: type) -> str:
    return {int: "8", float: "0.001", str: "name", bool: "true"}[tp]


def _build(cls: type, raw: dict[str, Any], prefix: str, apply_flavour: bool = True) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        known = ", ".join(sorted(types_))
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{prefix.rstrip('.') or '(top level)'}' are: {known}"
        )
    raw = dict(raw)
    if cls is ModelConfig and apply_flavour:
        flavour = raw.get("flavour", ModelConfig.flavour)
        if flavour not in MODEL_FLAVOURS:
            raise ConfigError(
                f"{prefix}flavour: unknown flavour {flavour!r}; choose one of {sorted(MODEL_FLAVOURS)}"
            )
        raw = {**MODEL_FLAVOURS[flavour], **raw}
    kwargs = {}
    for name, value in raw.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.", apply_flavour)
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw (YAML-loaded) dict; values parse as YAML scalars."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        key, _, text = item.partition("=")
        value = yaml.safe_load(text) if text != "" else ""
        if isinstance(value, str) and _looks_float(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return raw


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job config from YAML (or defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}; pass a YAML file such as jobs/configs/moe_debug.yaml")
        raw = yaml.safe_load(p.read_text()) or {}
        # Floats written like 1e-3 are strings in YAML 1.1; accept them where a float is expected.
        raw = _coerce_float_strings(raw)
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(JobConfig, raw, "")
    validate(cfg)
    return cfg


def _coerce_float_strings(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _coerce_float_strings(v) for k, v in node.items()}
    if isinstance(node, str) and _looks_float(node) and any(c in node.lower() for c in "e."):
        return float(node)
    return node


# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Raise ConfigError for impossible combinations, naming the field and the fix."""
    m, d, t = cfg.model, cfg.data, cfg.train
    world = world_size if world_size is not None else t.num_workers

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "num_experts", "top_k", "expert_ffn_dim",
                 "max_seq_len", "moe_every"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    need(m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    need((m.dim // m.n_heads) % 2 == 0, f"model.dim/model.n_heads={m.dim // m.n_heads} must be even for rotary positions")
    need(m.n_heads % m.n_kv_heads == 0,
         f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads} (grouped-query attention)")
    need(m.top_k <= m.num_experts,
         f"model.top_k={m.top_k} is larger than model.num_experts={m.num_experts}; set model.top_k <= {m.num_experts}")
    need(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = from the tokenizer), got {m.vocab_size}")
    need(m.capacity_factor > 0, f"model.capacity_factor must be > 0 (got {m.capacity_factor})")

    need(d.seq_len > 0, f"data.seq_len must be > 0 (got {d.seq_len})")
    need(d.seq_len <= m.max_seq_len,
         f"data.seq_len={d.seq_len} is over the model's maximum model.max_seq_len={m.max_seq_len}; "
         f"lower data.seq_len or raise model.max_seq_len")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.vocab_size >= 260, f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE (>= 260)")

    need(t.strategy in ("deepspeed",), f"train.strategy={t.strategy!r} is not known; use 'deepspeed'")
    need(t.num_workers >= 1, f"train.num_workers must be >= 1 (got {t.num_workers})")
    need(t.ep_size >= 1, f"train.ep_size must be >= 1 (got {t.ep_size})")
    need(m.num_experts % t.ep_size == 0,
         f"model.num_experts={m.num_experts} is not divisible by train.ep_size={t.ep_size}; "
         f"choose train.ep_size among {[e for e in range(1, m.num_experts + 1) if m.num_experts % e == 0]}")
    need(world % t.ep_size == 0,
         f"the world size train.num_workers={world} is not divisible by train.ep_size={t.ep_size}; "
         f"set train.ep_size to a divisor of {world}")
    need(t.zero_stage in (0, 1, 2),
         f"train.zero_stage={t.zero_stage}: DeepSpeed MoE supports ZeRO stages 0, 1 and 2 (stage 3 is refused); use 2")
    need(t.precision in ("auto", "fp32", "bf16"), f"train.precision={t.precision!r}: use auto, fp32 or bf16")
    need(not (t.precision == "bf16" and not t.use_gpu),
         "train.precision=bf16 needs train.use_gpu=true; CPU training runs in fp32 (use precision=auto)")
    for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_every", "eval_batches",
                 "log_every", "checkpoint_every", "num_to_keep", "cpus_per_worker"):
        need(getattr(t, name) > 0, f"train.{name} must be > 0 (got {getattr(t, name)})")
    need(t.max_failures >= 0, f"train.max_failures must be >= 0 (got {t.max_failures})")
    need(t.lr > 0, f"train.lr must be > 0 (got {t.lr})")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
