"""Which weights an adapter targets (LoRA, `lora.py`; SVF, `svf.py`), and the mechanism both share:
attach one parametrization per targeted weight to a frozen model, find them again, fold them in. By name: `attention` (wq, wk, wv,
wo), `dense` (dense and shared-expert SwiGLU), `experts` (routed experts, local or DeepSpeed's), `router`;
`linear` is every `nn.Linear` of any model (NeuroFM's few-shot adaptation, eval/fewshot.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

TARGETS = ("attention", "dense", "experts", "router", "linear")


def target_weights(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every weight the targets name, in module order."""
    from neuraflex_ray.models.moe import MoE, SwiGLU
    from neuraflex_ray.models.moe_lm import Attention
    from neuraflex_ray.parallel.deepspeed_moe import Expert

    out: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if "linear" in targets:
            if isinstance(m, nn.Linear):
                out.append((m, "weight"))
            continue
        if isinstance(m, Attention) and "attention" in targets:
            out += [(getattr(m, n), "weight") for n in ("wq", "wk", "wv", "wo")]
        elif isinstance(m, SwiGLU) and "dense" in targets:
            out += [(getattr(m, n), "weight") for n in ("w1", "w3", "w2")]
        elif isinstance(m, (MoE, Expert)) and "experts" in targets:
            out += [(m, n) for n in ("w1", "w3", "w2")]
        if "router" in targets:
            if isinstance(m, MoE):
                out.append((m.router, "weight"))
            elif hasattr(m, "wg") and hasattr(m, "setup_routing"):  # DeepSpeed's gate slot (RouterGate)
                out.append((m.wg, "weight"))
    return out


def attach(model: nn.Module, targets: list[str], make: Callable[[torch.Tensor], nn.Module]) -> dict[str, Any]:
    """Freeze `model` and register `make(weight)` as a parametrization of every targeted weight; returns
    the parameter counts. A DeepSpeed expert weight's adapter parameters are reduced over the
    expert-data-parallel group only, as the weight is."""
    total = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for module, name in target_weights(model, targets):
        base = getattr(module, name)
        adapter = make(base).to(base.device)
        if hasattr(base, "allreduce") and not base.allreduce:
            for p in adapter.parameters():
                p.allreduce, p.group_name = False, base.group_name
        parametrize.register_parametrization(module, name, adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "share": trainable / total}


def attached(model: nn.Module, kind: type) -> list[tuple[str, nn.Module, str, Any]]:
    """(module path, module, weight name, its parametrization) for every weight adapted by a `kind`."""
    out = []
    for path, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for name, plist in m.parametrizations.items():
                out += [(path, m, name, p) for p in plist if isinstance(p, kind)]
    return out


def fold(model: nn.Module, kind: type) -> nn.Module:
    """Fold every `kind` adapter into its weight and drop the parametrizations, in place; every
    parameter trains again."""
    model.eval()
    for _, module, name, _ in attached(model, kind):
        if parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
