"""A fine-tune's job config and its model set-up inside each Ray Train worker.

`finetune_config` (driver): the model section comes from the export, so the run trains the model
that was exported, and the export's Fisher is computed once when EWC asks for it.
`adapt_for_finetune` (worker, inside the strategy's set-up): LoRA or SVF adapters.
`ewc_for_finetune` (worker, once the strategy has placed the parameters, before a checkpoint is
restored, so the anchor is the export): the EWC penalty.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from neuraflex_ray.checkpoint import read_export_meta
from neuraflex_ray.config import ConfigError, JobConfig, get_family


def import_hf_base(cfg: JobConfig) -> JobConfig:
    """`finetune.from_hf`: the Hugging Face directory imported as an export into <run dir>/hf-import (the
    family converts it), which the run then starts from as `finetune.from_export`."""
    f = cfg.finetune
    if not f.from_hf:
        return cfg
    export = get_family(cfg.model_type).import_hf(Path(f.from_hf).expanduser().resolve(), cfg.run_dir / "hf-import")
    print(f"[finetune] imported {f.from_hf} -> {export}", flush=True)
    return dataclasses.replace(cfg, finetune=dataclasses.replace(f, from_export=str(export), from_hf=""))


def finetune_config(cfg: JobConfig) -> JobConfig:
    """The job as it trains: the export's model (its family says what else the new data must keep) and the
    Fisher file beside the export, if EWC is on."""
    f = cfg.finetune
    export = Path(f.from_export).expanduser().resolve()
    meta = read_export_meta(export)
    kind = meta["model_type"]
    if kind != cfg.model_type:
        raise ConfigError(f"finetune.from_export={export}: a {kind} export, but the config says model_type="
                          f"{cfg.model_type}; set model_type={kind}")
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(f, from_export=str(export)))
    cfg = get_family(kind).finetune_config(cfg, export, meta)
    _ensure_fisher(cfg, export, meta)
    return cfg


def _ensure_fisher(cfg: JobConfig, export: Path, meta: dict[str, Any]) -> None:
    """EWC's Fisher, estimated on the export's original training data (named in its config.json) once."""
    if cfg.finetune.ewc_lambda <= 0:
        return
    from neuraflex_ray.finetune.ewc import fisher_for_export

    original = meta.get("data", {}).get("output_dir")
    if not original or not Path(original).is_dir():
        raise ConfigError(f"finetune.ewc_lambda: EWC needs the export's original training data for its Fisher, "
                          f"and {export}/config.json names {original!r} (data.output_dir), which is not there; "
                          f"set it to the dataset the export was trained on, or set finetune.ewc_lambda=0")
    fisher_for_export(export, original, cfg.finetune.fisher_blocks)


def adapt_for_finetune(model: nn.Module, cfg: JobConfig) -> nn.Module:
    """Adapters (method lora or svf: `methods.py`) for `model` in its parallel layout; the model as is
    otherwise."""
    f = cfg.finetune
    if not f.from_export:
        return model
    import torch.distributed as dist

    from neuraflex_ray.finetune.methods import METHODS
    from neuraflex_ray.train.loop import log  # not print(): Train V2 would echo it twice

    first = not dist.is_initialized() or dist.get_rank() == 0
    if f.method in METHODS:
        method = METHODS[f.method]
        counts = method.attach(model, f)
        if first:
            log(f"[finetune] {method.label} on {', '.join(f.lora_targets)}: {counts['trainable']:,} of "
                f"{counts['total']:,} parameters of this rank's model train ({100 * counts['share']:.2f}%)")
    elif first:
        n = sum(p.numel() for p in model.parameters())
        log(f"[finetune] full: all {n:,} parameters of this rank's model train")
    return model


def ewc_for_finetune(model: nn.Module, cfg: JobConfig) -> Any:
    """The EWC penalty toward the export's weights (finetune/ewc.py), or None without ewc_lambda. Built
    on the parameters as the strategy left them: DeepSpeed's expert-parallel layout, FSDP2's shards."""
    f = cfg.finetune
    if not f.from_export or f.ewc_lambda <= 0:
        return None
    import torch.distributed as dist
    from safetensors.torch import load_file

    from neuraflex_ray.finetune.ewc import EWC, FISHER_FILE
    from neuraflex_ray.parallel.deepspeed_moe import DS_EXPERT_PARAM, to_local_name

    fisher = load_file(str(Path(f.from_export) / FISHER_FILE))
    ep = cfg.train.ep_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    experts = getattr(cfg.model, "num_experts", 0)  # NeuroFM has none
    n_local = experts // ep if experts else 0

    def local_name(name: str) -> str:
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")  # FSDP2 wrappers
        m = DS_EXPERT_PARAM.match(name)
        return f"{m.group(1)}.{m.group(3)}" if m and not m.group(4) else to_local_name(name)

    def expert_index(name: str) -> int | None:
        m = DS_EXPERT_PARAM.match(name)
        return (rank % ep) * n_local + int(m.group(2)) if m and not m.group(4) else None

    return EWC(model, fisher, f.ewc_lambda, local_name, expert_index)
