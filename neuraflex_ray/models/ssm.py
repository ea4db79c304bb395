"""A bidirectional selective state-space block (Mamba-style) in plain PyTorch: NeuroFM's `backbone: ssm`.

The block replaces self-attention over the latents with Mamba's selective scan (Gu & Dao, 2023):
each channel of the sequence runs through a linear recurrence whose step size Δ and input/output
maps B, C depend on the current element, so the block chooses per element what to keep and
what to forget. Attention mixes L elements in O(L^2); the scan does it in O(L).

The scan is a plain Python loop over the sequence, vectorised over batch, channels and state.
It runs wherever PyTorch does (CPU, under FSDP2, in bf16), with no CUDA kernel: the fused scan of
the `mamba_ssm` package is CUDA-only. The loop is short here because NeuroFM's backbone runs over
the Perceiver latents (32 in the debug flavour, 128 in `base`), not over the tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import NeuroFMConfig
from neuraflex_ray.models.moe import SwiGLU
from neuraflex_ray.models.moe_lm import RMSNorm

DT_MIN, DT_MAX = 1e-3, 1e-1  # the range of the step Δ at init (Mamba's defaults)


def dt_rank(dim: int) -> int:
    """Rank of Δ's low-rank projection: ceil(dim / 16), as in Mamba."""
    return math.ceil(dim / 16)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor) -> torch.Tensor:
    """The selective scan, forward in time from h = 0:

        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t        y_t = C_t h_t + D u_t

    u, delta: [b, L, c]; A: [c, n] (negative, so every exp(Δ A) is a decay in (0, 1));
    B, C: [b, L, n], shared by the c channels; D: [c]. Returns y [b, L, c] in u's dtype.

    Computed in at least fp32 whatever the parameters' dtype: the state adds up L steps, and bf16
    (8 bits of mantissa) would lose the small contributions of a slowly decaying channel.
    """
    dtype = u.dtype
    work = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C, D = (t.to(work) for t in (u, delta, A, B, C, D))
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # [b, c, n]
    ys = []
    # One step's tensors at a time ([b, c, n] stays in cache), not exp(ΔA) and ΔBu for all L steps
    # at once: the same work, 2-3x faster on CPU. unbind, not x[:, t]: the backward of L indexings
    # writes L full-size zero tensors (quadratic in L), that of unbind is one stack.
    for delta_t, du_t, b_t, c_t in zip(delta.unbind(1), (delta * u).unbind(1), B.unbind(1), C.unbind(1), strict=True):
        h = torch.exp(delta_t[..., None] * A) * h + du_t[..., None] * b_t[:, None, :]
        ys.append(torch.einsum("bcn,bn->bc", h, c_t))
    return (torch.stack(ys, dim=1) + u * D).to(dtype)


class SSMBlock(nn.Module):
    """Pre-norm residual block over a sequence x [B, L, d]: a bidirectional selective-scan mixer,
    then a SwiGLU FFN (ffn_mult * d), each with its own RMSNorm and residual.

    Mixer: in-projection to (u, z) of width d_inner = ssm_expand * d; a depthwise causal conv over
    the sequence and SiLU on u; the selective scan of u with an input-dependent step
    Δ = softplus(low-rank projection + bias) and input-dependent B, C (ssm_state each);
    A = -exp(A_log) (S4D-real init, A_n = n); a D skip; the output gated by SiLU(z); out-projection.

    Why the FFN: the mixer alone holds about 3 * ssm_expand * d^2 parameters, under half of a
    transformer Block (4 d^2 attention + 12 d^2 FFN at ffn_mult 4). With the FFN the block holds
    1.15-1.2x the transformer Block's parameters and costs 1.15-1.3x its FLOPs at the debug and
    base flavours (313k vs 262k parameters at d = 128), so `n_layers` means about the same budget
    whichever backbone is chosen, and the choice swaps the token mixer only.
    """

    def __init__(self, cfg: NeuroFMConfig):
        super().__init__()
        d = cfg.dim
        self.d_inner, self.d_state, self.dt_rank = cfg.ssm_expand * d, cfg.ssm_state, dt_rank(d)
        di, n = self.d_inner, self.d_state
        self.mixer_norm = RMSNorm(d, cfg.norm_eps)
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv = nn.Conv1d(di, di, cfg.ssm_conv, groups=di, padding=cfg.ssm_conv - 1)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * n, bias=False)  # -> Δ (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=False)
        # Δ's bias is its own parameter, not dt_proj's: NeuroFM.init_weights zeroes every Linear
        # bias, and a zero bias would start every Δ near softplus(0) = 0.69 instead of in [DT_MIN, DT_MAX].
        self.dt_bias = nn.Parameter(torch.empty(di))
        # Stored flat (1-D): train/strategy.py's param_groups decays only tensors of 2 or more
        # dimensions, and weight decay pulling A_log to 0 would drag every A_n towards -1, erasing
        # the spread of decay rates of the S4D-real init (Mamba exempts A_log and D from decay too).
        self.A_log = nn.Parameter(torch.empty(di * n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = SwiGLU(d, cfg.ffn_mult * d)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise what NeuroFM.init_weights does not know: Δ's bias, A_log, D and the conv.

        (The Linears keep PyTorch's init here; inside NeuroFM, init_weights re-draws them fan-in
        scaled and scales `residual_outputs()` down. After `to_empty()` from the meta device, call
        this too: init_weights alone leaves these four uninitialised.) Δ's bias is the inverse softplus of steps
        log-spaced over [DT_MIN, DT_MAX] across the channels: slow and fast channels from the
        start, as Mamba's log-uniform draw gives, without drawing from the RNG.
        """
        dt = torch.logspace(math.log10(DT_MIN), math.log10(DT_MAX), self.d_inner)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)  # S4D-real: A_n = -n
        self.A_log.copy_(torch.log(a).repeat(self.d_inner))
        self.D.fill_(1.0)
        self.conv.reset_parameters()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The token mixer: x [B, L, d] (normalised) -> [B, L, d].

        Bidirectional, with every parameter shared by both directions: the latents are learned
        slots with no natural order, so "forward" and "backward" mean nothing that two separate
        sets of weights could learn, and a forward-only scan would let the first latent see only
        itself and the last see everything. Sharing makes the mixer commute with reversing the
        sequence (neither end is privileged), keeps the parameter count of one direction, and
        runs both directions as one batch of 2B rows through the conv, projections and scan.
        The two directions are averaged, so the output has the scale of one scan.
        """
        b, length, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, d_inner] each
        u = torch.cat([u, u.flip(1)], dim=0)  # rows [0, B) read the sequence in order, [B, 2B) reversed
        u = F.silu(self.conv(u.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: trim the right padding
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_low).float() + self.dt_bias.float())  # fp32: Δ spans two decades
        A = -torch.exp(self.A_log.float()).view(self.d_inner, self.d_state)
        y = selective_scan(u, delta, A, B, C, self.D)
        y = 0.5 * (y[:b] + y[b:].flip(1))  # the reversed rows back in order
        return self.out_proj(y * F.silu(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.mixer_norm(x))
        return x + self.ffn(self.ffn_norm(x))

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections that write into the residual stream (scaled down at init)."""
        return [self.out_proj, self.ffn.w2]


def ssm_block_macs(cfg: NeuroFMConfig) -> float:
    """Forward multiply-adds of one SSMBlock over L = n_latents elements (the convention of
    `neurofm_flops_per_window`: matmul multiply-adds; norms, activations and exp left out).

    In- and out-projections and the FFN run once; the conv, the Δ/B/C projections and the scan
    run once per direction (2x). The scan counts 4 per element, channel and state: Δ·A, (Δu)·B,
    the update exp(ΔA)·h + ΔBu and the readout C·h.
    """
    d, lat, n, r = cfg.dim, cfg.n_latents, cfg.ssm_state, dt_rank(cfg.dim)
    di = cfg.ssm_expand * d
    per_direction = di * cfg.ssm_conv + di * (r + 2 * n) + r * di + 4 * di * n
    return lat * (d * 2 * di + 2 * per_direction + di * d + 3 * d * cfg.ffn_mult * d)
