"""Singular-value fine-tuning (SVF, Transformer², Sun et al. 2025): adapt a weight by rescaling its
singular values, W' = U diag(σ ⊙ z) Vᵀ, training only the vector z (one number per singular value).

The SVD of each targeted weight is taken once, from the base, when the adapter is attached; U, σ and
Vᵀ are buffers (never trained, never saved: the base export gives them again). The parametrization
returns W + U diag(σ ⊙ (z − 1)) Vᵀ, which is U diag(σ ⊙ z) Vᵀ up to the SVD's rounding and is the base
weight exactly at z = 1, where the adapter starts. Shapes follow LoRA's (`lora.py`): `nn.Linear`
weights [out, in], the local MoE's stacked experts [E, in, out] (a z per expert), DeepSpeed's
per-expert weights; targets by name (`targets.py`).

A z is min(out, in) numbers per matrix, so SVF trains far fewer parameters than LoRA of any rank
(`apply_svf` returns the counts). `finetune.method: svf` trains it on the same loop as LoRA; its adapter
files, merge and per-request serving go through `methods.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neuraflex_ray.finetune.targets import attach, attached, fold

SVF_SUFFIX = ".svf_z"  # an adapter tensor's name: `<module path>.<weight>.svf_z`


class SVF(nn.Module):
    """The parametrization w -> w + U diag(σ ⊙ (z − 1)) Vᵀ for w of shape [..., m, n]."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # [..., m, r], [..., r], [..., r, n]
        self.register_buffer("U", u, persistent=False)
        self.register_buffer("S", s, persistent=False)
        self.register_buffer("Vh", vh, persistent=False)
        self.z = nn.Parameter(torch.ones_like(s))

    def delta(self) -> torch.Tensor:
        return (self.U * (self.S * (self.z - 1)).unsqueeze(-2)) @ self.Vh

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)


def apply_svf(model: nn.Module, targets: list[str]) -> dict[str, Any]:
    """Freeze `model` and give every targeted weight an SVF vector; returns the parameter counts."""
    return attach(model, targets, SVF)


def svf_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, SVF]]:
    """(module path, module, weight name, its SVF) for every adapted weight."""
    return attached(model, SVF)


def svf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The z vectors alone, named `<module path>.<weight>.svf_z` (this model's layout)."""
    return {f"{path}.{name}{SVF_SUFFIX}": svf.z.detach().clone() for path, _, name, svf in svf_modules(model)}


def load_svf_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy z vectors (`svf_state`'s names) into a model that `apply_svf` adapted the same way."""
    mods = {f"{path}.{name}": svf for path, _, name, svf in svf_modules(model)}
    keys = {k.removesuffix(SVF_SUFFIX) for k in state}
    if keys != set(mods):
        raise ValueError(f"SVF state does not match this model: missing {sorted(set(mods) - keys)[:3]}, "
                         f"unknown {sorted(keys - set(mods))[:3]}")
    with torch.no_grad():
        for key, z in state.items():
            mods[key.removesuffix(SVF_SUFFIX)].z.copy_(z)


def merge_svf(model: nn.Module) -> nn.Module:
    """Fold every SVF into its weight and drop the parametrizations, in place."""
    return fold(model, SVF)
