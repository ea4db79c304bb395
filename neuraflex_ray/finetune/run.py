"""A fine-tune end to end: train from an export on Ray Train, then export what changed.

    neuraflex-ray finetune --from runs/quickstart/export --config jobs/configs/finetune_kjv.yaml [key=value ...]

Training is the ordinary Ray Train loop with the ordinary strategy (DeepSpeed, expert parallelism
included): checkpoints, resume and worker-failure recovery are those of training. Afterwards:

- `finetune.method: full` writes a consolidated export (`<run dir>/export`), like training does;
- `finetune.method: lora` or `svf` writes the adapter alone (`<run dir>/adapter`: adapter.safetensors +
  adapter.json naming the base export's fingerprint); `neuraflex-ray merge` folds it into a full export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import (
    ADAPTER_SUFFIXES,
    FSDP,
    consolidate_deepspeed_adapter,
    consolidate_fsdp,
    export_checkpoint,
    fingerprint,
    load_exported,
    plain_name,
    read_checkpoint_state,
    save_adapter,
    write_export,
)
from neuraflex_ray.config import JobConfig
from neuraflex_ray.finetune.methods import adapter_method


def consolidate_adapter(checkpoint_dir: str | Path, cfg: JobConfig) -> dict[str, torch.Tensor]:
    """The adapter tensors of a fine-tune's checkpoint, in the local layout, whichever engine wrote it."""
    if read_checkpoint_state(checkpoint_dir)["strategy"] != FSDP:
        return consolidate_deepspeed_adapter(checkpoint_dir)
    # FSDP2 (DCP): loaded into a model adapted as training adapted it.
    method = adapter_method(cfg.finetune.method)
    state, _ = consolidate_fsdp(checkpoint_dir, adapt=lambda m: method.attach(m, cfg.finetune))
    return {plain_name(k): v for k, v in state.items() if plain_name(k).endswith(ADAPTER_SUFFIXES)}


def export_finetune(cfg: JobConfig, checkpoint: str | Path, run_dir: Path, steps: int) -> Path:
    """What a fine-tune produces: an adapter (lora, svf) or a consolidated export (full)."""
    f = cfg.finetune
    meta = {"finetuned_from": f.from_export, "base_fingerprint": fingerprint(f.from_export), "run_dir": str(run_dir),
            "steps": steps, "method": f.method, "ewc_lambda": f.ewc_lambda,
            "data_dir": str(Path(cfg.data.output_dir).resolve())}  # what dispatch fits its classifier on
    if f.method == "full":
        return export_checkpoint(checkpoint, cfg.data.output_dir, run_dir / "export", meta)
    state = consolidate_adapter(checkpoint, cfg)
    base_params = sum(p.numel() for p in _base_model(f.from_export).parameters())
    adapter_params = sum(v.numel() for v in state.values())
    return save_adapter(state, {**meta, **adapter_method(f.method).settings(f), "targets": f.lora_targets,
                                "base_export": f.from_export, "adapter_params": adapter_params,
                                "base_params": base_params}, run_dir / "adapter")


def _base_model(export: str | Path) -> torch.nn.Module:
    return load_exported(export)[0]


def finetune(cfg: JobConfig, fresh: bool = False) -> dict[str, Any]:
    """Train from `cfg.finetune.from_export` (or `from_hf`) on `cfg.data`, export, and report held-out bits/byte."""
    from neuraflex_ray.finetune.setup import finetune_config, import_hf_base
    from neuraflex_ray.train.driver import ensure_ray, train

    ensure_ray(cfg)
    cfg = finetune_config(import_hf_base(cfg))
    result = train(cfg, fresh=fresh)
    run_dir = Path(result["run_dir"])
    out = export_finetune(cfg, result["checkpoint"], run_dir, result["steps"])
    kind = "export" if cfg.finetune.method == "full" else "adapter"
    print(f"[finetune] {kind} -> {out}", flush=True)
    return {"run_dir": str(run_dir), kind: str(out), "steps": result["steps"], "val_loss": result.get("val_loss"),
            "checkpoint": str(result["checkpoint"]), "restored_from_step": result.get("restored_from_step")}


def merge_adapter(base: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """base export + adapter -> a full export (the adapter folded into the weights)."""
    from neuraflex_ray.finetune.methods import load_adapter, merge_adapters

    base = Path(base).resolve()
    model, base_meta = load_exported(base)
    meta = load_adapter(model, adapter, base)
    merge_adapters(model)
    extra = {k: v for k, v in base_meta.items() if k not in ("model_type", "model")}
    # Whatever else the base export holds beside its weights (an LM's tokenizer.json) comes along.
    files = {f.name: f for f in base.iterdir() if f.is_file() and f.name not in ("model.safetensors", "config.json")
             and not f.name.startswith(("fisher.", "."))}
    return write_export(model.state_dict(), model.cfg, base_meta["model_type"], out_dir,
                        {**extra, "merged_adapter": str(Path(adapter).resolve()), "adapter": meta}, files)
