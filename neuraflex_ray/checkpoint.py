"""Checkpoint conversion and the consolidated export format.

Training checkpoints are sharded and engine-specific; each also holds `train_state.json` (step,
data position, model type and config, world size), so they are inspected without an engine:

- DeepSpeed writes one file per expert per MoE layer plus the non-expert weights, and reloading
  that needs the same `ep_size`; `consolidate_deepspeed()` maps the per-expert files back into
  the local layout (stacked `[E, ...]` expert weights).
- FSDP2 writes DCP shards (`dcp/__<rank>_0.distcp` + `.metadata`); `consolidate_fsdp()` reads
  them into full tensors in one process, with no process group.

Serving and evaluation want one file that loads in one process, so `export()` writes:

    <dir>/model.safetensors   local-layout weights (tied output weight stored once)
    <dir>/config.json         model_type, the model config (+ whatever metadata the caller adds)
    <dir>/tokenizer.json      the tokenizer the LM was trained with (NeuroFM: the dataset's
                              modalities, channel ids and rates are in config.json instead)

Every write goes to a temporary sibling directory first and is renamed into place, so a crash
never leaves a half-written export behind.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.config import ModelConfig, NeuroFMConfig
from neuraflex_ray.models.moe_lm import MoELM, moe_layer_ids
from neuraflex_ray.parallel.deepspeed_moe import DS_EXPERT, DS_GATE, to_local_name
from neuraflex_ray.train.strategy import CKPT_TAG, DCP_DIR, TRAIN_STATE, read_train_state

_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt$")


def _main_file(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / CKPT_TAG / "mp_rank_00_model_states.pt"


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """What train stored beside the weights: step, data position, model type and config, world size."""
    p = Path(checkpoint_dir)
    if (p / TRAIN_STATE).is_file():
        return read_train_state(p)
    main = _main_file(p)  # a DeepSpeed checkpoint written before train_state.json existed
    if not main.is_file():
        raise FileNotFoundError(f"{p / TRAIN_STATE} not found: is {checkpoint_dir} a checkpoint written by train?")
    state = torch.load(main, map_location="cpu", weights_only=False, mmap=True)
    out = {k: state[k] for k in ("step", "epoch", "samples_in_epoch", "model_config")}
    return {**out, "model_type": "moe_lm", "strategy": "deepspeed", "world_size": state["dp_world_size"]}


def checkpoint_model_config(checkpoint_dir: str | Path) -> ModelConfig | NeuroFMConfig:
    from neuraflex_ray.config import JobConfig

    state = read_checkpoint_state(checkpoint_dir)
    return JobConfig.from_dict({"model_type": state["model_type"], "model": state["model_config"]}).model


def is_complete(checkpoint_dir: str | Path) -> bool:
    """Every rank's shards are there (a crash mid-upload leaves gaps)."""
    try:
        state = read_checkpoint_state(checkpoint_dir)
        if state["strategy"] == "fsdp":
            return _dcp_complete(Path(checkpoint_dir) / DCP_DIR)
        root = Path(checkpoint_dir) / CKPT_TAG
        cfg = ModelConfig(**state["model_config"])
        shards = all((root / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file() for r in range(state["world_size"]))
        n_expert_files = sum(1 for f in root.iterdir() if _EXPERT_FILE.match(f.name))
        return shards and n_expert_files == len(moe_layer_ids(cfg)) * cfg.num_experts
    except (FileNotFoundError, KeyError, RuntimeError, EOFError, ValueError, OSError):
        return False


def _dcp_complete(root: Path) -> bool:
    """DCP's .metadata (written last, by rank 0) names every shard file; all must exist."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(root)).read_metadata()
    except Exception:  # missing or truncated .metadata: not a checkpoint we can load
        return False
    need: dict[str, int] = {}  # each shard file must reach the end of the last item stored in it
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return bool(need) and all((root / f).is_file() and (root / f).stat().st_size >= n for f, n in need.items())


def consolidate_fsdp(checkpoint_dir: str | Path, adapt: Callable[[torch.nn.Module], Any] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], NeuroFMConfig]:
    """Full (unsharded) model weights from an FSDP2/DCP checkpoint, in one process. `adapt` gives the
    model the structure training had (a fine-tune's LoRA parametrizations) before the load."""
    import torch.distributed.checkpoint as dcp

    from neuraflex_ray.models.neurofm import NeuroFM

    cfg = checkpoint_model_config(checkpoint_dir)
    model = NeuroFM(cfg)
    if adapt is not None:
        adapt(model)
    # DCP reads into tensors of the full shapes; keys are those get_state_dict saved under "model".
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(Path(checkpoint_dir) / DCP_DIR), no_dist=True)
    return state["model"], cfg


def consolidate_deepspeed(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Merge a DeepSpeed MoE checkpoint (any ep_size) into one local-layout state dict and its config."""
    cfg = checkpoint_model_config(checkpoint_dir)
    root = Path(checkpoint_dir) / CKPT_TAG
    module = torch.load(_main_file(checkpoint_dir), map_location="cpu", weights_only=False)["module"]
    state = {to_local_name(k): v for k, v in module.items() if DS_EXPERT not in k}

    # Expert files: layer_{moe_layer_id}_expert_{global_id}_...; moe_layer_id counts MoE blocks
    # in module order, which is layer order.
    moe_layers = moe_layer_ids(cfg)
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for f in root.iterdir():
        m = _EXPERT_FILE.match(f.name)
        if m:
            experts[(int(m.group(1)), int(m.group(2)))] = torch.load(f, map_location="cpu", weights_only=False)
    for moe_id, layer in enumerate(moe_layers):
        for w in ("w1", "w3", "w2"):
            stacked = []
            for e in range(cfg.num_experts):
                if (moe_id, e) not in experts:
                    raise FileNotFoundError(f"{root}: missing expert file for MoE layer {moe_id}, expert {e}")
                stacked.append(experts[(moe_id, e)][f"layers.{layer}.ffn.{DS_EXPERT}.{e}.{w}"])
            state[f"layers.{layer}.ffn.{w}"] = torch.stack(stacked)
    assert not any(DS_GATE in k for k in state)
    return state, cfg


def build_model(cfg: ModelConfig | NeuroFMConfig) -> torch.nn.Module:
    if isinstance(cfg, NeuroFMConfig):
        from neuraflex_ray.models.neurofm import NeuroFM

        return NeuroFM(cfg)
    return MoELM(cfg)


def export(state: dict[str, torch.Tensor], cfg: ModelConfig | NeuroFMConfig, tokenizer_path: str | Path | None,
           out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a consolidated checkpoint that `load_exported()` reads back in one process."""
    out = Path(out_dir).resolve()
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (getattr(cfg, "tie_embeddings", False) and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"state does not match the model config: missing={missing[:5]} unexpected={unexpected[:5]}")
    model_type = "neurofm" if isinstance(cfg, NeuroFMConfig) else "moe_lm"
    with atomic_dir(out) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        meta = {"model_type": model_type, "model": dataclasses.asdict(cfg), **(metadata or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    return out


def load_exported(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a consolidated export: (model in eval mode, config.json contents)."""
    from neuraflex_ray.config import JobConfig

    p = Path(path)
    if not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"{p}/model.safetensors not found: pass a directory written by `neuraflex-ray export`")
    meta = json.loads((p / "config.json").read_text())
    cfg = JobConfig.from_dict({"model_type": meta.get("model_type", "moe_lm"), "model": meta["model"]}).model
    model = build_model(cfg)
    load_model(model, str(p / "model.safetensors"), device=device)
    return model.to(device).eval(), meta
