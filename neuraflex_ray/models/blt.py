"""Byte Latent Transformer: bytes in, no tokenizer; a global transformer over patches of bytes.

    bytes x_0..x_{T-1} --byte + hashed n-gram embeddings--> local encoder (causal) --> h_t
    patch j = the bytes between two starts (models/blt_patching.py) --cross-attention pooling--> p_j
    p_0..p_{P-1} --global transformer (NeuralFlex-MoE blocks, causal over patches)--> g_j
    h_t + cross-attention to [start; g_0..g_k(t)] --> local decoder (causal) --> logits for x_{t+1}

Causality: position t predicts byte t+1 from bytes <= t. A patch's global state depends on all its
bytes, so position t may read patches that end at or before t: k(t) = patch of byte t+1, minus one.
That needs the start flag at t+1, which every patching rule decides before byte t+1 exists (entropy
patching from the entropy model's prediction of it; models/blt_patching.py), so generation follows
the same rule (models/blt_generate.py).

Every block of a batch is given `max_patches` patch slots (the patch count a block can reach under
its patching rule); slots past a block's last patch are zero, masked out of every cross-attention,
sit after the real patches (the causal global transformer never lets them reach a real one), and
are routed to no expert (no capacity, no part in the router losses). That fixed count is what
expert parallelism needs: every rank passes the same number of patches to the all-to-all.
Nothing here knows of process groups: `global_layers` has the `.layers`/`.cfg` shape that
`parallel/deepspeed_moe.parallelize_deepspeed` lays out for expert parallelism.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config.blt import BLTConfig
from neuraflex_ray.config.lm import ModelConfig
from neuraflex_ray.models.blt_patching import N_IDS, max_patches, patch_starts
from neuraflex_ray.models.moe import MoE, MoEStats
from neuraflex_ray.models.moe_lm import Block, KVCache, RMSNorm, rope_tables

_NO_BYTE = N_IDS  # what an n-gram holds before a block's first byte


def local_config(cfg: BLTConfig, n_layers: int) -> ModelConfig:
    """A dense transformer block config at the local width (no routed layers: moe_every past the stack)."""
    return ModelConfig(dim=cfg.dim, n_layers=n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, num_experts=0,
                       moe_every=n_layers + 1, dense_ffn_dim=cfg.local_ffn_dim, max_seq_len=cfg.max_seq_len,
                       norm_eps=cfg.norm_eps, vocab_size=N_IDS)


def patch_slots(cfg: BLTConfig, n_bytes: int) -> int:
    return max_patches(n_bytes, cfg.patching, size=max(1, round(cfg.patch_size)), min_bytes=cfg.min_patch_bytes)


def starts_of(cfg: BLTConfig, blocks: np.ndarray, entropy: np.ndarray | None) -> torch.Tensor:
    """bool [B, L]: where the config's patching rule starts patches in these blocks of raw byte ids
    (`entropy`: the entropy model's [B, L] entropies; entropy patching needs them)."""
    ids = torch.from_numpy(np.array(blocks, dtype=np.int64))  # copies: Ray's batches are read-only
    h = torch.from_numpy(np.array(entropy, dtype=np.float32)) if entropy is not None else None
    return patch_starts(ids, h, cfg.patching, threshold=cfg.threshold, size=max(1, round(cfg.patch_size)),
                        monotonic=cfg.monotonic, min_bytes=cfg.min_patch_bytes)


class HashedNgrams(nn.Module):
    """The byte's embedding plus one hashed embedding per n-gram ending at it (BLT's n-gram hashes)."""

    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.ngrams, self.buckets = list(cfg.hash_ngrams), cfg.hash_buckets
        self.byte = nn.Embedding(N_IDS, cfg.dim)
        self.tables = nn.ModuleList(nn.Embedding(cfg.hash_buckets, cfg.dim) for _ in self.ngrams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.byte(x)
        padded = F.pad(x, (max(self.ngrams, default=1) - 1, 0), value=_NO_BYTE)
        for n, table in zip(self.ngrams, self.tables, strict=True):
            h = torch.zeros_like(x)
            for i in range(n):  # a polynomial hash of the n bytes ending at each position
                start = padded.shape[1] - x.shape[1] - i
                h = (h * (N_IDS + 1) + padded[:, start:start + x.shape[1]]) % self.buckets
            out = out + table(h)
        return out


class CrossAttention(nn.Module):
    """Queries of one stream attend to keys of another under a boolean mask [B, Q, K] (True: may attend)."""

    def __init__(self, q_dim: int, kv_dim: int, n_heads: int, out_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, out_dim // n_heads
        self.wq = nn.Linear(q_dim, out_dim, bias=False)
        self.wk = nn.Linear(kv_dim, out_dim, bias=False)
        self.wv = nn.Linear(kv_dim, out_dim, bias=False)
        self.wo = nn.Linear(out_dim, out_dim, bias=False)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, nq, _ = q.shape
        nk = kv.shape[1]
        heads = (self.wq(q).view(b, nq, self.n_heads, self.head_dim).transpose(1, 2),
                 self.wk(kv).view(b, nk, self.n_heads, self.head_dim).transpose(1, 2),
                 self.wv(kv).view(b, nk, self.n_heads, self.head_dim).transpose(1, 2))
        y = F.scaled_dot_product_attention(*heads, attn_mask=mask[:, None])
        return self.wo(y.transpose(1, 2).reshape(b, nq, -1))


class GlobalTransformer(nn.Module):
    """NeuralFlex-MoE blocks over patch vectors (no embeddings, no head): `.layers` and `.cfg` as MoELM has."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, p: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
        """p [B, P, g] patch vectors at patch positions start.. (with `caches`: those before are cached);
        `valid` [B, P]: the slots that hold a patch (the MoE layers route only those)."""
        n = start + p.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"{n} patch slots exceed model.global_model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin, stats = self.rope_cos[start:n], self.rope_sin[start:n], []
        for i, layer in enumerate(self.layers):
            p, s = layer(p, cos, sin, caches[i] if caches is not None else None, start, valid)
            if s is not None:
                stats.append(s)
        return self.norm(p), stats


class BLT(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.global_model.dim
        self.embed = HashedNgrams(cfg)
        enc_cfg, dec_cfg = local_config(cfg, cfg.encoder_layers), local_config(cfg, cfg.decoder_layers)
        self.encoder = nn.ModuleList(Block(enc_cfg, i) for i in range(cfg.encoder_layers))
        self.pool_in = nn.Linear(cfg.dim, g, bias=False)  # a patch's query: the max over its bytes' states
        self.pool = CrossAttention(g, cfg.dim, cfg.global_model.n_heads, g)
        self.global_layers = GlobalTransformer(dataclasses.replace(
            cfg.global_model, max_seq_len=max(cfg.global_model.max_seq_len, patch_slots(cfg, cfg.max_seq_len))))
        self.start = nn.Parameter(torch.zeros(1, 1, g))  # what a byte reads before any patch is complete
        self.read = CrossAttention(cfg.dim, g, cfg.n_heads, cfg.dim)
        self.decoder = nn.ModuleList(Block(dec_cfg, i) for i in range(cfg.decoder_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, N_IDS, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, 10000.0)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, MoE):
                m.init_weights(std, std / math.sqrt(2 * self.cfg.global_model.n_layers))
        nn.init.normal_(self.start, std=std)

    def _local(self, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope_cos[:h.shape[1]], self.rope_sin[:h.shape[1]]
        for block in blocks:
            h, _ = block(h, cos, sin, None, 0)
        return h

    def forward(self, x: torch.Tensor, starts: torch.Tensor, n_slots: int | None = None,
                ) -> tuple[torch.Tensor, list[MoEStats]]:
        """x [B, T] bytes (0-255, EOS = 256); starts [B, T + 1] bool: a patch starts at byte t (the last flag
        is the next byte's: it decides which patches position T - 1 may read). -> logits [B, T, 257] for
        bytes 1..T, and the global transformer's routing statistics."""
        b, t = x.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} bytes exceeds model.max_seq_len={self.cfg.max_seq_len}")
        n_slots = n_slots or patch_slots(self.cfg, t)
        pid = starts.long().cumsum(1) - 1  # [B, T + 1]: the patch of each byte
        if int(pid[:, :t].max()) >= n_slots:
            raise ValueError(f"a block of {t} bytes has {int(pid[:, :t].max()) + 1} patches, more than its "
                             f"{n_slots} slots: patch with model.min_patch_bytes >= {self.cfg.min_patch_bytes}")
        h = self._local(self.encoder, self.embed(x))
        # Pooling: each patch's query is the max of its bytes' states; it attends to its own bytes only.
        slots = torch.arange(n_slots, device=x.device)
        member = pid[:, None, :t] == slots[None, :, None]  # [B, P, T]
        real = member.any(-1)  # [B, P]: slots that hold a patch
        index = pid[:, :t, None].expand(-1, -1, h.shape[-1])
        pooled = h.new_zeros(b, n_slots, h.shape[-1]).scatter_reduce(1, index, h, "amax", include_self=False)
        query = self.pool_in(pooled)
        mask = member | ~real[..., None]  # an empty slot attends to everything, then is zeroed
        p = torch.where(real[..., None], query + self.pool(query, h, mask), torch.zeros_like(query))
        g, stats = self.global_layers(p, valid=real)
        # Reading: position t sees the start state and the patches that end at or before byte t.
        latest = pid[:, 1:] - 1  # [B, T]: the last complete patch for position t (-1: none yet)
        keys = torch.cat([self.start.expand(b, 1, -1), g], dim=1)  # slot 0: start; slot j + 1: patch j
        key_ids = torch.arange(n_slots + 1, device=x.device) - 1
        read_mask = (key_ids[None, None, :] <= latest[..., None]) & torch.cat(
            [torch.ones(b, 1, dtype=torch.bool, device=x.device), real], dim=1)[:, None, :]
        d = self._local(self.decoder, h + self.read(h, keys, read_mask))
        return self.output(self.norm(d)), stats


def blt_loss(logits: torch.Tensor, targets: torch.Tensor, stats: list[MoEStats], cfg: BLTConfig) -> dict[str, torch.Tensor]:
    """Next-byte cross entropy (nats per byte) plus the global transformer's router losses."""
    from neuraflex_ray.models.moe_lm import lm_loss

    parts = lm_loss(logits, targets, stats, cfg.global_model)
    return {"total": parts.total, "ce": parts.ce, "aux": parts.aux, "z": parts.z}


# ---------------------------------------------------------------------------------------------
# FLOP accounting (torchtitan's convention, as models/moe_lm.flops_per_token: a matmul of an m x k by a
# k x n matrix is 2mkn forward, attention is counted in full, training is 3x forward)
# ---------------------------------------------------------------------------------------------


def forward_flops(cfg: BLTConfig, n_bytes: int, n_patches: int) -> dict[str, float]:
    """Forward FLOPs of one block of `n_bytes` bytes whose global transformer runs over `n_patches`
    patch vectors, by part. In training `n_patches` is the padded slot count (padding costs as much as
    a patch); in inference, the real patches. Hashed n-gram embeddings are lookups: no FLOPs."""
    from neuraflex_ray.models.moe_lm import param_counts

    d, f, g, t, p = cfg.dim, cfg.local_ffn_dim, cfg.global_model.dim, n_bytes, n_patches
    per_local_layer = t * (2 * (4 * d * d + 3 * d * f) + 4 * d * t)  # projections + attention over t bytes
    gm = dataclasses.replace(cfg.global_model, vocab_size=0)  # no embedding or head in the global part
    return {
        "encoder": cfg.encoder_layers * per_local_layer,
        "pooling": p * 2 * (d * g + 2 * g * g) + t * 2 * (2 * d * g) + 4 * p * t * g,
        "global": p * (2 * param_counts(gm)["active"] + 4 * gm.n_layers * g * p),
        "reading": t * 2 * (2 * d * d) + (p + 1) * 2 * (2 * g * d) + 4 * t * (p + 1) * d,
        "decoder": cfg.decoder_layers * per_local_layer,
        "head": t * 2 * d * N_IDS,
    }


def train_flops_per_block(cfg: BLTConfig, n_bytes: int) -> float:
    """Training FLOPs of one block: 3 x forward, the global transformer over every padded patch slot."""
    return 3 * sum(forward_flops(cfg, n_bytes, patch_slots(cfg, n_bytes)).values())


def inference_flops_per_byte(cfg: BLTConfig, n_bytes: int, mean_patch_bytes: float) -> float:
    """Forward FLOPs per byte of a context of `n_bytes`, at `mean_patch_bytes` bytes per patch (no padding)."""
    return sum(forward_flops(cfg, n_bytes, max(1, round(n_bytes / mean_patch_bytes))).values()) / n_bytes
