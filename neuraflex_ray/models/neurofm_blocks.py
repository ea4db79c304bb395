"""NeuroFM's building blocks: attention (self or cross), the Perceiver cross block and the latent block.

Pre-norm residual blocks over RMSNorm and SwiGLU, shared with the LM (`moe_lm.py`, `moe.py`). The
backbone over the latents is built from `backbone_block`: the transformer `Block` here, or the
selective state-space block of `ssm.py` (`model.backbone: ssm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import NeuroFMConfig
from neuraflex_ray.models.moe import SwiGLU
from neuraflex_ray.models.moe_lm import RMSNorm
from neuraflex_ray.models.ssm import SSMBlock, ssm_block_macs


class Attention(nn.Module):
    """Multi-head attention; self-attention when `ctx` is None, cross-attention otherwise."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                ctx_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, Q, d]; ctx: [B, S, d]; mask: bool [B, 1, 1, S], True = key visible.

        ctx_rows [B] int64 (optional): query row i reads context ctx_rows[i] of ctx [B', S, d]; the
        keys and values are projected once per context, however many rows read it."""
        ctx = x if ctx is None else ctx
        k, v = self.wk(ctx), self.wv(ctx)
        if ctx_rows is not None:
            k, v = k[ctx_rows], v[ctx_rows]
        return self.wo(self.attend(self.wq(x), k, v, mask))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected queries [B, Q, d], keys and values [B, S, d] -> [B, Q, d] before the output projection."""
        b, nq, _ = q.shape
        s = k.shape[1]
        q = q.view(b, nq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(b, nq, self.n_heads * self.head_dim)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention from queries into a context, then a SwiGLU FFN on the queries."""

    def __init__(self, cfg: NeuroFMConfig, ffn_dim: int | None = None):
        super().__init__()
        self.q_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.kv_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, ffn_dim or cfg.ffn_mult * cfg.dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None,
                ctx_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.q_norm(x), self.kv_norm(ctx), mask, ctx_rows)
        return x + self.ffn(self.ffn_norm(x))

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections that write into the residual stream (scaled down at init)."""
        return [self.attn.wo, self.ffn.w2]


class Block(nn.Module):
    """Pre-norm self-attention block over the latents (no positions: latents are learned slots)."""

    def __init__(self, cfg: NeuroFMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_mult * cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.attn.wo, self.ffn.w2]


def backbone_block(cfg: NeuroFMConfig) -> nn.Module:
    """One block of the backbone over the latents [B, L, d] -> [B, L, d], as `cfg.backbone` says:
    the transformer Block or the bidirectional selective state-space block (`ssm.py`)."""
    if cfg.backbone == "transformer":
        return Block(cfg)
    if cfg.backbone == "ssm":
        return SSMBlock(cfg)
    raise ValueError(f"model.backbone={cfg.backbone!r} is not known; use 'transformer' or 'ssm'")


def backbone_block_macs(cfg: NeuroFMConfig) -> float:
    """Multiply-adds of one backbone block over one window's L latents (forward).

    Transformer: Q/K/V/out projections (4 d^2) and the SwiGLU FFN (3 d ffn_mult d) per latent,
    plus QK^T and AV (2 L^2 d). SSM: see `ssm_block_macs`.
    """
    if cfg.backbone == "ssm":
        return ssm_block_macs(cfg)
    d, lat = cfg.dim, cfg.n_latents
    return lat * (4 * d * d + 3 * d * cfg.ffn_mult * d) + 2 * lat * lat * d
