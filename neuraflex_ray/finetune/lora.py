"""LoRA adapters for NeuralFlex-MoE, on either execution layout (local or DeepSpeed expert-parallel).

Each targeted weight W becomes W + (alpha / rank) * A @ B through a `torch.nn.utils.parametrize`
parametrization, with B zero at initialisation (so the adapted model starts equal to its base) and
the base frozen. Because the update is applied to the weight, the model code is untouched and every
layout that reads the weight gets it: `nn.Linear` weights [out, in] (A [out, r], B [r, in]), the
local MoE's stacked experts [E, in, out] (A [E, in, r], B [E, r, out]: a low-rank pair per expert),
and DeepSpeed's per-expert weights [in, out] on the expert-parallel path.

Targets: `attention` (wq, wk, wv, wo), `dense` (dense and shared-expert SwiGLU), `experts` (routed
experts), `router`; `linear` is every `nn.Linear` of any model (NeuroFM's few-shot adaptation,
eval/fewshot.py). `lora_dropout` drops entries of A in training: the weight-space form has no separate
input path to drop, unlike PEFT's.

Adapter files (`adapter.safetensors` + `adapter.json`, and the names adapted parameters take) are an
on-disk format: `neuraflex_ray/checkpoint/adapters.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.checkpoint.adapters import (  # noqa: F401 - the adapter file format, used with LoRA
    ADAPTER_FILE,
    ADAPTER_META,
    ADAPTER_SUFFIXES,
    fingerprint,
    plain_name,
    read_adapter,
    save_adapter,
)
from neuraflex_ray.finetune.targets import TARGETS, attach, attached, fold  # noqa: F401 - TARGETS: what a family accepts


class LoRA(nn.Module):
    """The parametrization: w -> w + scale * A @ B, for w of shape [..., m, n]."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        *batch, m, n = shape
        self.A = nn.Parameter(torch.empty(*batch, m, rank).uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m)))
        self.B = nn.Parameter(torch.zeros(*batch, rank, n))
        self.scale, self.dropout = alpha / rank, dropout

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = F.dropout(self.A, self.dropout, self.training) if self.dropout else self.A
        return w + (self.scale * (a @ self.B)).to(w.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> dict[str, Any]:
    """Freeze `model` and give every targeted weight an adapter; returns the parameter counts."""
    return attach(model, targets, lambda w: LoRA(w.shape, rank, alpha, dropout))


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, LoRA]]:
    """(module path, module, weight name, its LoRA) for every adapted weight."""
    return attached(model, LoRA)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, named `<module path>.<weight>.lora_A|lora_B` (this model's layout)."""
    state = {}
    for path, _, name, lora in lora_modules(model):
        state[f"{path}.{name}.lora_A"] = lora.A.detach().clone()
        state[f"{path}.{name}.lora_B"] = lora.B.detach().clone()
    return state


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors (`adapter_state`'s names) into a model that `apply_lora` adapted the same way."""
    mods = {f"{path}.{name}": lora for path, _, name, lora in lora_modules(model)}
    missing = sorted(set(mods) - {k.rsplit(".", 1)[0] for k in state})
    if missing:
        raise ValueError(f"the adapter has no tensors for {missing[:3]}: it does not match this model")
    with torch.no_grad():
        for key, value in state.items():
            weight, part = key.rsplit(".", 1)
            getattr(mods[weight], part.removeprefix("lora_")).copy_(value)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scale * A @ B) and drop the parametrizations, in place."""
    return fold(model, LoRA)
