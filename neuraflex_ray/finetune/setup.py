"""A fine-tune's job config and its model set-up inside each Ray Train worker.

`finetune_config` (driver): the model section comes from the export, so the run trains the model
that was exported, and the export's Fisher is computed once when EWC asks for it.
`adapt_for_finetune` (worker, after parallelisation): LoRA adapters and the EWC penalty.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from neuraflex_ray.config import ConfigError, JobConfig, ModelConfig


def finetune_config(cfg: JobConfig) -> JobConfig:
    """The job as it trains: model = the export's model; the Fisher file beside the export, if EWC is on."""
    f = cfg.finetune
    export = Path(f.from_export).expanduser().resolve()
    meta = json.loads((export / "config.json").read_text())
    kind = meta.get("model_type", "moe_lm")
    if kind != cfg.model_type:
        raise ConfigError(f"finetune.from_export={export}: a {kind} export, but the config says model_type="
                          f"{cfg.model_type}; set model_type={kind}")
    if kind == "neurofm":
        return _neurofm_finetune_config(cfg, export, meta)
    model = ModelConfig(**meta["model"])
    if cfg.data.tokenizer == "":  # the new corpus is read with the base's tokenizer, or token ids would mismatch
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(export / "tokenizer.json")))
    cfg = dataclasses.replace(cfg, model=model, finetune=dataclasses.replace(f, from_export=str(export)))
    if f.ewc_lambda > 0:
        from neuraflex_ray.finetune.ewc import fisher_for_export

        original = meta.get("data", {}).get("output_dir")
        if not original or not Path(original).is_dir():
            raise ConfigError(f"finetune.ewc_lambda: EWC needs the export's original training data for its Fisher, "
                              f"and {export}/config.json names {original!r}, which is not there")
        fisher_for_export(export, original, f.fisher_blocks)
    return cfg


def _neurofm_finetune_config(cfg: JobConfig, export: Path, meta: dict[str, Any]) -> JobConfig:
    """NeuroFM: the export's model, and its channel table so the new recordings' channels keep their ids."""
    if cfg.finetune.ewc_lambda > 0:
        raise ConfigError("finetune.ewc_lambda: EWC is built for NeuralFlex-MoE exports only so far; set it to 0 "
                          "for NeuroFM (LoRA alone keeps the base frozen)")
    model = JobConfig.from_dict({"model_type": "neurofm", "model": meta["model"]}).model
    data = dataclasses.replace(cfg.data, channel_table=dict(meta.get("data", {}).get("channel_ids", {})))
    return dataclasses.replace(cfg, model=model, data=data,
                               finetune=dataclasses.replace(cfg.finetune, from_export=str(export)))


def adapt_for_finetune(model: nn.Module, cfg: JobConfig) -> tuple[nn.Module, Any]:
    """LoRA adapters (method lora) and the EWC penalty (ewc_lambda > 0) for `model` in its parallel layout."""
    f = cfg.finetune
    if not f.from_export:
        return model, None
    import torch.distributed as dist

    from neuraflex_ray.finetune.lora import apply_lora
    from neuraflex_ray.train.loop import log  # not print(): Train V2 would echo it twice

    if f.method == "lora":
        counts = apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets)
        if not dist.is_initialized() or dist.get_rank() == 0:
            log(f"[finetune] LoRA rank {f.lora_rank} on {', '.join(f.lora_targets)}: {counts['trainable']:,} of "
                f"{counts['total']:,} parameters of this rank's model train ({100 * counts['share']:.2f}%)")
    elif not dist.is_initialized() or dist.get_rank() == 0:
        n = sum(p.numel() for p in model.parameters())
        log(f"[finetune] full: all {n:,} parameters of this rank's model train")
    if f.ewc_lambda <= 0:
        return model, None
    from safetensors.torch import load_file

    from neuraflex_ray.checkpoint import to_local_name
    from neuraflex_ray.finetune.ewc import EWC, FISHER_FILE
    from neuraflex_ray.parallel.deepspeed_moe import DS_EXPERT_PARAM

    fisher = load_file(str(Path(f.from_export) / FISHER_FILE))
    ep = cfg.train.ep_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    n_local = cfg.model.num_experts // ep if cfg.model.num_experts else 0

    def local_name(name: str) -> str:
        m = DS_EXPERT_PARAM.match(name)
        return f"{m.group(1)}.{m.group(3)}" if m and not m.group(4) else to_local_name(name)

    def expert_index(name: str) -> int | None:
        m = DS_EXPERT_PARAM.match(name)
        return (rank % ep) * n_local + int(m.group(2)) if m and not m.group(4) else None

    return model, EWC(model, fisher, f.ewc_lambda, local_name, expert_index)
