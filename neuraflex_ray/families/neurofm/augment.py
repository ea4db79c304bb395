"""Training-time augmentations of NeuroFM windows (config: `data.augment`, `AugmentConfig` in
`neuraflex_ray/config/series.py`), applied by `NeuroTask.step` on training micro-batches only.

They act on one micro-batch window {modality: SeriesInput} of FULL windows (context + future), so
one change reaches the encoder's input and the loss targets alike, in this order:

1. time warp: each window is resampled by a random speed factor r in [1 - w, 1 + w], the same for
   every modality and channel, with linear interpolation between samples;
2. modality dropout: present modalities are marked absent (and zeroed), never all of a window's;
3. Gaussian noise on the samples of valid channels of present modalities (the loss has one x for
   input and targets, so the targets are the noisy samples too: a perturbed window, not denoising);
4. time masking: one span of seconds, the same times in every modality, goes into SeriesInput.hide,
   which `neurofm_loss` (`neuraflex_ray/models/neurofm_objectives.py`) zeroes in the encoder's input
   only: reconstruction and forecast targets keep the true samples.

Warp edge rule (sample i of a modality at rate f stands for time i / f; T samples span T / f = the
window's length, the same for every modality): the warped window reads the original at
tau(t) = t_end - (t_end - t) * r, so the END of the window stays where it is and every modality is
warped about the same instant. A slow-down (r < 1) reads a part of the window, ending at its end: no
sample is invented (only the last sample holds for less than one sample period). A speed-up (r > 1)
would need samples before the window starts: those positions take the window's first sample, so
the invented (repeated) samples lie only at the window's start, over at most w / (1 + w) of it;
validation (w <= 0.5, and that share inside the context) keeps them out of the forecast targets.

Not part of the dataset: nothing here changes the Parquet shards or the build's fingerprint.

Rules the training loop relies on:
- every random draw comes from the given generator (NeuroTask.generator(step): seeded by seed,
  step and rank), and how many draws are made depends on the config and the shapes only, never on
  the data, so a resumed run draws the same augmentations and the same loss masks after them;
- the dict's keys never change (FSDP2 needs the same parameters to get gradients on every rank:
  `neurofm_loss` encodes every given modality); only x, present and hide do;
- padding channels (chan == 0) and absent modalities stay zero; shapes, dtypes and chan are kept;
- all off returns the window itself, without drawing anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from neuraflex_ray.config import AugmentConfig
from neuraflex_ray.models.neurofm import SeriesInput

Window = dict[str, SeriesInput]


def augment_window(window: Window, cfg: AugmentConfig, manifest: dict[str, Any], generator: torch.Generator) -> Window:
    """The augmented window (new SeriesInputs; the given tensors are not modified).

    manifest: the dataset manifest; each modality's sampling rate (manifest["modalities"][m]["rate"])
    and the context length (manifest["context_s"]) place the time mask in seconds.
    """
    if not cfg.enabled or not window:
        return window
    if cfg.time_warp > 0:
        window = time_warp(window, cfg.time_warp, generator)
    if cfg.modality_dropout > 0:
        window = drop_modalities(window, cfg.modality_dropout, generator)
    if cfg.noise_std > 0:
        window = add_noise(window, cfg.noise_std, generator)
    if cfg.time_mask_prob > 0 and cfg.time_mask_s > 0:
        rates = {m: float(manifest["modalities"][m]["rate"]) for m in window}
        window = mask_time(window, cfg.time_mask_prob, cfg.time_mask_s, float(manifest["context_s"]), rates, generator)
    return window


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
          dtype: torch.dtype = torch.float32, normal: bool = False) -> torch.Tensor:
    """Draw on the generator's device (the task's generator is a CPU one), then move to the data's."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _batch(window: Window) -> tuple[int, torch.device]:
    first = next(iter(window.values())).x
    return first.shape[0], first.device


def time_warp(window: Window, max_change: float, generator: torch.Generator) -> Window:
    """Resample every window by one random speed factor r in [1 - max_change, 1 + max_change],
    anchored at the window's end (see the module docstring for the edge rule)."""
    b, device = _batch(window)
    r = 1.0 + max_change * (2.0 * _rand((b,), generator, device) - 1.0)  # [B]
    return {m: dataclasses.replace(w, x=_resample(w.x, r)) for m, w in window.items()}


def _resample(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [B, C, T] read at sample positions T - (T - i) * r[b], clamped to the window, linearly interpolated."""
    b, c, t = x.shape
    i = torch.arange(t, device=x.device, dtype=torch.float32)
    pos = (t - (t - i)[None] * r[:, None]).clamp(0, t - 1)  # [B, T]
    lo = pos.floor().long().clamp(max=t - 1)
    hi = (lo + 1).clamp(max=t - 1)
    frac = (pos - lo)[:, None]  # [B, 1, T]
    xf = x.float()
    left = xf.gather(2, lo[:, None].expand(b, c, t))
    right = xf.gather(2, hi[:, None].expand(b, c, t))
    # Zeros (padding channels, absent modalities) interpolate to zeros.
    return (left + (right - left) * frac).to(x.dtype)


def drop_modalities(window: Window, p: float, generator: torch.Generator) -> Window:
    """Each present modality of a window with >= 2 present ones is dropped with probability p; when
    a window would lose all of them, the one with the highest draw stays. Dropped = present False and
    zero samples; the key stays (FSDP: see the module docstring)."""
    mods = list(window)
    b, device = _batch(window)
    present = torch.stack([window[m].present for m in mods], 1)  # [B, M]
    u = _rand((b, len(mods)), generator, device)
    drop = present & (u < p)
    none_left = ~(present & ~drop).any(1)  # also true for a window with one present modality, dropped
    keeper = u.masked_fill(~present, -1.0).argmax(1)  # a uniform pick among the present ones
    drop &= ~(none_left[:, None] & (torch.arange(len(mods), device=device) == keeper[:, None]))
    out = {}
    for j, m in enumerate(mods):
        w, gone = window[m], drop[:, j]
        out[m] = dataclasses.replace(w, x=w.x.masked_fill(gone[:, None, None], 0.0), present=w.present & ~gone)
    return out


def add_noise(window: Window, std: float, generator: torch.Generator) -> Window:
    """x + N(0, std^2) on valid channels of present modalities (the signal is per-channel normalised,
    so std is relative to each channel's training spread); padding and absent modalities stay zero."""
    out = {}
    for m, w in window.items():
        noise = std * _rand(tuple(w.x.shape), generator, w.x.device, normal=True)
        valid = (w.chan > 0) & w.present[:, None]  # [B, C]
        out[m] = dataclasses.replace(w, x=w.x + noise.masked_fill(~valid[..., None], 0.0).to(w.x.dtype))
    return out


def mask_time(window: Window, prob: float, span_s: float, context_s: float, rates: dict[str, float],
              generator: torch.Generator) -> Window:
    """With probability `prob` per window, hide one span [start, start + span_s) seconds inside the
    context from the encoder, in every channel of every modality: a sample i at rate f is hidden when
    its time i / f falls in the span, so modalities of different rates hide the same seconds."""
    b, device = _batch(window)
    coin = _rand((b,), generator, device) < prob
    # float64: a sample time that lies on the span's edge is judged the same way in every modality.
    start = _rand((b,), generator, device, torch.float64) * (context_s - span_s)
    out = {}
    for m, w in window.items():
        t = torch.arange(w.x.shape[2], device=device, dtype=torch.float64) / rates[m]
        span = coin[:, None] & (t[None] >= start[:, None]) & (t[None] < start[:, None] + span_s)  # [B, T]
        hide = span[:, None].expand(w.x.shape)
        out[m] = dataclasses.replace(w, hide=hide if w.hide is None else w.hide | hide)
    return out
