"""Consolidated exports: one directory that loads in one process, and how a checkpoint becomes one.

    <dir>/model.safetensors   local-layout weights (a weight tied to another is stored once)
    <dir>/config.json         model_type, the model config (+ whatever metadata the family adds)
    <dir>/...                 files the family adds (the LM's tokenizer.json)

Every write goes to a temporary sibling directory first and is renamed into place, so a crash
never leaves a half-written export behind. What else goes into an export is the family's
(`Family.export`); `export_checkpoint` asks the checkpoint's family.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.checkpoint.dcp import consolidate_fsdp
from neuraflex_ray.checkpoint.deepspeed import consolidate_deepspeed
from neuraflex_ray.checkpoint.state import FSDP, read_checkpoint_state
from neuraflex_ray.checkpoint.untrusted import refuse_pickles
from neuraflex_ray.config import DEFAULT_MODEL_TYPE, JobConfig, get_family


def consolidate(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(local-layout weights, model config) of a training checkpoint, whichever engine wrote it."""
    if read_checkpoint_state(checkpoint_dir)["strategy"] == FSDP:
        return consolidate_fsdp(checkpoint_dir)
    return consolidate_deepspeed(checkpoint_dir)


def _tied_elsewhere(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Names of parameters that share their tensor with another name present in `state` (tied weights)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {n for names in by_tensor.values() if any(m in state for m in names) for n in names if n not in state}


def write_export(state: dict[str, torch.Tensor], cfg: Any, model_type: str, out_dir: str | Path,
                 metadata: dict[str, Any] | None = None, files: dict[str, str | Path] | None = None) -> Path:
    """Write a consolidated export that `load_exported()` reads back in one process; `files`: {name: source}
    copied in beside the weights."""
    out = Path(out_dir).resolve()
    model = get_family(model_type).build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_elsewhere(model, state)]
    if missing or unexpected:
        raise ValueError(f"state does not match the model config: missing={missing[:5]} unexpected={unexpected[:5]}")
    with atomic_dir(out) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        meta = {"model_type": model_type, "model": dataclasses.asdict(cfg), **(metadata or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        for name, source in (files or {}).items():  # a name may hold a folder: entropy_model/config.json
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
    return out


def export_consolidated(checkpoint: str | Path, model_type: str, out_dir: str | Path,
                        metadata: dict[str, Any] | None = None, files: dict[str, str | Path] | None = None) -> Path:
    """A checkpoint's weights as an export (what most families' `export` is, with their own metadata)."""
    state, cfg = consolidate(checkpoint)
    return write_export(state, cfg, model_type, out_dir, metadata, files)


def export_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Export a training checkpoint the way its family does; the model config comes from the checkpoint
    itself, so the export is the model that trained."""
    model_type = read_checkpoint_state(checkpoint)["model_type"]
    meta = {"source_checkpoint": str(checkpoint), **(metadata or {})}
    return get_family(model_type).export(Path(checkpoint), Path(data_dir).resolve(), Path(out_dir), meta)


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """An export's config.json (model_type filled in for exports written before it was recorded)."""
    p = Path(path)
    if not (p / "model.safetensors").is_file() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a model export (model.safetensors + config.json): pass a directory "
                                f"written by `neuraflex-ray export` or `quickstart` (<run dir>/export)")
    refuse_pickles(p, "export")
    meta = json.loads((p / "config.json").read_text())
    meta.setdefault("model_type", DEFAULT_MODEL_TYPE)
    return meta


def export_family(path: str | Path) -> Any:
    """The family (`config.Family`) of an export, from its config.json."""
    return get_family(read_export_meta(path)["model_type"])


def load_exported(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a consolidated export: (model in eval mode, config.json contents)."""
    p = Path(path)
    meta = read_export_meta(p)  # refuses a directory without model.safetensors + config.json
    cfg = JobConfig.from_dict({"model_type": meta["model_type"], "model": meta["model"]}).model
    model = get_family(meta["model_type"]).build_model(cfg)
    load_model(model, str(p / "model.safetensors"), device=device)
    return model.to(device).eval(), meta
