"""Cross-field checks: impossible combinations raise `ConfigError` naming the field and the fix.

They run in the driver, before any Ray worker starts.
"""

from __future__ import annotations

import math
from pathlib import Path

from neuraflex_ray.config.schema import CURRICULUM_MODES, ConfigError, JobConfig, NeuroFMConfig, TrainConfig
from neuraflex_ray.models.routers import ROUTERS

# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Raise ConfigError for impossible combinations, naming the field and the fix."""
    _validate_train(cfg.train)
    _validate_finetune(cfg)
    if cfg.model_type == "neurofm":
        _validate_neurofm(cfg)
    else:
        _validate_moe(cfg, world_size if world_size is not None else cfg.train.num_workers)


def _validate_finetune(cfg: JobConfig) -> None:
    f, need = cfg.finetune, _need
    from neuraflex_ray.finetune.lora import TARGETS

    need(f.method in ("full", "lora"), f"finetune.method={f.method!r}: use full or lora")
    if not f.from_export:
        need(f.method == "full" and f.ewc_lambda == 0,
             "finetune.method/ewc_lambda need finetune.from_export: the export to fine-tune (set it, or use "
             "`neuraflex-ray finetune --from <export>`)")
        return
    need(Path(f.from_export, "model.safetensors").is_file(),
         f"finetune.from_export={f.from_export}: no model.safetensors there; pass an export directory "
         f"(`neuraflex-ray export` writes one; a run keeps it in <run dir>/export)")
    if cfg.model_type == "neurofm":
        need(f.method == "full" or f.lora_targets == ["linear"],
             f"finetune.lora_targets={f.lora_targets}: NeuroFM's adapters go on its linear layers; set "
             f"finetune.lora_targets=[linear]")
    need(f.lora_rank >= 1, f"finetune.lora_rank must be >= 1 (got {f.lora_rank})")
    need(f.lora_alpha > 0, f"finetune.lora_alpha must be > 0 (got {f.lora_alpha})")
    need(0 <= f.lora_dropout < 1, f"finetune.lora_dropout must be in [0, 1) (got {f.lora_dropout})")
    bad = [t for t in f.lora_targets if t not in TARGETS]
    need(not bad and bool(f.lora_targets), f"finetune.lora_targets: {bad or 'empty'}; choose from {list(TARGETS)}")
    need(f.ewc_lambda >= 0, f"finetune.ewc_lambda must be >= 0 (got {f.ewc_lambda})")
    need(f.fisher_blocks >= 1, f"finetune.fisher_blocks must be >= 1 (got {f.fisher_blocks})")


def _validate_moe(cfg: JobConfig, world: int) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    need = _need
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "top_k", "expert_ffn_dim", "max_seq_len", "moe_every",
                 "sinkhorn_iters"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    need(m.num_experts >= 0, f"model.num_experts must be >= 0 (0: the dense baseline), got {m.num_experts}")
    need(m.router in ROUTERS, f"model.router={m.router!r} is not known; use one of {list(ROUTERS)}")
    need(m.balance_bias_rate >= 0, f"model.balance_bias_rate must be >= 0 (got {m.balance_bias_rate})")
    need(m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    need((m.dim // m.n_heads) % 2 == 0, f"model.dim/model.n_heads={m.dim // m.n_heads} must be even for rotary positions")
    need(m.n_heads % m.n_kv_heads == 0,
         f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads} (grouped-query attention)")
    need(m.num_experts == 0 or m.top_k <= m.num_experts,
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
    need(m.num_experts > 0 or t.ep_size == 1,
         f"train.ep_size={t.ep_size} with model.num_experts=0: the dense baseline has no experts to shard; "
         f"set train.ep_size=1")
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
    backbones = ("transformer", "ssm")
    need(m.backbone in backbones, f"model.backbone={m.backbone!r} is not known; use one of {list(backbones)}")
    for name in ("ssm_state", "ssm_expand", "ssm_conv"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)}); "
                                   f"the default is {getattr(NeuroFMConfig, name)}")
    need(0.0 < m.mask_ratio < 1.0, f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    need(0.0 <= m.channel_mask_prob <= 1.0, f"model.channel_mask_prob must be in [0, 1], got {m.channel_mask_prob}")
    for name in ("recon_weight", "forecast_weight", "contrastive_weight", "variance_weight", "variance_target"):
        need(getattr(m, name) >= 0, f"model.{name} must be >= 0 (got {getattr(m, name)})")
    need(m.recon_weight + m.forecast_weight + m.contrastive_weight > 0,
         "model.recon_weight, model.forecast_weight and model.contrastive_weight are all 0: nothing to train")
    need(m.contrastive_temperature > 0, f"model.contrastive_temperature must be > 0 (got {m.contrastive_temperature})")
    for i, s in enumerate(m.curriculum):
        need(s.mode in CURRICULUM_MODES, f"model.curriculum[{i}].mode={s.mode!r}: use one of {list(CURRICULUM_MODES)}")
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
    # data.augment: written as `lo <= x <= hi` so that NaN (YAML .nan) fails too.
    a = d.augment
    need(0.0 <= a.modality_dropout < 1.0,
         f"data.augment.modality_dropout must be in [0, 1) (got {a.modality_dropout}); 0 turns it off")
    need(0.0 <= a.noise_std < math.inf, f"data.augment.noise_std must be a finite value >= 0 (got {a.noise_std}); 0 turns it off")
    need(0.0 <= a.time_mask_prob <= 1.0,
         f"data.augment.time_mask_prob must be in [0, 1] (got {a.time_mask_prob}); 0 turns it off")
    need(0.0 <= a.time_mask_s < math.inf, f"data.augment.time_mask_s must be a finite value >= 0 seconds (got {a.time_mask_s})")
    if a.time_mask_prob > 0:
        need(0.0 < a.time_mask_s < d.context_s,
             f"data.augment.time_mask_s={a.time_mask_s} must be in (0, data.context_s={d.context_s}) seconds when "
             f"data.augment.time_mask_prob > 0: the span is hidden inside the context")
    need(0.0 <= a.time_warp <= 0.5,
         f"data.augment.time_warp must be in [0, 0.5] (got {a.time_warp}): a speed-up by 1 + time_warp repeats the "
         f"first sample over the first time_warp / (1 + time_warp) of the window; 0 turns it off")
    window_s, repeated = d.context_s + max(d.horizons_s), a.time_warp / (1 + a.time_warp)
    need(repeated < d.context_s / window_s,
         f"data.augment.time_warp={a.time_warp}: a speed-up would repeat the first sample over {repeated:.0%} of the "
         f"window, past the context (data.context_s={d.context_s} of {window_s:g} s) into the forecast targets; "
         f"lower data.augment.time_warp below {d.context_s / (window_s - d.context_s):.3g}")


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
