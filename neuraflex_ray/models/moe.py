"""Top-k routed SwiGLU experts, executed locally and without dropping tokens.

The layer owns one set of parameters: a router `[E, d]` and stacked expert weights
`w1, w3: [E, d, f]`, `w2: [E, f, d]`. This file runs them in one process (training on one
device, evaluation, serving). `neuraflex_ray/parallel/deepspeed_moe.py` runs the *same*
parameters through DeepSpeed's expert-parallel `MoE` layer; both paths share `route()` and the
auxiliary losses below, so they optimise the identical objective.

Which experts a token goes to is decided by `route()` in `neuraflex_ray/models/routers.py`
(`model.router`: softmax top-k, DeepSeek-V3's aux-loss-free bias, or Sinkhorn), on both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.models.routers import Routing, route


def load_balancing_loss(r: Routing) -> torch.Tensor:
    """Switch/GShard balance loss: E * sum_e f_e * P_e.

    f_e is the fraction of the N*k token->expert assignments that go to expert e, P_e the mean
    router probability of e. It is 1.0 under perfectly uniform routing.
    """
    num_experts = r.probs.shape[-1]
    counts = torch.bincount(r.experts.flatten(), minlength=num_experts).to(r.probs.dtype)
    f = counts / r.experts.numel()
    p = r.probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition; keeps router logits small and stable."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@dataclass
class MoEStats:
    """What one MoE layer reports per forward: losses (with grad) and routing statistics."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_fraction: torch.Tensor  # [E], detached: share of assignments per expert
    dropped_fraction: torch.Tensor  # scalar, detached: share of assignments over capacity


def moe_stats(r: Routing, capacity: int | None = None) -> MoEStats:
    num_experts = r.probs.shape[-1]
    counts = torch.bincount(r.experts.detach().flatten(), minlength=num_experts).float()
    if capacity is None:
        dropped = torch.zeros((), device=r.probs.device)
    else:
        dropped = (counts - capacity).clamp_min(0).sum() / r.experts.numel()
    return MoEStats(
        aux_loss=load_balancing_loss(r),
        z_loss=router_z_loss(r.logits),
        expert_fraction=counts / r.experts.numel(),
        dropped_fraction=dropped,
    )


def load_cv_of(expert_fraction: torch.Tensor) -> float:
    """Coefficient of variation of the experts' shares (0 when perfectly balanced)."""
    f = expert_fraction.float()
    return float(f.std(unbiased=False) / f.mean().clamp_min(1e-12))


def mean_stats(history: list[list[MoEStats]]) -> list[MoEStats]:
    """Per-layer average over micro-batches, for logging (pass detached stats: see the train loop)."""
    def avg(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([v.float() for v in values]).mean(0)

    return [MoEStats(aux_loss=avg([s.aux_loss for s in layer]), z_loss=avg([s.z_loss for s in layer]),
                     expert_fraction=avg([s.expert_fraction for s in layer]),
                     dropped_fraction=avg([s.dropped_fraction for s in layer]))
            for layer in zip(*history, strict=True)]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: (silu(x w1) * x w3) w2, weights stored [in, out]."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides (dims a multiple of 4 in fp32). Its CUDA
    # kernels take bf16 (Hopper); fp32 grouped GEMM is an eager CPU path (its compile-time meta
    # kernel wants bf16), so CUDA fp32 and compiled fp32 fall back.
    if not hasattr(torch, "_grouped_mm"):
        return False
    if tensors[0].dtype != torch.bfloat16 and (tensors[0].device.type == "cuda" or torch.compiler.is_compiling()):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU over tokens already sorted by expert: rows [off_e, off_e + counts_e) go to expert e.

    Uses one grouped matmul per weight (torch._grouped_mm) where available; otherwise a loop
    over contiguous slices, which is still dropless and mask-free.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Autocast does not cover _grouped_mm: cast as it would for a matmul, or fp32 master weights
        # under bf16 autocast would send every step down the per-expert loop below.
        dtype = torch.get_autocast_dtype(device)
        x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    if _grouped_mm_ok(x, w1, w2):
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)
    outs = [swiglu(xe, w1[e], w3[e], w2[e]) for e, xe in enumerate(torch.split(x, counts.tolist()))]
    return torch.cat(outs)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts, plus an optional always-on shared expert."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, shared_ffn_dim: int = 0,
                 router: str = "softmax_topk", sinkhorn_iters: int = 8):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router_kind, self.sinkhorn_iters = router, sinkhorn_iters
        # Serving sets this for batched decode steps: every expert runs on every token, so the shapes a
        # token's arithmetic sees are fixed, whatever the other rows route to (a grouped GEMM's result
        # for a row changes with its group's size). E/k times the expert FLOPs; a decode step reads
        # every expert's weights anyway.
        self.batch_invariant = False
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.shared = SwiGLU(dim, shared_ffn_dim) if shared_ffn_dim > 0 else None
        if router == "aux_free":  # a buffer, not a parameter: no gradient moves it (see routers.py)
            self.register_buffer("balance_bias", torch.zeros(num_experts))
        else:
            self.balance_bias = None

    def route(self, x: torch.Tensor) -> Routing:
        return route(F.linear(x.float(), self.router.weight.float()), self.top_k, self.router_kind,
                     self.balance_bias, self.training, self.sinkhorn_iters)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [..., d] -> (output [..., d], routing statistics). `valid` (bool, x's shape less d): rows that
        hold a token; the others (padding) are not routed, take no part in the statistics, and get 0."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if valid is not None:
            rows = valid.reshape(-1).nonzero().squeeze(1)
            y, stats = self.forward(x.index_select(0, rows))
            return y.new_zeros(x.shape[0], y.shape[-1]).index_copy(0, rows, y).reshape(shape), stats
        r = self.route(x)
        y = self.experts_forward(x, r)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape), moe_stats(r)

    def experts_forward(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        if self.batch_invariant:
            return self._all_experts_forward(x, r)
        n, k = r.experts.shape
        flat = r.experts.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        token_of = order // k
        out = grouped_swiglu(x[token_of], counts, self.w1, self.w3, self.w2)
        out = out * r.weights.flatten()[order, None].to(out.dtype)
        return x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token_of, out)

    def _all_experts_forward(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        h = F.silu(torch.matmul(x, self.w1)) * torch.matmul(x, self.w3)  # [E, N, f]
        every = torch.matmul(h, self.w2)  # [E, N, d]: expert e's output for every token
        rows = torch.arange(x.shape[0], device=x.device)
        y = torch.zeros_like(x)
        for j in range(self.top_k):  # the k picks in rank order, the same sum order for every token
            y = y + every[r.experts[:, j], rows] * r.weights[:, j, None].to(x.dtype)
        return y


def naive_moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference implementation: a Python loop over experts with boolean masks (benchmarks, tests)."""
    x2 = x.reshape(-1, x.shape[-1])
    r = moe.route(x2)
    y = torch.zeros_like(x2)
    for e in range(moe.num_experts):
        tok, slot = torch.where(r.experts == e)
        if tok.numel() == 0:
            continue
        h = swiglu(x2[tok], moe.w1[e], moe.w3[e], moe.w2[e])
        y.index_add_(0, tok, h * r.weights[tok, slot, None])
    if moe.shared is not None:
        y = y + moe.shared(x2)
    return y.reshape(x.shape)
