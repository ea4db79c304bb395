"""Which weights an adapter targets (LoRA, `lora.py`; SVF, `svf.py`), by name: `attention` (wq, wk, wv,
wo), `dense` (dense and shared-expert SwiGLU), `experts` (routed experts, local or DeepSpeed's), `router`;
`linear` is every `nn.Linear` of any model (NeuroFM's few-shot adaptation, eval/fewshot.py)."""

from __future__ import annotations

from torch import nn

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
