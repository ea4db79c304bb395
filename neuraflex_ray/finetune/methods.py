"""The adapter methods a fine-tune can train (`finetune.method`), each one entry: how it attaches to a
model in training and when loading a saved adapter, what its adapter.json records, how its tensors
load, and the low-rank pair a served replica adds to a base weight. Fine-tuning, merging and serving
look a method up here instead of naming it.

- lora (`lora.py`): W + (alpha / rank) A B.
- svf (`svf.py`): W + U diag(σ ⊙ (z − 1)) Vᵀ, the SVD taken from the base weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuraflex_ray.checkpoint.adapters import read_adapter
from neuraflex_ray.finetune import lora, svf


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    label: str  # for progress lines
    # (model, FinetuneConfig) -> parameter counts: attach trainable adapters to a frozen model
    attach: Callable[[nn.Module, Any], dict[str, Any]]
    # FinetuneConfig -> what adapter.json records beside method, targets and fingerprints
    settings: Callable[[Any], dict[str, Any]]
    # (model, adapter.json, tensors) -> None: attach and fill a saved adapter (inference: no dropout)
    load: Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor]], None]
    # (base weight, this weight's tensors by suffix, adapter.json) -> (A, B, scale), the update scale * A @ B
    served_pair: Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]], tuple[torch.Tensor, torch.Tensor, float]]


def _lora_load(model: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    lora.apply_lora(model, meta["rank"], meta["alpha"], 0.0, meta["targets"])
    lora.load_lora_state(model, state)


def _svf_load(model: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    svf.apply_svf(model, meta["targets"])
    svf.load_svf_state(model, state)


def _svf_pair(w: torch.Tensor, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return u * (s * (t["svf_z"].float() - 1)).unsqueeze(-2), vh, 1.0


METHODS: dict[str, AdapterMethod] = {
    "lora": AdapterMethod(
        "lora", "LoRA",
        attach=lambda model, f: lora.apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets),
        settings=lambda f: {"rank": f.lora_rank, "alpha": f.lora_alpha},
        load=_lora_load,
        served_pair=lambda w, t, meta: (t["lora_A"], t["lora_B"], meta["alpha"] / meta["rank"])),
    "svf": AdapterMethod(
        "svf", "SVF",
        attach=lambda model, f: svf.apply_svf(model, f.lora_targets),
        settings=lambda f: {},
        load=_svf_load,
        served_pair=_svf_pair),
}


def adapter_method(name: str) -> AdapterMethod:
    if name not in METHODS:
        raise ValueError(f"adapter method {name!r}: this version knows {sorted(METHODS)}")
    return METHODS[name]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter (of any method) into its weight and drop the parametrizations, in place."""
    return svf.merge_svf(lora.merge(model))


def load_adapter(model: nn.Module, adapter_dir: str | Path, base_dir: str | Path) -> dict[str, Any]:
    """Give `model` (loaded from `base_dir`, local layout) the adapter in `adapter_dir`, whatever its
    method; returns its adapter.json. Refuses an adapter trained on another base, naming both
    fingerprints."""
    meta, state = read_adapter(adapter_dir, base_dir)
    try:
        adapter_method(meta.get("method", "lora")).load(model, meta, state)
    except ValueError as e:
        raise ValueError(f"adapter {adapter_dir}: {e}") from e
    return meta
