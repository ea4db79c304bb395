"""Token -> expert routers for NeuralFlex-MoE (`model.router`).

One function, `route()`, decides every assignment, on the local dropless path
(`neuraflex_ray/models/moe.py`) and on the DeepSpeed expert-parallel path
(`neuraflex_ray/parallel/deepspeed_moe.py`), so the routers behave identically on both.

- `softmax_topk`: softmax over experts in fp32, the k most probable, weights renormalised to sum
  to one when k > 1 (Switch keeps the raw probability at k = 1). Balanced by the Switch/GShard
  auxiliary loss (`model.aux_loss_weight`).
- `aux_free`: DeepSeek-V3's auxiliary-loss-free balancing. A per-expert bias is added to the
  probabilities only to *choose* the k experts; the weights stay the unbiased probabilities. After
  every optimizer step the bias moves by `model.balance_bias_rate` toward balance: up for experts
  that got less than their share of the step's tokens (summed over every rank, so the bias is
  the same everywhere), down for the busier ones (`nudge_balance_bias`). No loss term touches
  the router's gradient for balance; the Switch loss is still computed and logged.
- `sinkhorn`: in training, the assignment is the top-k of a Sinkhorn-balanced transport plan over
  the batch's tokens (every expert's column scaled to carry N/E of the mass, every token's row
  to carry one), so experts get near-equal shares without a loss term; the weights are the
  softmax probabilities of the chosen experts. In evaluation and serving it is plain top-k, so a
  token's route never depends on the other tokens in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUTERS = ("softmax_topk", "aux_free", "sinkhorn")


@dataclass
class Routing:
    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor  # [N, E] fp32 softmax
    weights: torch.Tensor  # [N, k] combine weights
    experts: torch.Tensor  # [N, k] expert indices


def uses_aux_loss(router: str) -> bool:
    """Whether the Switch balance loss is trained (aux_free and sinkhorn balance without it)."""
    return router == "softmax_topk"


def sinkhorn_log_plan(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Log of a transport plan from tokens to experts: rows sum to 1, columns to N/E (after `iters`
    alternating normalisations, columns last). Log-domain, so large logits cannot overflow."""
    n, e = logits.shape
    z = logits.float()
    col_mass = math.log(n / e)
    for _ in range(iters):
        z = z - z.logsumexp(dim=1, keepdim=True)
        z = z - z.logsumexp(dim=0, keepdim=True) + col_mass
    return z


def route(logits: torch.Tensor, top_k: int, router: str = "softmax_topk", bias: torch.Tensor | None = None,
          training: bool = False, sinkhorn_iters: int = 8) -> Routing:
    """Assign each of N tokens to k of E experts. logits: [N, E] (any dtype; routed in fp32)."""
    probs = logits.float().softmax(dim=-1)
    if router == "aux_free" and bias is not None:
        experts = (probs + bias.float()).topk(top_k, dim=-1).indices
        weights = probs.gather(-1, experts)
    elif router == "sinkhorn" and training:
        with torch.no_grad():
            experts = sinkhorn_log_plan(logits.detach(), sinkhorn_iters).topk(top_k, dim=-1).indices
        weights = probs.gather(-1, experts)
    elif router in ROUTERS:
        weights, experts = probs.topk(top_k, dim=-1)
    else:
        raise ValueError(f"unknown router {router!r}: set model.router to one of {ROUTERS}")
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return Routing(logits=logits, probs=probs, weights=weights, experts=experts)


@torch.no_grad()
def nudge_balance_bias(biases: list[torch.Tensor], loads: torch.Tensor, rate: float) -> None:
    """One aux-free update: b_e += rate * sign(mean load - load_e), per MoE layer.

    loads: [layers, E], assignments per expert in the step, already summed over every rank (the
    caller all-reduces), so every rank applies the identical update to identical biases.
    """
    if len(biases) != loads.shape[0]:
        raise ValueError(f"{len(biases)} balance biases for {loads.shape[0]} MoE layers of load")
    loads = loads.to(biases[0].device, torch.float32) if biases else loads
    for b, load in zip(biases, loads, strict=True):
        b.add_(torch.sign(load.mean() - load), alpha=rate)


def balance_biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every MoE layer's aux-free bias, in layer order (either execution path)."""
    return [m.balance_bias for m in model.modules() if getattr(m, "balance_bias", None) is not None]
