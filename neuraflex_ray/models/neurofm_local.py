"""The decoder's local read: each query looks at the visible tokens next to it.

The latents are a bottleneck (32 slots of d for thousands of patch tokens), good for an embedding
but lossy for sample-level outputs: a 64-channel EEG window cannot pass through them intact, and a
model that reconstructs a hidden channel only from the latents loses to a ridge over the other
channels at the same instant. So, after reading the latents, every decoder query also attends to
the tokens around its own place on the (channel, patch) grid, in two axial steps:

    spatial:  query (c, n) <- tokens (c', n) of every channel c' of every modality at patch n
              (the forecast query of channel c reads patch N-1: the latest state of every channel)
    temporal: query (c, n) <- tokens (c, n') of its own channel at every context patch n'

Hidden, padded and absent tokens are never keys: a hidden patch is rebuilt from its neighbours in
space and time, never from itself. Axial attention costs (C + N) keys per query instead of C * N.

Tokens pass through norms and a width-d embedding, so a neighbour's amplitude reaches the heads
only approximately, and a model reading tokens alone regressed a hidden EEG channel towards its
mean. `SpatialFilter` adds the exact linear path: a reconstructed patch adds a signed, learned
combination of the same modality's other channels' samples at that patch, its weights a bilinear
form of the channels' place embeddings: the same family as a ridge over the other channels. (A
copy through the attention's softmax weights, convex per head, plateaued at R^2 0.55 where the
ridge reaches 0.95: EEG interpolation needs signed weights.)
"""

from __future__ import annotations

import torch
from torch import nn

from neuraflex_ray.config import NeuroFMConfig
from neuraflex_ray.models.moe import SwiGLU
from neuraflex_ray.models.moe_lm import RMSNorm
from neuraflex_ray.models.neurofm_blocks import Attention
from neuraflex_ray.models.neurofm_rows import Rows


class LocalBlock(nn.Module):
    """Spatial then temporal cross-attention from a query grid into the token grid, then a narrow FFN."""

    def __init__(self, cfg: NeuroFMConfig):
        super().__init__()
        d = cfg.dim
        self.kv_norm = RMSNorm(d, cfg.norm_eps)
        self.spatial_norm = RMSNorm(d, cfg.norm_eps)
        self.spatial = Attention(d, cfg.n_heads)
        self.temporal_norm = RMSNorm(d, cfg.norm_eps)
        self.temporal = Attention(d, cfg.n_heads)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = SwiGLU(d, d)  # runs on every query, like the latent decoder block: narrow
        # The key a query with no visible neighbour attends to (a whole hidden channel has no
        # temporal neighbour; a lone channel has no spatial one), so softmax never sees an empty row.
        self.null_key = nn.Parameter(torch.empty(d))
        nn.init.normal_(self.null_key, std=cfg.init_std)  # NeuroFM.init_weights sets it again

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.spatial.wo, self.temporal.wo, self.ffn.w2]

    def _keys(self, kv: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv [R, K, d], visible [R, K] -> with the always-visible null key first, and the mask [R, 1, 1, 1+K]."""
        r = kv.shape[0]
        kv = torch.cat([self.null_key.to(kv.dtype).expand(r, 1, -1), kv], dim=1)
        return kv, torch.cat([visible.new_ones(r, 1), visible], dim=1)[:, None, None, :]

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, visible: torch.Tensor, rows: Rows) -> torch.Tensor:
        """q [R, N+1, d] (N patch queries + 1 forecast query per channel row), tokens [R, N, d],
        visible [R, N] (True = a real, unhidden patch), `rows` placing each row in its window -> q
        updated, same shape."""
        n1, d = q.shape[1], q.shape[2]
        kv = self.kv_norm(tokens)
        # Spatial, per window and patch over the window's rows: the forecast slot reads the last
        # context patch of every channel. Projections run on the rows; only the attention itself
        # runs on the window grid, [B * (N+1), W] queries against the null key + W keys.
        kv_s = torch.cat([kv, kv[:, -1:]], dim=1)  # [R, N+1, d]
        vis_s = rows.to_windows(torch.cat([visible, visible[:, -1:]], dim=1)).transpose(1, 2).reshape(-1, rows.width)
        att = self.spatial
        per_patch = [rows.to_windows(t).transpose(1, 2).reshape(-1, rows.width, d)  # [B * (N+1), W, d]
                     for t in (att.wq(self.spatial_norm(q)), att.wk(kv_s), att.wv(kv_s))]
        null = self.null_key.to(kv.dtype).expand(per_patch[0].shape[0], 1, -1)
        k = torch.cat([att.wk(null), per_patch[1]], dim=1)
        v = torch.cat([att.wv(null), per_patch[2]], dim=1)
        mask = torch.cat([vis_s.new_ones(vis_s.shape[0], 1), vis_s], dim=1)[:, None, None, :]
        y = att.attend(per_patch[0], k, v, mask).view(rows.batch, n1, rows.width, d).transpose(1, 2)
        q = q + att.wo(rows.from_windows(y))
        # Temporal: every query of a row reads that row's context patches.
        q = q + self.temporal(self.temporal_norm(q), *self._keys(kv, visible))
        return q + self.ffn(self.ffn_norm(q))


class SpatialFilter(nn.Module):
    """A patch as a signed linear combination of the same modality's OTHER channels at that patch.

    weight(c, c') = <wq e_c, wk e_c'> / sqrt(d), e = the channels' place embeddings (modality +
    channel id): per montage, a learned C x C interpolation matrix with a zero diagonal, applied
    to whichever neighbours are seen (hidden, padded and absent channels weigh 0). wq starts at 0,
    so the filter starts silent and grows where it pays.
    """

    def __init__(self, cfg: NeuroFMConfig):
        super().__init__()
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, where: torch.Tensor, x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """where [B, C, d], x [B, C, N, P] (unseen samples zeroed), seen [B, C, N] -> [B, C, N, P]."""
        c, d = where.shape[1], where.shape[2]
        w = self.wq(where) @ self.wk(where).transpose(1, 2) / d ** 0.5  # [B, C query, C key]
        w = w * (1 - torch.eye(c, dtype=w.dtype, device=w.device))  # never a channel from itself
        coeff = w[:, None] * seen.transpose(1, 2)[:, :, None, :].to(w.dtype)  # [B, N, C, C]
        return torch.einsum("bnqk,bknp->bqnp", coeff, x.to(w.dtype))


def local_block_macs(cfg: NeuroFMConfig, queries: float, tokens: float, channels: float) -> float:
    """Forward multiply-adds of LocalBlock for one window: Q/O projections of both attentions on
    every query, K/V projections of every token for both, scores and weighted sums against C
    (spatial) and N (temporal) keys per query, and the FFN on every query."""
    d, n = cfg.dim, cfg.context_patches
    projections = 2 * (2 * d * d * queries + 2 * d * d * tokens)
    attention = 2 * queries * d * (channels + 1) + 2 * queries * d * (n + 1)
    return projections + attention + 3 * d * d * queries
