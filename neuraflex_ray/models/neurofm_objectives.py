"""NeuroFM's self-supervised objectives and curriculum: masked reconstruction, multi-horizon
forecasting and a symmetric InfoNCE between the views of one window through two modalities.

`neurofm_loss` takes FULL windows (context + future) and draws every random choice (masks, the
curriculum's modality picks) from a generator, so a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import CurriculumStage, NeuroFMConfig
from neuraflex_ray.models.neurofm import SeriesInput

PERSISTENCE_FLOOR = 1e-4  # added to persistence's MSE before dividing by it: a flat channel's is 0


@dataclass
class NeuroLoss:
    total: torch.Tensor  # what backward() sees
    recon: torch.Tensor  # MSE per sample on hidden patches (mean over modalities with targets)
    forecast: torch.Tensor  # per sample on the K horizon patches, mean over modalities: MSE / persistence's or MSE
    contrastive: torch.Tensor  # symmetric InfoNCE, mean over modality pairs (0 when off or no pair)
    variance: torch.Tensor  # how far the embedding's spread across windows falls short of the target (0 when off)
    # VICReg on each modality's projection, mean over modalities (0 when off): variance and covariance terms
    proj_variance: torch.Tensor
    proj_covariance: torch.Tensor
    spectral: torch.Tensor  # MSE of the predicted log band powers, mean over modalities (0 when off)


def active_stage(cfg: NeuroFMConfig, step: int) -> CurriculumStage:
    """The last curriculum stage with start_step <= step; multimodal when none applies."""
    stage = CurriculumStage(start_step=0, mode="multimodal")
    for s in cfg.curriculum:
        if s.start_step <= step:
            stage = s
    return stage


def contrastive_views(cfg: NeuroFMConfig, step: int, n_modalities: int) -> int:
    """How many per-modality views the contrastive loss encodes at `step` (0: the term is off). Decided
    by step, config and the batch's modality count only, never by data, so every FSDP rank agrees."""
    on = active_stage(cfg, step).keep != 1 and n_modalities >= 2 and cfg.contrastive_weight > 0
    return n_modalities if on else 0


def keep_at_most(present: dict[str, torch.Tensor], k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per window, keep k of its present modalities (a uniformly random subset; all when it has at
    most k), mark the others absent. The dict keeps every key: which heads run never depends on it."""
    mods = list(present)
    pres = torch.stack([present[m] for m in mods], 1)  # [B, M]
    scores = torch.rand(pres.shape, generator=generator, device=generator.device).to(pres.device)
    picked = scores.masked_fill(~pres, -1.0).topk(min(k, len(mods)), dim=1).indices  # [B, k]
    keep = torch.zeros_like(pres).scatter_(1, picked, True) & pres
    return {m: keep[:, j] for j, m in enumerate(mods)}


def _masked_mean(err: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of err; weights (not boolean indexing) keep every head in the graph even when
    nothing is selected, so the set of parameters with gradients never depends on the data."""
    count = weight.sum()
    return (err * weight).sum() / count.clamp_min(1), count


def _mean_over_modalities(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each modality weighs the same (64 EEG channels do not drown one ECG lead)."""
    values = torch.stack([v for v, _ in parts])
    has = torch.stack([c > 0 for _, c in parts]).to(values.dtype)
    return (values * has).sum() / has.sum().clamp_min(1)


# Per-rank copies of a tensor (no gradient) and this rank's index among them: how the training task
# lends the objective more negatives (NeuroTask in neuraflex_ray/families/neurofm/task.py); the model stays unaware of ranks.
Gather = Callable[[torch.Tensor], tuple[list[torch.Tensor], int]]


def info_nce(a: torch.Tensor, b: torch.Tensor, both: torch.Tensor, temperature: float,
             gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between rows of a and b [B, d] over the windows where `both` is True.

    With `gather`, this rank's windows are contrasted with every rank's (the others' without
    gradient, as CLIP-style training does): a micro-batch holds a handful of multimodal windows,
    too few negatives for the contrast to say much. Masked instead of indexed: no host sync and no
    data-dependent shapes. Returns (loss over this rank's windows, usable = at least 2 windows in all)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, all_b, all_both, first = a, b, both, 0
    if gather is not None:
        parts_a, rank = gather(a.detach())
        parts_b, _ = gather(b.detach())
        parts_w, _ = gather(both.float())
        parts_a[rank], parts_b[rank] = a, b  # this rank's rows keep their gradient
        all_a, all_b, all_both = torch.cat(parts_a), torch.cat(parts_b), torch.cat(parts_w) > 0.5
        first = sum(len(p) for p in parts_a[:rank])
    mine = torch.arange(len(a), device=a.device) + first  # this rank's windows in the gathered order
    # A large finite negative, not -inf: rows of windows outside `both` stay finite (weighted 0).
    pair = both[:, None] & all_both[None, :]
    rows = (a @ all_b.T / temperature).masked_fill(~pair, -1e4).log_softmax(1)  # a -> every b
    cols = (b @ all_a.T / temperature).masked_fill(~pair, -1e4).log_softmax(1)  # b -> every a
    w = both.float()
    n = w.sum()
    idx = torch.arange(len(a), device=a.device)
    row = -(rows[idx, mine] * w).sum() / n.clamp_min(1)
    col = -(cols[idx, mine] * w).sum() / n.clamp_min(1)
    return (row + col) / 2, all_both.sum() >= 2


def neurofm_loss(model: nn.Module, window: dict[str, SeriesInput], cfg: NeuroFMConfig, step: int,
                 generator: torch.Generator, gather: Gather | None = None) -> NeuroLoss:
    """Loss on FULL windows (context + future). Random choices (masks, curriculum) come from `generator`;
    `gather` (optional) lends the contrastive term the other ranks' windows as negatives (info_nce).

    Forecasting with `cfg.forecast_vs_persistence` is scored per modality as MSE / persistence's MSE
    on the same batch (1 = as good as doing nothing, < 1 beats it): in normalised units a quarter
    second of EDA or BOLD moves by ~1e-3 and EEG by ~1, so plain MSE left the slow signals' forecasts
    untrained (they lost to persistence), while the ratio weighs every modality by its own baseline.

    The set of parameters that get a gradient depends only on the keys of `window` and on `step`
    (FSDP needs the same set on every rank): every given modality is encoded and decoded even where
    `present` is all False, and the contrastive passes run or not by curriculum stage.
    """
    mods = [m for m in cfg.modalities if m in window]
    if not mods:
        raise ValueError("window holds no modality")
    n, horizons = cfg.context_patches, cfg.horizon_patches
    h_max = max(horizons)
    stage = active_stage(cfg, step)
    present = {m: window[m].present for m in mods}
    if stage.keep and len(mods) > stage.keep:
        present = keep_at_most(present, stage.keep, generator)
    n_hide = min(n - 1, max(1, round(cfg.mask_ratio * n)))
    # Half the windows (at random) are masked and train reconstruction; the other half see their
    # whole context and train forecasting, the way forecasts are made and evaluated.
    batch = window[mods[0]].x.shape[0]
    forecast_rows = (torch.rand(batch, generator=generator, device=generator.device) < 0.5).to(window[mods[0]].x.device)

    inputs, masks, ctx_patches, future, valid = {}, {}, {}, {}, {}
    p_of = {m: cfg.patch_lens[cfg.modalities.index(m)] for m in mods}
    for m in mods:
        p = p_of[m]
        w = window[m]
        b, c, t = w.x.shape
        if t != (n + h_max) * p:
            raise ValueError(f"{m}: a window holds ({n} + {h_max}) patches x {p} samples = {(n + h_max) * p}, got {t}")
        patches = w.x.reshape(b, c, n + h_max, p)
        ctx_patches[m] = patches[:, :, :n]
        future[m] = patches[:, :, [n + k - 1 for k in horizons]]  # horizon k = k-th patch after the context
        # Exactly n_hide hidden patches per channel: the rank of a uniform draw.
        r = torch.rand((b, c, n), generator=generator, device=generator.device).to(w.x.device)
        hidden = r.argsort(-1).argsort(-1) < n_hide
        if c > 1:  # and, in half the windows, one whole channel: predicting it from its neighbours
            pick = torch.randint(c, (b,), generator=generator, device=generator.device).to(w.x.device)
            coin = (torch.rand(b, generator=generator, device=generator.device) < cfg.channel_mask_prob).to(w.x.device)
            hidden = hidden | ((torch.arange(c, device=w.x.device) == pick[:, None]) & coin[:, None])[:, :, None]
        masks[m] = hidden & ~forecast_rows[:, None, None]
        valid[m] = (w.chan > 0) & present[m][:, None]  # [B, C]
        x_in = w.x[..., : n * p]
        if w.hide is not None:
            x_in = x_in.masked_fill(w.hide[..., : n * p], 0.0)
        inputs[m] = SeriesInput(x=x_in, chan=w.chan, present=present[m])

    contrastive_on = contrastive_views(cfg, step, len(mods)) > 0
    out = model(inputs, masks, per_modality=contrastive_on)

    recon_parts, forecast_parts = [], []
    for m in mods:
        err = (out.recon[m].float() - ctx_patches[m].float()).pow(2).mean(-1)  # [B, C, N]
        recon_parts.append(_masked_mean(err, (masks[m] & valid[m][:, :, None]).float()))
        err = (out.forecast[m].float() - future[m].float()).pow(2).mean(-1)  # [B, C, K]
        weight = (valid[m] & forecast_rows[:, None])[:, :, None].float().expand_as(err)
        mse, count = _masked_mean(err, weight)
        if cfg.forecast_vs_persistence:
            last = window[m].x[..., n * p_of[m] - 1].float()[:, :, None, None]  # [B, C, 1, 1], the true last sample
            persistence, _ = _masked_mean((last - future[m].float()).pow(2).mean(-1), weight)
            mse = mse / (persistence.detach() + PERSISTENCE_FLOOR)
        forecast_parts.append((mse, count))
    recon = _mean_over_modalities(recon_parts)
    forecast = _mean_over_modalities(forecast_parts)

    contrastive = recon.new_zeros(())
    if contrastive_on:
        z = out.modality_embeddings
        losses, usable = [], []
        for i, m1 in enumerate(mods):
            for m2 in mods[i + 1:]:
                loss, ok = info_nce(z[m1], z[m2], present[m1] & present[m2], cfg.contrastive_temperature, gather)
                losses.append(loss)
                usable.append(ok)
        ok = torch.stack(usable).float()
        # 0 * sum keeps every projection in the graph when no pair is usable (grads of zero, not None).
        contrastive = (torch.stack(losses) * ok).sum() / ok.sum().clamp_min(1) + 0.0 * sum(v.sum() for v in z.values())

    variance = embedding_variance(out.embedding, cfg.variance_target) if cfg.variance_weight > 0 else recon.new_zeros(())
    proj_variance, proj_covariance = recon.new_zeros(()), recon.new_zeros(())
    if contrastive_on and (cfg.vicreg_weight > 0 or cfg.vicreg_cov_weight > 0):
        terms = [vicreg_terms(out.modality_embeddings[m], present[m], cfg.variance_target, gather) for m in mods]
        proj_variance = _mean_over_modalities([(v, n) for v, _, n in terms])
        proj_covariance = _mean_over_modalities([(c, n) for _, c, n in terms])
    spectral = recon.new_zeros(())
    if out.spectral:
        parts = []
        for m in mods:
            target = window_band_power(ctx_patches[m].flatten(2), valid[m], out.spectral[m].shape[-1])
            parts.append(_masked_mean((out.spectral[m].float() - target).pow(2).mean(-1), present[m].float()))
        spectral = _mean_over_modalities(parts)
    total = (cfg.recon_weight * recon + cfg.forecast_weight * forecast + cfg.contrastive_weight * contrastive
             + cfg.variance_weight * variance + cfg.vicreg_weight * proj_variance
             + cfg.vicreg_cov_weight * proj_covariance + cfg.spectral_weight * spectral)
    return NeuroLoss(total=total, recon=recon, forecast=forecast, contrastive=contrastive, variance=variance,
                     proj_variance=proj_variance, proj_covariance=proj_covariance, spectral=spectral)


def vicreg_terms(z: torch.Tensor, rows: torch.Tensor, target: float,
                 gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of z [B, d] over the rows where `rows` is True (every
    rank's, with `gather`; the others' without gradient), and that row count. Rows are rms-normalised
    first (z / rms(z) has unit mean square), since the contrastive loss that reads z normalises it
    too: a larger scale must not meet the target. Weighted, not indexed: no data-dependent shapes."""
    z = z.float()
    z = z / z.pow(2).mean(-1, keepdim=True).add(1e-8).sqrt()
    w = rows.float()
    if gather is not None:
        parts_z, rank = gather(z.detach())
        parts_w, _ = gather(w)
        parts_z[rank] = z
        z, w = torch.cat(parts_z), torch.cat(parts_w)
    n = w.sum()
    mean = (w[:, None] * z).sum(0) / n.clamp_min(1)
    centred = (z - mean) * w[:, None]
    var = centred.pow(2).sum(0) / (n - 1).clamp_min(1)
    variance = torch.relu(target - (var + 1e-4).sqrt()).mean()
    cov = centred.T @ centred / (n - 1).clamp_min(1)
    off = cov - torch.diag(torch.diagonal(cov))
    covariance = off.pow(2).sum() / z.shape[1]
    usable = (n >= 2).float()  # one window has no spread to measure
    return variance * usable, covariance * usable, n * usable


def band_edges(n_bins: int, bands: int) -> list[int]:
    """bands + 1 increasing edges over bins 0..n_bins, log-spaced where there is room, every band
    at least one bin wide (low bands are narrow, as frequency resolution is finest there)."""
    bands = max(1, min(bands, n_bins))
    edges = [int(round(e)) for e in np.geomspace(1, n_bins + 1, bands + 1) - 1]
    edges[0], edges[-1] = 0, n_bins
    for i in range(1, bands + 1):
        edges[i] = max(edges[i], edges[i - 1] + 1)
    for i in range(bands - 1, 0, -1):
        edges[i] = min(edges[i], edges[i + 1] - 1)
    return edges


def window_band_power(x: torch.Tensor, valid: torch.Tensor, bands: int) -> torch.Tensor:
    """[B, bands] log mean power per band of x [B, C, T] (DC left out), averaged over valid channels
    ([B, C] bool): what the spectral head predicts from the window embedding."""
    power = torch.fft.rfft(x.float(), dim=-1).abs().pow(2)[..., 1:] / x.shape[-1]  # [B, C, F]
    edges = band_edges(power.shape[-1], bands)
    per_band = torch.stack([power[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:], strict=True)], -1)
    logp = torch.log(per_band + 1e-6)  # [B, C, bands]
    w = valid.float()[..., None]
    return (logp * w).sum(1) / w.sum(1).clamp_min(1)


def embedding_variance(e: torch.Tensor, target: float) -> torch.Tensor:
    """VICReg's variance term on e [B, d]: mean over dimensions of relu(target - std over the batch)
    of the rms-normalised embedding. Without it the latents stopped depending on the window (their
    spread across windows fell from 0.55 at init to 0.02 after 300 steps): the decoder's local read
    and the forecasts' autoregression need them for little, and nothing else asks them to vary."""
    e = e.float()
    e = e / e.pow(2).mean(-1, keepdim=True).add(1e-8).sqrt()
    return torch.relu(target - (e.var(0, unbiased=False) + 1e-4).sqrt()).mean()
