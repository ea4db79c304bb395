"""DeepSpeed expert parallelism for NeuralFlex-MoE.

`parallelize_deepspeed(model, ...)` swaps every local `MoE` block for `DeepSpeedMoE`, which runs
the same router and expert weights through `deepspeed.moe.layer.MoE` (all-to-all dispatch across
the expert-parallel group, each rank holding `num_experts / ep_size` experts). DeepSpeed's gate is
replaced by `RouterGate`, which assigns tokens with the shared `route()` (every `model.router`)
and only lays the assignments out in DeepSpeed's capacity buffers, so both execution paths route
identically and optimise the identical objective (DeepSpeed's own `l_aux` is not used).

Name mapping between the two layouts (used by the checkpoint converter):

    local:      layers.{i}.ffn.router.weight          [E, d]
                layers.{i}.ffn.w1 / w3 / w2           [E, d, f] / [E, d, f] / [E, f, d]
    deepspeed:  layers.{i}.ffn.ds.deepspeed_moe.gate.wg.weight
                layers.{i}.ffn.ds.deepspeed_moe.experts.deepspeed_experts.{j}.w1 / w3 / w2
                (j = ep_rank * E / ep_size + local index)
    local:      layers.{i}.ffn.balance_bias           [E]   (aux_free only; a buffer)
    deepspeed:  layers.{i}.ffn.ds.deepspeed_moe.gate.balance_bias
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.models.moe import MoE, MoEStats, moe_stats, swiglu
from neuraflex_ray.models.moe_lm import MoELM
from neuraflex_ray.models.routers import Routing, route

DS_GATE = "ds.deepspeed_moe.gate.wg.weight"
DS_BIAS = "ds.deepspeed_moe.gate.balance_bias"  # no "expert" in the name: DeepSpeed files those per expert
DS_EXPERT = "ds.deepspeed_moe.experts.deepspeed_experts"
# One expert weight on the DeepSpeed path, or its LoRA factor (finetune/): groups are the layer's FFN
# prefix, the local expert index, the weight name, and lora_A / lora_B (None for the weight itself).
DS_EXPERT_PARAM = re.compile(rf"^(layers\.\d+\.ffn)\.{re.escape(DS_EXPERT)}\.(\d+)\.(w[123])(?:\.(lora_[AB]))?$")


class Expert(nn.Module):
    """One SwiGLU expert in the layout DeepSpeed deep-copies per local expert."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(dim, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(ffn_dim, dim))
        self.skip_padding = True  # benchmarks/moe_layer.py turns it off to time DeepSpeed's own behaviour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d]: this expert's slots of DeepSpeed's capacity buffer, from every rank of the group.

        Dropless buffers are as deep as the busiest expert in the group, so every other expert's
        slots past its own count hold DeepSpeed's zero pad row. SwiGLU has no bias, so a zero row's
        output is exactly zero: only the rows that hold a token are computed, and the result is the
        same (1.20x the debug MoE run's tokens/s, benchmarks/RESULTS.md)."""
        if not self.skip_padding:
            return swiglu(x, self.w1, self.w3, self.w2)
        flat = x.reshape(-1, x.shape[-1])
        used = flat.ne(0).any(-1).nonzero().squeeze(1)
        y = swiglu(flat.index_select(0, used), self.w1, self.w3, self.w2)
        return y.new_zeros(flat.shape[0], y.shape[-1]).index_copy(0, used, y).view(*x.shape[:-1], -1)


def capacity_slots(experts: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each assignment's slot in its expert's buffer, [k, N]: first choices take the first slots in
    token order, then second choices, and so on (GShard's order, as DeepSpeed's top-2 gate). Rows
    not `valid` (padding) take no slot (theirs are meaningless: they are never dispatched)."""
    k, n = experts.shape[1], experts.shape[0]
    one_hot = F.one_hot(experts.t().reshape(-1), num_experts)  # [k*N, E], rank-major
    if valid is not None:
        one_hot = one_hot * valid.reshape(1, n, 1).expand(k, n, 1).reshape(-1, 1).to(one_hot.dtype)
    slots = (one_hot.cumsum(0) - 1).gather(1, experts.t().reshape(-1, 1))
    return slots.view(k, n)


def _route_gate_class() -> type:
    from deepspeed.moe.sharded_moe import TopKGate

    class RouterGate(TopKGate):
        """DeepSpeed's gate interface, our routing: returns (l_aux, capacity, E, indices, locations,
        gates, exp_counts) with [k, N] route tensors (dropped routes have index -1), which DeepSpeed's
        MOELayer turns into its all-to-all buffers. The routing of the last forward stays on
        `last_routing` (and the capacity on `last_capacity`) for the statistics."""

        def setup_routing(self, router: str, sinkhorn_iters: int, bias: torch.Tensor | None) -> None:
            self.router, self.sinkhorn_iters = router, sinkhorn_iters
            if bias is not None:
                self.register_buffer("balance_bias", bias.detach().clone())
            else:
                self.balance_bias = None
            self.last_routing: Routing | None = None
            self.last_capacity: int | None = None

        def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None,
                    sparse_routes: bool = True, use_tutel: bool = False) -> tuple:
            logits = F.linear(input.float(), self.wg.weight.float())
            r = route(logits, self.k, self.router, self.balance_bias, self.training, self.sinkhorn_iters)
            n, e = logits.shape
            # Padding rows (used_token 0: the BLT's empty patch slots) are routed nowhere and count nowhere.
            valid = used_token.reshape(-1).bool() if used_token is not None else None
            counted = r  # the routes of real tokens: the statistics and the loads
            if valid is not None:
                counted = Routing(r.logits[valid], r.probs[valid], r.weights[valid], r.experts[valid])
                if self.router == "sinkhorn" and self.training:  # the plan couples tokens: plan over real ones
                    counted = route(logits[valid], self.k, self.router, self.balance_bias, True, self.sinkhorn_iters)
                    r = Routing(r.logits, r.probs, r.weights.index_put((valid,), counted.weights),
                                r.experts.index_put((valid,), counted.experts))
            counts = torch.bincount(counted.experts.flatten(), minlength=e)
            slots = capacity_slots(r.experts, e, valid)
            if self.drop_tokens and self.training:
                # DeepSpeed's _capacity(): ceil(N / E * cf * k) in float32, at least min_capacity.
                per_expert = torch.tensor(n / e, dtype=torch.float32)
                capacity = max(int(torch.ceil(per_expert * (self.capacity_factor * self.k))), self.min_capacity)
                self.last_capacity = capacity
            else:
                # Dropless: every rank's buffers are as deep as the busiest expert anywhere in the group.
                top = counts.max().clone()
                if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.ep_group)
                capacity = int(top)
                self.last_capacity = None
            kept = slots < capacity  # [k, N]
            if valid is not None:
                kept = kept & valid[None, :]
            gates = r.weights.t() * kept
            if self.k > 1 and not bool(kept.all()):  # a token that lost a route shares its weight among the rest
                gates = gates / gates.sum(0, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
            indices = torch.where(kept, r.experts.t(), -1).to(torch.int32)
            self.last_routing = counted
            return (logits.new_zeros(()), capacity, e, indices, (slots * kept).to(torch.int32), gates,
                    counts.detach())

    return RouterGate


class DeepSpeedMoE(nn.Module):
    def __init__(self, moe: MoE, cfg: ModelConfig, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        dim, ffn_dim = moe.w1.shape[1], moe.w1.shape[2]
        self.drop_tokens = cfg.drop_tokens
        self.ds = DSMoE(
            hidden_size=dim, expert=Expert(dim, ffn_dim), num_experts=moe.num_experts, ep_size=ep_size,
            # Evaluation is dropless (see forward), so the eval capacity factor never applies.
            k=moe.top_k, capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.capacity_factor,
            min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens,
            # Deterministic routing: no random token selection, no sampled second expert.
            use_rts=False, top2_2nd_expert_sampling=False,
        )
        # Our routing in DeepSpeed's gate slot (same `wg` parameter, so names and groups are unchanged).
        old = self.ds.deepspeed_moe.gate
        gate = _route_gate_class()(dim, moe.num_experts, k=moe.top_k, capacity_factor=cfg.capacity_factor,
                                   eval_capacity_factor=cfg.capacity_factor, min_capacity=cfg.min_capacity,
                                   drop_tokens=cfg.drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
        gate.wg = old.wg
        gate.setup_routing(moe.router_kind, moe.sinkhorn_iters, moe.balance_bias)
        self.ds.deepspeed_moe.gate = gate
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

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """As `MoE.forward`; `valid` rows stay in the all-to-all's shapes (every rank passes the same token
        count) but padding is dispatched nowhere."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gate = self.ds.deepspeed_moe.gate
        # Evaluation is dropless: the gate then sizes capacity to the busiest expert (an all-reduce
        # over the EP group, which is why every rank must run the eval forward).
        gate.drop_tokens = self.drop_tokens and self.training
        y, _, _ = self.ds(x, valid.reshape(-1) if valid is not None else None)
        if self.shared is not None:
            y = y + self.shared(x)
        if valid is not None:  # as the local path: padding rows get nothing from the layer
            y = y * valid.reshape(-1, 1).to(y.dtype)
        return y.reshape(shape), moe_stats(gate.last_routing, gate.last_capacity)


def parallelize_deepspeed(model: MoELM, ep_size: int, rank: int) -> MoELM:
    """Swap each local MoE block for its DeepSpeed expert-parallel twin, in place.

    DeepSpeed builds expert-parallel groups from consecutive ranks ([0..ep_size), ...), so this
    rank holds experts of ep_rank = rank % ep_size; `DeepSpeedStrategy` checks that after
    `deepspeed.initialize`.
    """
    from neuraflex_ray.parallel.deepspeed_comm import skip_shm_allreduce

    skip_shm_allreduce()
    for layer in model.layers:
        if isinstance(layer.ffn, MoE):
            layer.ffn = DeepSpeedMoE(layer.ffn, model.cfg, ep_size, rank % ep_size)
    return model


def to_local_name(name: str) -> str:
    """Map a DeepSpeed-layout non-expert parameter name to the local layout."""
    return name.replace(DS_GATE, "router.weight").replace(DS_BIAS, "balance_bias")
