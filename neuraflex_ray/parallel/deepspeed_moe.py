"""DeepSpeed expert parallelism for NeuralFlex-MoE.

`parallelize_deepspeed(model, ...)` swaps every local `MoE` block for `DeepSpeedMoE`, which runs
the same router and expert weights through `deepspeed.moe.layer.MoE` (all-to-all dispatch across
the expert-parallel group, each rank holding `num_experts / ep_size` experts). The router
statistics and auxiliary losses come from the shared `route()`/`moe_stats()` so both execution
paths optimise the identical objective (DeepSpeed's own `l_aux` is ignored: for k=2 it counts
only first choices).

Name mapping between the two layouts (used by the checkpoint converter):

    local:      layers.{i}.ffn.router.weight          [E, d]
                layers.{i}.ffn.w1 / w3 / w2           [E, d, f] / [E, d, f] / [E, f, d]
    deepspeed:  layers.{i}.ffn.ds.deepspeed_moe.gate.wg.weight
                layers.{i}.ffn.ds.deepspeed_moe.experts.deepspeed_experts.{j}.w1 / w3 / w2
                (j = ep_rank * E / ep_size + local index)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.models.moe import MoE, MoEStats, moe_stats, route, swiglu
from neuraflex_ray.models.moe_lm import MoELM

DS_GATE = "ds.deepspeed_moe.gate.wg.weight"
DS_EXPERT = "ds.deepspeed_moe.experts.deepspeed_experts"


class Expert(nn.Module):
    """One SwiGLU expert in the layout DeepSpeed deep-copies per local expert."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(dim, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


class DeepSpeedMoE(nn.Module):
    def __init__(self, moe: MoE, cfg: ModelConfig, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        dim, ffn_dim = moe.w1.shape[1], moe.w1.shape[2]
        self.top_k, self.num_experts = moe.top_k, moe.num_experts
        self.capacity_factor = cfg.capacity_factor
        self.min_capacity, self.drop_tokens = cfg.min_capacity, cfg.drop_tokens
        self.ds = DSMoE(
            hidden_size=dim, expert=Expert(dim, ffn_dim), num_experts=moe.num_experts, ep_size=ep_size,
            # Evaluation is dropless (see forward), so the eval capacity factor never applies.
            k=moe.top_k, capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.capacity_factor,
            min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens,
            # Deterministic routing: no random token selection, no sampled second expert.
            use_rts=False, top2_2nd_expert_sampling=False,
        )
        n_local = moe.num_experts // ep_size
        with torch.no_grad():
            self.gate_weight.copy_(moe.router.weight)
            for j, ex in enumerate(self.ds.deepspeed_moe.experts.deepspeed_experts):
                g = ep_rank * n_local + j
                ex.w1.copy_(moe.w1[g])
                ex.w3.copy_(moe.w3[g])
                ex.w2.copy_(moe.w2[g])
        self.shared = moe.shared

    @property
    def gate_weight(self) -> torch.Tensor:
        return self.ds.deepspeed_moe.gate.wg.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = route(F.linear(x.float(), self.gate_weight.float()), self.top_k)
        gate = self.ds.deepspeed_moe.gate
        # Evaluation is dropless: DeepSpeed then sizes capacity to the busiest expert (an
        # all-reduce over the EP group, which is why every rank must run the eval forward).
        gate.drop_tokens = self.drop_tokens and self.training
        y, _, _ = self.ds(x)
        capacity = None
        if gate.drop_tokens:  # DeepSpeed's _capacity(): ceil(N / E * cf * k) in float32, at least min_capacity
            per_expert = torch.tensor(x.shape[0] / self.num_experts, dtype=torch.float32)
            capacity = max(int(torch.ceil(per_expert * (self.capacity_factor * self.top_k))), self.min_capacity)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape), moe_stats(r, capacity)


def parallelize_deepspeed(model: MoELM, ep_size: int, rank: int) -> MoELM:
    """Swap each local MoE block for its DeepSpeed expert-parallel twin, in place.

    DeepSpeed builds expert-parallel groups from consecutive ranks ([0..ep_size), ...), so this
    rank holds experts of ep_rank = rank % ep_size; `DeepSpeedStrategy` checks that after
    `deepspeed.initialize`.
    """
    for layer in model.layers:
        if isinstance(layer.ffn, MoE):
            layer.ffn = DeepSpeedMoE(layer.ffn, model.cfg, ep_size, rank % ep_size)
    return model


def to_local_name(name: str) -> str:
    """Map a DeepSpeed-layout non-expert parameter name to the local layout."""
    return name.replace(DS_GATE, "router.weight")
