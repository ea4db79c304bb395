"""Cross-field checks: impossible combinations raise `ConfigError` naming the field and the fix.

They run in the driver, before any Ray worker starts: the `train` and `finetune` sections here, the
model and data sections in the config's family (`Family.validate`).
"""

from __future__ import annotations

from pathlib import Path

from neuraflex_ray.config.family import ConfigError, Family, get_family
from neuraflex_ray.config.schema import JobConfig, TrainConfig

# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def need(ok: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `ok`: the one-line form every check here and in the families uses."""
    if not ok:
        raise ConfigError(msg)


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Raise ConfigError for impossible combinations, naming the field and the fix."""
    family = get_family(cfg.model_type)
    _validate_train(cfg.train)
    need(cfg.train.strategy in family.strategies,
         f"train.strategy={cfg.train.strategy!r}: model_type={cfg.model_type} trains with "
         f"{' or '.join(repr(s) for s in family.strategies)}")
    _validate_finetune(cfg, family)
    family.validate(cfg, world_size if world_size is not None else cfg.train.num_workers)


def _validate_finetune(cfg: JobConfig, family: Family) -> None:
    f = cfg.finetune
    methods = family.finetune_methods
    need(f.method in methods, f"finetune.method={f.method!r}: use {' or '.join(methods)}")
    need(not (f.from_export and f.from_hf), "finetune.from_export and finetune.from_hf are both set: a fine-tune "
         "starts from one model; keep one of them")
    if f.from_hf:
        need(Path(f.from_hf, "config.json").is_file(),
             f"finetune.from_hf={f.from_hf}: no config.json there; pass a Hugging Face model directory "
             f"(`neuraflex-ray export --format hf` writes one)")
    if not f.from_export and not f.from_hf:
        need(f.method == "full" and f.ewc_lambda == 0,
             "finetune.method/ewc_lambda need finetune.from_export: the export to fine-tune (set it, or use "
             "`neuraflex-ray finetune --from <export>` or `--from-hf <dir>`)")
        return
    need(bool(f.from_hf) or Path(f.from_export, "model.safetensors").is_file(),
         f"finetune.from_export={f.from_export}: no model.safetensors there; pass an export directory "
         f"(`neuraflex-ray export` writes one; a run keeps it in <run dir>/export)")
    need(f.lora_rank >= 1, f"finetune.lora_rank must be >= 1 (got {f.lora_rank})")
    need(f.lora_alpha > 0, f"finetune.lora_alpha must be > 0 (got {f.lora_alpha})")
    need(0 <= f.lora_dropout < 1, f"finetune.lora_dropout must be in [0, 1) (got {f.lora_dropout})")
    if f.method != "full":  # an adapter method (lora, svf): the weights it targets
        targets = family.lora_targets
        bad = [t for t in f.lora_targets if t not in targets]
        need(not bad and bool(f.lora_targets),
             f"finetune.lora_targets: {bad or 'empty'}; model_type={cfg.model_type} takes adapters on "
             f"{list(targets)} (e.g. finetune.lora_targets=[{targets[0] if targets else ''}])")
    need(f.ewc_lambda >= 0, f"finetune.ewc_lambda must be >= 0 (got {f.ewc_lambda})")
    need(f.fisher_blocks >= 1, f"finetune.fisher_blocks must be >= 1 (got {f.fisher_blocks})")


def _validate_train(t: TrainConfig) -> None:
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
