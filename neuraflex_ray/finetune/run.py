"""A fine-tune end to end: train from an export on Ray Train, then export what changed.

    neuraflex-ray finetune --from runs/quickstart/export --config jobs/configs/finetune_kjv.yaml [key=value ...]

Training is the ordinary Ray Train loop with the ordinary strategy (DeepSpeed, expert parallelism
included): checkpoints, resume and worker-failure recovery are those of training. Afterwards:

- `finetune.method: full` writes a consolidated export (`<run dir>/export`), like training does;
- `finetune.method: lora` writes the adapter alone (`<run dir>/adapter`: adapter.safetensors +
  adapter.json naming the base export's fingerprint); `neuraflex-ray merge` folds it into a full export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.config import JobConfig
from neuraflex_ray.finetune.lora import LORA_SUFFIXES, fingerprint, plain_name, save_adapter


def consolidate_adapter(checkpoint_dir: str | Path, num_experts: int) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a DeepSpeed checkpoint (any ep_size), in the local layout."""
    from neuraflex_ray.checkpoint import _EXPERT_FILE, _main_file
    from neuraflex_ray.parallel.deepspeed_moe import DS_EXPERT_PARAM, to_local_name
    from neuraflex_ray.train.strategy import CKPT_TAG

    module = torch.load(_main_file(checkpoint_dir), map_location="cpu", weights_only=False)["module"]
    state = {to_local_name(plain_name(k)): v for k, v in module.items() if plain_name(k).endswith(LORA_SUFFIXES)}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for f in (Path(checkpoint_dir) / CKPT_TAG).iterdir():
        if _EXPERT_FILE.match(f.name):
            for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
                m = DS_EXPERT_PARAM.match(plain_name(k))
                if m and m.group(4):
                    experts.setdefault(f"{m.group(1)}.{m.group(3)}.{m.group(4)}", {})[int(m.group(2))] = v
    for key, per_expert in experts.items():
        if sorted(per_expert) != list(range(num_experts)):
            raise FileNotFoundError(f"{checkpoint_dir}: adapter {key} has experts {sorted(per_expert)} of {num_experts}")
        state[key] = torch.stack([per_expert[e] for e in range(num_experts)])
    return state


def consolidate_fsdp_adapter(checkpoint_dir: str | Path, cfg: JobConfig) -> dict[str, torch.Tensor]:
    """The LoRA tensors of an FSDP2 (DCP) checkpoint: loaded into a model adapted as training adapted it."""
    from neuraflex_ray.checkpoint import consolidate_fsdp
    from neuraflex_ray.finetune.lora import apply_lora

    f = cfg.finetune
    state, _ = consolidate_fsdp(checkpoint_dir, adapt=lambda m: apply_lora(m, f.lora_rank, f.lora_alpha, 0.0,
                                                                           f.lora_targets))
    return {plain_name(k): v for k, v in state.items() if plain_name(k).endswith(LORA_SUFFIXES)}


def export_finetune(cfg: JobConfig, checkpoint: str | Path, run_dir: Path, steps: int) -> Path:
    """What a fine-tune produces: an adapter (lora) or a consolidated export (full)."""
    from neuraflex_ray.workflows import export_checkpoint

    f = cfg.finetune
    meta = {"finetuned_from": f.from_export, "base_fingerprint": fingerprint(f.from_export), "run_dir": str(run_dir),
            "steps": steps, "method": f.method, "ewc_lambda": f.ewc_lambda}
    if f.method == "full":
        return export_checkpoint(checkpoint, cfg.data.output_dir, run_dir / "export", meta)
    state = (consolidate_adapter(checkpoint, cfg.model.num_experts) if cfg.model_type == "moe_lm"
             else consolidate_fsdp_adapter(checkpoint, cfg))
    base_params = sum(p.numel() for p in _base_model(f.from_export).parameters())
    adapter_params = sum(v.numel() for v in state.values())
    return save_adapter(state, {**meta, "rank": f.lora_rank, "alpha": f.lora_alpha, "targets": f.lora_targets,
                                "base_export": f.from_export, "adapter_params": adapter_params,
                                "base_params": base_params}, run_dir / "adapter")


def _base_model(export: str | Path) -> torch.nn.Module:
    from neuraflex_ray.checkpoint import load_exported

    return load_exported(export)[0]


def finetune(cfg: JobConfig, fresh: bool = False) -> dict[str, Any]:
    """Train from `cfg.finetune.from_export` on `cfg.data`, export, and report held-out bits/byte."""
    from neuraflex_ray.finetune.setup import finetune_config
    from neuraflex_ray.train.driver import ensure_ray, train

    ensure_ray(cfg)
    cfg = finetune_config(cfg)
    result = train(cfg, fresh=fresh)
    run_dir = Path(result["run_dir"])
    out = export_finetune(cfg, result["checkpoint"], run_dir, result["steps"])
    kind = "adapter" if cfg.finetune.method == "lora" else "export"
    print(f"[finetune] {kind} -> {out}", flush=True)
    return {"run_dir": str(run_dir), kind: str(out), "steps": result["steps"], "val_loss": result.get("val_loss"),
            "checkpoint": str(result["checkpoint"]), "restored_from_step": result.get("restored_from_step")}


def merge_adapter(base: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """base export + adapter -> a full export (the adapter folded into the weights)."""
    import json

    from neuraflex_ray.checkpoint import export
    from neuraflex_ray.finetune.lora import load_adapter, merge

    base = Path(base).resolve()
    model = _base_model(base)
    meta = load_adapter(model, adapter, base)
    merge(model)
    base_meta = json.loads((base / "config.json").read_text())
    extra = {k: v for k, v in base_meta.items() if k not in ("model_type", "model")}
    tokenizer = base / "tokenizer.json"  # an LM's; NeuroFM has none
    return export(model.state_dict(), model.cfg, tokenizer if tokenizer.is_file() else None, out_dir,
                  {**extra, "merged_adapter": str(Path(adapter).resolve()), "adapter": meta})
