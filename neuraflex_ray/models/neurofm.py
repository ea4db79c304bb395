"""NeuroFM: a multimodal foundation model for neural and physiological time series.

Every channel of every modality is cut into patches of `P_m` samples (the same `patch_s` seconds
for all modalities); a patch becomes one token: a per-modality Linear of its samples plus learned
modality, channel-id and patch-time embeddings. So any channel count works, and a channel is known
by its id, not its position. `n_latents` learned latents read all tokens through Perceiver
cross-attention (linear in the number of tokens), a backbone mixes the latents (`model.backbone`:
transformer blocks, or the bidirectional selective state-space blocks of `ssm.py`), and
light cross-attention decoders read the final latents back out (blocks in `neurofm_blocks.py`):

    tokens [B, S, d] --cross_blocks--> latents [B, L, d] --blocks--> latents --+--> mean -> embedding
                                                                               +--> decoder(queries) -> recon / forecast

A decoder query knows only where a patch is (modality + channel + time), never its values. It reads
the latents, then (`local_decoder`, `neurofm_local.py`) the visible tokens at its own patch in every
channel and in its own channel at every patch: a hidden patch is rebuilt from the latents and its
neighbours, never from itself, and the future only from the context.

Objectives (`neurofm_objectives.py`): masked-patch reconstruction, multi-horizon forecasting and a symmetric
InfoNCE between the embeddings of one window seen through two different modalities.

Nothing here knows about process groups or meshes. The FSDP strategy shards each block of
`cross_blocks` and `blocks` and then the root; because the root's parameters (encoders, heads,
latents) are gathered around the root's forward, everything that uses a parameter, including the
per-modality contrastive views, happens inside one `NeuroFM.forward` call, and each block runs
exactly once per forward (the contrastive views are extra latent groups, not extra calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import NeuroFMConfig
from neuraflex_ray.models.moe_lm import RMSNorm
from neuraflex_ray.models.neurofm_blocks import CrossBlock, backbone_block, backbone_block_macs
from neuraflex_ray.models.neurofm_local import LocalBlock, SpatialFilter, local_block_macs
from neuraflex_ray.models.neurofm_rows import Rows, find_rows

AR_PATCHES = 4  # the forecasts' linear path reads this many last context patches (as the ridge baseline does)


@dataclass
class SeriesInput:
    """One modality for a batch of windows."""

    x: torch.Tensor  # [B, C, T] float samples, normalised; zeros where absent
    chan: torch.Tensor  # [B, C] int64 channel ids (1-based, from the manifest), 0 = padding
    present: torch.Tensor  # [B] bool: the modality has data in this window
    # [B, C, T] bool, optional: samples the objectives zero in the encoder's input only, while the
    # targets keep them (the time masking augmentation). The model itself ignores it.
    hide: torch.Tensor | None = None


@dataclass
class NeuroOutput:
    latents: torch.Tensor  # [B, L, d] final latents (after the final norm)
    embedding: torch.Tensor  # [B, d] mean of the final latents
    recon: dict[str, torch.Tensor]  # m -> [B, C, N, P_m] every context patch, reconstructed
    forecast: dict[str, torch.Tensor]  # m -> [B, C, K, P_m]; [..., j, :] is horizon cfg.horizon_patches[j]
    # m -> [B, d] projected embedding of the window seen through modality m alone; filled only
    # when forward(per_modality=True) (the contrastive objective), else empty.
    modality_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    # m -> [B, bands_m] predicted log band powers of the window's context in modality m; filled only
    # when cfg.spectral_weight > 0 (the spectral target, models/neurofm_objectives.py).
    spectral: dict[str, torch.Tensor] = field(default_factory=dict)


def spectral_bands(cfg: NeuroFMConfig, modality: str) -> int:
    """Bands of modality's spectral target: cfg.spectral_bands, at most one per frequency bin of its
    context (DC left out)."""
    samples = cfg.context_patches * cfg.patch_lens[cfg.modalities.index(modality)]
    return max(1, min(cfg.spectral_bands, samples // 2))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class NeuroFM(nn.Module):
    def __init__(self, cfg: NeuroFMConfig):
        super().__init__()
        if not cfg.modalities or len(cfg.patch_lens) != len(cfg.modalities):
            raise ValueError("model.modalities and model.patch_lens must be set, one patch length per modality "
                             "(the driver fills them from the dataset manifest)")
        if cfg.context_patches <= 0 or not cfg.horizon_patches or min(cfg.horizon_patches) <= 0:
            raise ValueError("model.context_patches and model.horizon_patches must be set (from the dataset manifest)")
        if cfg.n_channel_ids <= 1:
            raise ValueError("model.n_channel_ids must be set (the manifest's n_channel_ids: channel count + 1)")
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"model.dim={cfg.dim} must be divisible by model.n_heads={cfg.n_heads}")
        self.cfg = cfg
        self.modality_index = {m: i for i, m in enumerate(cfg.modalities)}
        self.patch_len = dict(zip(cfg.modalities, cfg.patch_lens, strict=True))
        d, k = cfg.dim, len(cfg.horizon_patches)
        # Token embedding: patch samples -> d (per modality, since P_m and units differ), plus where it is.
        self.patch_embed = nn.ModuleDict({m: nn.Linear(p, d) for m, p in self.patch_len.items()})
        self.modality_emb = nn.Embedding(len(cfg.modalities), d)
        self.channel_emb = nn.Embedding(cfg.n_channel_ids, d, padding_idx=0)
        self.time_emb = nn.Embedding(cfg.context_patches, d)  # learned, one per context patch
        self.mask_token = nn.Parameter(torch.empty(d))  # replaces a hidden patch's content
        # An always-visible key: a window whose tokens are all masked out (absent modality, all
        # channels padded) attends to it instead of to nothing, so softmax never sees an empty row.
        self.null_token = nn.Parameter(torch.empty(d))
        self.latents = nn.Parameter(torch.empty(cfg.n_latents, d))
        self.cross_blocks = nn.ModuleList(CrossBlock(cfg) for _ in range(cfg.n_cross_layers))
        self.blocks = nn.ModuleList(backbone_block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        # Decoder: token queries read the final latents; one shared block for both heads. It runs on
        # every token (about 30x more rows than the latents), so its FFN is narrow (d, not ffn_mult*d).
        self.forecast_query = nn.Parameter(torch.empty(d))  # marks a query as "the future of this channel"
        self.decoder = CrossBlock(cfg, ffn_dim=d)
        self.local = LocalBlock(cfg) if cfg.local_decoder else None
        self.spatial_filter = SpatialFilter(cfg) if cfg.local_decoder else None
        self.decoder_norm = RMSNorm(d, cfg.norm_eps)
        self.recon_head = nn.ModuleDict({m: nn.Linear(d, p) for m, p in self.patch_len.items()})
        self.forecast_head = nn.ModuleDict({m: nn.Linear(d, k * p) for m, p in self.patch_len.items()})
        # Forecast = last sample + a linear autoregression of the last AR_PATCHES context patches'
        # changes from it + the decoder's head in units of the window's own variability:
        #     last + ar(x_recent - last) + std_context * head(decoder)
        # Both paths start at zero, so an untrained model forecasts persistence and training moves
        # away only where the data pays. The change and scale parameterisation (as RevIN does) is
        # what slow signals need: a quarter second of EDA moves ~1e-3 of its normalised range, so
        # an absolute head or autoregression whose weights Adam nudges by ~lr per step adds more
        # error than the signal changes (a scalar persistence share with an absolute head lost to
        # persistence on EDA at every horizon, and to the ridge autoregression by 2x at 0.5-1 s).
        self.ar_patches = min(AR_PATCHES, cfg.context_patches)
        self.ar = nn.ModuleDict({m: nn.Linear(self.ar_patches * p, k * p) for m, p in self.patch_len.items()})
        # Contrastive projection (SimCLR): the loss acts on z, the embedding stays more general.
        self.projection = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        # Window-specific target: embedding -> each modality's log band powers (only when trained,
        # so models without it keep their parameter set).
        self.spectral_head = nn.ModuleDict({m: nn.Linear(d, spectral_bands(cfg, m)) for m in cfg.modalities}) \
            if cfg.spectral_weight > 0 else None
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter (also after `to_empty()` from the meta device).

        Linear weights are fan-in scaled (std 1/sqrt(fan_in)): inputs arrive normalised (RMSNorm,
        or per-channel normalised samples), so every projection starts with unit-scale outputs at
        any width and any patch length P_m. A fixed small std (0.02) made a patch's content and
        its position embeddings start orders of magnitude apart, and the tiny and debug models
        learned nothing general for the first hundred steps. Residual-branch outputs (wo, w2)
        are scaled down by 1/sqrt(2 * blocks), as GPT-2 does. Learned vectors (modality,
        channel and time embeddings, latents, mask/null/forecast tokens) take std `init_std`.
        """
        std = self.cfg.init_std
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        for blk in self.blocks:  # parameters of the block's own kinds (the SSM's A, D, step bias, conv)
            if hasattr(blk, "reset_parameters"):
                blk.reset_parameters()
        for p in (self.mask_token, self.null_token, self.latents, self.forecast_query,
                  *([self.local.null_key] if self.local else [])):
            nn.init.normal_(p, std=std)
        with torch.no_grad():
            for ar in self.ar.values():  # with the head at 0: persistence
                ar.weight.zero_()
        for head in self.forecast_head.values():
            nn.init.zeros_(head.weight)
        if self.spatial_filter is not None:
            nn.init.zeros_(self.spatial_filter.wq.weight)  # starts silent (see SpatialFilter)
        scale = 1 / math.sqrt(2 * (self.cfg.n_layers + self.cfg.n_cross_layers))
        with torch.no_grad():
            self.channel_emb.weight[0].zero_()  # padding id
            for blk in [*self.cross_blocks, *self.blocks, self.decoder, *([self.local] if self.local else [])]:
                for out in blk.residual_outputs():
                    out.weight.mul_(scale)

    # -- tokens ---------------------------------------------------------------------------------

    def _where(self, m: str, chan: torch.Tensor) -> torch.Tensor:
        """Modality + channel embedding: [..., d] for channel ids [...]."""
        idx = torch.full_like(chan, self.modality_index[m])
        return self.modality_emb(idx) + self.channel_emb(chan)

    def tokenize(self, m: str, x: torch.Tensor, chan: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """Context samples x [R, N * P_m] of R channel rows of modality m, their ids chan [R] -> tokens
        [R, N, d]; a hidden patch (hidden [R, N]) enters as the mask token."""
        p, n = self.patch_len[m], self.cfg.context_patches
        w = self.patch_embed[m].weight
        h = self.patch_embed[m](x.reshape(x.shape[0], n, p).to(w.dtype))  # [R, N, d]
        if hidden is not None:
            # torch.where, not arithmetic: a hidden patch's values (even NaN) cannot leak into h.
            h = torch.where(hidden[..., None], self.mask_token.to(h.dtype), h)
        return h + self._where(m, chan)[:, None] + self.time_emb.weight[None]

    # -- encoder ----------------------------------------------------------------------------------

    def encode(self, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """tokens [B, S, d]; visible [B, G, S] -> latents [B, G, L, d] (before the final norm).

        G groups of latents encode the same tokens, group g seeing only the tokens where
        visible[:, g] is True: the fused view and the per-modality views of the contrastive loss
        in ONE call of each block. The tokens' keys and values are projected once for all groups,
        the backbone runs on [B*G, L, d], and FSDP sees each block called once per forward.
        """
        b, g, s = visible.shape
        lat = self.cfg.n_latents
        ctx = torch.cat([self.null_token.to(tokens.dtype).expand(b, 1, -1), tokens], dim=1)
        mask = torch.cat([visible.new_ones(b, g, 1), visible], dim=2)  # [B, G, 1+S]
        # One mask row per latent query: [B, 1, G*L, 1+S] (a broadcast row when G = 1).
        mask = mask[:, None] if g == 1 else mask[:, None, :, None].expand(b, 1, g, lat, s + 1).reshape(b, 1, g * lat, s + 1)
        x = self.latents.to(tokens.dtype).repeat(g, 1).expand(b, -1, -1)
        for blk in self.cross_blocks:
            x = blk(x, ctx, mask)
        x = x.reshape(b * g, lat, -1)
        for blk in self.blocks:
            x = blk(x)
        return x.view(b, g, lat, -1)

    def forward(self, inputs: dict[str, SeriesInput], patch_mask: dict[str, torch.Tensor] | None = None, *,
                decode: bool = True, per_modality: bool = False) -> NeuroOutput:
        """inputs: context samples (T = N * P_m) of any subset of cfg.modalities.

        patch_mask[m]: bool [B, C, N], True = hide that patch from the encoder.
        decode=False skips the recon/forecast decoder (embedding only).
        per_modality=True also encodes each modality alone (cross-attention + backbone over the
        tokens already made) and returns their projected embeddings for the contrastive loss.

        Token-level work runs on the real channels only (`neurofm_rows.py`): a channel padded to the
        batch's widest, or of a modality absent from its window, costs nothing, and its outputs in
        recon / forecast are zeros.
        """
        unknown = sorted(set(inputs) - set(self.modality_index))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; the model knows {self.cfg.modalities}")
        mods = [m for m in self.cfg.modalities if m in inputs]  # cfg order, whatever the dict order
        if not mods:
            raise ValueError("inputs hold no modality")
        b, n = inputs[mods[0]].x.shape[0], self.cfg.context_patches
        for m in mods:
            x, chan, present = inputs[m].x, inputs[m].chan, inputs[m].present
            if x.dim() != 3 or x.shape[0] != b or chan.shape != x.shape[:2] or present.shape != (b,):
                raise ValueError(f"{m}: x {tuple(x.shape)}, chan {tuple(chan.shape)}, present {tuple(present.shape)} "
                                 f"do not fit [B, C, T], [B, C], [B] with one B={b} for every modality")
            if x.shape[2] != n * self.patch_len[m]:
                raise ValueError(f"{m}: expected {n} context patches x {self.patch_len[m]} samples = "
                                 f"{n * self.patch_len[m]} samples, got {x.shape[2]}")
        patch_mask = patch_mask or {}
        rows = find_rows([(inputs[m].chan > 0) & inputs[m].present[:, None] for m in mods])
        toks, seen = [], []
        for m, (w, c) in zip(mods, rows.parts, strict=True):
            hidden = patch_mask[m][w, c] if patch_mask.get(m) is not None else None
            toks.append(self.tokenize(m, inputs[m].x[w, c], inputs[m].chan[w, c], hidden))
            seen.append(~hidden if hidden is not None else torch.ones(w.numel(), n, dtype=torch.bool, device=w.device))
        tokens = torch.cat(toks)  # [R, N, d]

        def per_token(slots: torch.Tensor) -> torch.Tensor:  # [B, W] -> [B, W * N]
            return slots[:, :, None].expand(-1, -1, n).flatten(1)

        groups = [per_token(rows.occupied())]
        if per_modality:  # group 1 + j sees modality j's tokens only
            kind = rows.modality()
            groups += [per_token(rows.to_windows(kind == j)) for j in range(len(mods))]
        latents = self.encode(rows.to_windows(tokens).flatten(1, 2), torch.stack(groups, 1))
        # Outputs are fresh tensors, not views: FSDP's pre-backward hook on a returned view would be
        # lost to an in-place op (FSDP2 warns about it).
        fused = self.norm(latents[:, 0])
        out = NeuroOutput(latents=fused, embedding=fused.mean(1), recon={}, forecast={})
        if decode:  # the local read sees real, unhidden patches only
            out.recon, out.forecast = self._decode(inputs, mods, fused, patch_mask, rows, tokens, torch.cat(seen))
        if per_modality:
            pooled = self.norm(latents[:, 1:]).mean(2)  # [B, M, d]
            out.modality_embeddings = {m: self.projection(pooled[:, j]) for j, m in enumerate(mods)}
        if self.spectral_head is not None and decode:
            out.spectral = {m: self.spectral_head[m](out.embedding) for m in mods}
        return out

    def _decode(self, inputs: dict[str, SeriesInput], mods: list[str], latents: torch.Tensor,
                patch_mask: dict[str, torch.Tensor], rows: Rows, tokens: torch.Tensor,
                seen: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One query per context patch (recon) and one per channel (forecast) of every channel row:
        queries [R, N+1, d]; tokens [R, N, d] and seen [R, N] for the local read.

        Forecasts add a linear autoregression of the last context patches (`ar`): slow signals such
        as EDA or BOLD barely move in a second, and a decoder cannot copy a single sample exactly."""
        n, k = self.cfg.context_patches, len(self.cfg.horizon_patches)
        where = torch.cat([self._where(m, inputs[m].chan[w, c]) for m, (w, c) in zip(mods, rows.parts, strict=True)])
        where = where.to(latents.dtype)  # [R, d]
        q_recon = where[:, None] + self.time_emb.weight.to(latents.dtype)[None]  # [R, N, d]
        q_future = (where + self.forecast_query.to(latents.dtype))[:, None]  # [R, 1, d]
        # Queries attend to their own window's latents only here: keys projected once per window.
        q = self.decoder(torch.cat([q_recon, q_future], dim=1), latents, ctx_rows=rows.window)
        if self.local is not None:
            q = self.local(q, tokens.to(q.dtype), seen, rows)
        h = self.decoder_norm(q)
        recon, forecast = {}, {}
        for m, part, (w, c), valid in zip(mods, h.split(rows.sizes), rows.parts, rows.valid, strict=True):
            b, cm = inputs[m].chan.shape
            p, r = self.patch_len[m], w.numel()
            x = inputs[m].x.view(b, cm, n, p)
            if patch_mask.get(m) is not None:  # hidden samples are never read, but 0 * NaN would still be NaN
                x = torch.where(patch_mask[m][..., None], 0.0, x)
            rec = self.recon_head[m](part[:, :n])  # [R_m, N, P]
            if self.spatial_filter is not None:  # + a signed combination of this modality's other channels
                visible = valid[:, :, None]
                if patch_mask.get(m) is not None:
                    visible = visible & ~patch_mask[m]
                where_m = self._where(m, inputs[m].chan).to(part.dtype)
                rec = rec + self.spatial_filter(where_m, x, visible.expand(b, cm, n))[w, c]
            head = self.forecast_head[m]  # the Linear, with the bias added after the reshape (no view returned)
            ctx = x[w, c].flatten(1).to(part.dtype)  # [R_m, N*P], hidden samples zeroed
            last = ctx[:, -1:]
            ar = self.ar[m](ctx[:, (n - self.ar_patches) * p:] - last).view(r, k, p)
            # [R_m, 1, 1]: the window's own variability (no rows of m in this batch: nothing to reduce)
            scale = (ctx.std(-1, keepdim=True) if r else ctx.new_zeros(0, 1))[..., None] + 1e-3
            residual = F.linear(part[:, n], head.weight).view(r, k, p) + head.bias.view(k, p)
            fc = last[..., None] + ar + scale * residual
            recon[m] = rec.new_zeros(b, cm, n, p).index_put((w, c), rec)
            forecast[m] = fc.new_zeros(b, cm, k, p).index_put((w, c), fc)
        return recon, forecast

    @torch.no_grad()
    def embed(self, inputs: dict[str, SeriesInput]) -> torch.Tensor:
        """[B, d] embedding of whatever modalities are given (no masking; the model has no dropout,
        so train and eval mode agree). Goes through __call__ so that FSDP hooks run."""
        return self(inputs, decode=False).embedding


# ---------------------------------------------------------------------------------------------
# Parameter and FLOP accounting (for MFU)
# ---------------------------------------------------------------------------------------------


def param_count(model: nn.Module) -> int:
    """Total parameters (each shared tensor once; a DTensor counts its global size)."""
    return sum(p.numel() for p in model.parameters())


def neurofm_flops_per_window(cfg: NeuroFMConfig, tokens: int, *, channels: int | None = None,
                             contrastive_modalities: int | None = None) -> float:
    """Training FLOPs (forward + backward) for one window of `tokens` patch tokens.

    Convention: forward FLOPs = 2 x multiply-adds of every matmul (Linear layers and the two
    attention matmuls QK^T and AV), counted on the tokens given (callers pass the valid ones);
    training = 3 x forward (backward costs twice the forward). Norms, softmax, embeddings
    lookups and the loss are left out. `channels` (default tokens / context_patches) sets the
    number of forecast queries; the patch embedding and heads use the mean patch length.
    `contrastive_modalities` = how many per-modality views the contrastive loss encodes (default:
    all modalities of cfg when there are at least 2; pass 0 for the unimodal curriculum stage):
    each adds a group of latents to the cross-attention and one backbone pass.
    """
    d, lat, h = cfg.dim, cfg.n_latents, cfg.ffn_mult * cfg.dim
    n, k = cfg.context_patches, len(cfg.horizon_patches)
    p = sum(cfg.patch_lens) / max(1, len(cfg.patch_lens))
    ch = tokens / max(1, n) if channels is None else channels
    if contrastive_modalities is None:
        contrastive_modalities = len(cfg.modalities) if len(cfg.modalities) >= 2 else 0
    ffn = 3 * d * h  # SwiGLU multiply-adds per row
    g = 1 + contrastive_modalities  # latent groups: the fused view + one per modality
    keys = tokens + 1  # + the null key
    # Cross-attention: Q/out projections + FFN on G*L latents, K/V projections of the keys once,
    # QK^T and AV of every latent against every key (the group mask does not skip work).
    cross = g * lat * (2 * d * d + ffn) + keys * 2 * d * d + 2 * g * lat * keys * d
    backbone = g * cfg.n_layers * backbone_block_macs(cfg)
    queries = tokens + ch  # decoder: one query per context patch + one forecast query per channel
    decoder = queries * (2 * d * d + 3 * d * d) + lat * 2 * d * d + 2 * queries * lat * d
    if cfg.local_decoder:  # the local read, and the spatial filter: every patch from every other channel
        decoder += local_block_macs(cfg, queries, tokens, ch) + tokens * ch * p
    ar = ch * min(AR_PATCHES, n) * p * k * p  # the forecasts' linear autoregression
    heads = tokens * d * p + ch * d * k * p + ar + contrastive_modalities * 2 * d * d  # recon, forecast, projection
    macs = tokens * p * d + cfg.n_cross_layers * cross + backbone + decoder + heads
    return 3 * 2 * macs


def window_inputs(arrays: dict[str, Any], rows: slice) -> dict[str, SeriesInput]:
    """Rows `rows` of a global batch ({modality: arrays with numpy x, chan, present}, as the time-series
    pipeline reads them) as model inputs: only the modalities present somewhere in the batch, and only
    as many channels as the batch uses."""
    window = {}
    for m, a in arrays.items():
        if not a.present.any():
            continue
        # Channels are stored padded to the modality's max_channels (64 for EEG); keep only as many
        # as the global batch uses, so a batch of 2-electrode headbands costs 2, not 64.
        used = int(np.flatnonzero((a.chan > 0).any(0)).max()) + 1
        window[m] = SeriesInput(x=torch.from_numpy(a.x[rows, :used]), chan=torch.from_numpy(a.chan[rows, :used]),
                                present=torch.from_numpy(a.present[rows]))
    return window
