"""NeuroFM's config checks: the model section, its curriculum, and the time-series data section."""

from __future__ import annotations

import math

from neuraflex_ray.config import CURRICULUM_MODES, JobConfig, NeuroFMConfig
from neuraflex_ray.config.validate import need
from pipelines.hard_negatives import MAX_GAP_S, MIN_GAP_S
from pipelines.neuro_samples import SAMPLE_SETS


def validate_neurofm(cfg: JobConfig, world: int) -> None:
    """NeuroFM's model and time-series data sections."""
    m, d = cfg.model, cfg.data
    for name in ("dim", "n_heads", "n_latents", "n_cross_layers", "n_layers", "ffn_mult"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    need(m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    backbones = ("transformer", "ssm")
    need(m.backbone in backbones, f"model.backbone={m.backbone!r} is not known; use one of {list(backbones)}")
    for name in ("ssm_state", "ssm_expand", "ssm_conv"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)}); "
                                   f"the default is {getattr(NeuroFMConfig, name)}")
    need(0.0 < m.mask_ratio < 1.0, f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    need(0.0 <= m.channel_mask_prob <= 1.0, f"model.channel_mask_prob must be in [0, 1], got {m.channel_mask_prob}")
    for name in ("recon_weight", "forecast_weight", "contrastive_weight", "variance_weight", "variance_target",
                 "vicreg_weight", "vicreg_cov_weight", "spectral_weight"):
        need(getattr(m, name) >= 0, f"model.{name} must be >= 0 (got {getattr(m, name)})")
    need(m.spectral_bands >= 1, f"model.spectral_bands must be >= 1 (got {m.spectral_bands})")
    need(m.recon_weight + m.forecast_weight + m.contrastive_weight > 0,
         "model.recon_weight, model.forecast_weight and model.contrastive_weight are all 0: nothing to train")
    need(m.contrastive_temperature > 0, f"model.contrastive_temperature must be > 0 (got {m.contrastive_temperature})")
    for i, s in enumerate(m.curriculum):
        need(s.mode in CURRICULUM_MODES, f"model.curriculum[{i}].mode={s.mode!r}: use one of {list(CURRICULUM_MODES)}")
    starts = [s.start_step for s in m.curriculum]
    need(starts == sorted(starts) and len(set(starts)) == len(starts),
         f"model.curriculum: stages must have increasing start_step (got {starts})")

    need(d.samples or d.recordings, "data.samples and data.recordings are both empty: name sample sets or add recordings")
    for s in d.samples:
        need(s in SAMPLE_SETS, f"data.samples: unknown sample set {s!r}; choose from {list(SAMPLE_SETS)}")
    for name in ("context_s", "hop_s", "patch_s"):
        need(getattr(d, name) > 0, f"data.{name} must be > 0 (got {getattr(d, name)})")
    need(d.horizons_s and all(h > 0 for h in d.horizons_s), f"data.horizons_s must be positive lead times (got {d.horizons_s})")
    for name, x in [("context_s", d.context_s)] + [(f"horizons_s[{i}]", h) for i, h in enumerate(d.horizons_s)]:
        need(_whole(x / d.patch_s), f"data.{name}={x} is not a whole number of patches of data.patch_s={d.patch_s}")
    for name, mod in d.modalities.items():
        need(mod.rate > 0, f"data.modalities.{name}.rate must be > 0 Hz (got {mod.rate})")
        need(mod.max_channels > 0, f"data.modalities.{name}.max_channels must be > 0 (got {mod.max_channels})")
        need(_whole(mod.rate * d.patch_s) and mod.rate * d.patch_s >= 1,
             f"data.modalities.{name}.rate={mod.rate} Hz x data.patch_s={d.patch_s} s is not a whole number of "
             f"samples per patch; pick a rate that is a multiple of {1 / d.patch_s:g} Hz")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.reject_abs_z >= 0, f"data.reject_abs_z must be >= 0 (0: no artifact rejection), got {d.reject_abs_z}")
    need(d.on_bad_input in ("error", "skip"), f"data.on_bad_input={d.on_bad_input!r}: use error or skip")
    for i, r in enumerate(d.recordings):
        need(bool(r.path), f"data.recordings[{i}].path is empty: give the file's path")
        need(r.modality in d.modalities,
             f"data.recordings[{i}].modality={r.modality!r} is not one of data.modalities {sorted(d.modalities)}")
        need(r.rate >= 0, f"data.recordings[{i}].rate must be >= 0 (0: from the file), got {r.rate}")
        if r.align_to:
            same = [o for o in d.recordings if o.path == r.align_to and o.session == r.session and o is not r
                    and o.modality == r.modality]
            need(bool(same), f"data.recordings[{i}].align_to={r.align_to!r} is not the path of another "
                             f"{r.modality!r} recording with session {r.session!r}; cross-correlation needs the same "
                             f"signal seen by both devices: name such a file of the same session")
    need(_whole(d.hop_s / d.patch_s), f"data.hop_s={d.hop_s} is not a whole number of patches of data.patch_s={d.patch_s}")
    if d.hard_negatives:
        stride = math.ceil(MIN_GAP_S / d.hop_s - 1e-9) * d.hop_s
        longest = 1 + int(MAX_GAP_S // stride + 1e-9)  # neighbours stride apart, the farthest within MAX_GAP_S
        need(2 <= d.hard_negatives <= longest,
             f"data.hard_negatives={d.hard_negatives}: use 0 (off) or 2..{longest} windows per run (with "
             f"data.hop_s={d.hop_s}, neighbours are {stride:g} s apart and a run must span <= {MAX_GAP_S:g} s)")
        need(not d.batch_by_modality, "data.hard_negatives and data.batch_by_modality both regroup training "
                                      "windows; turn one off")
        need(cfg.train.micro_batch_size % d.hard_negatives == 0,
             f"train.micro_batch_size={cfg.train.micro_batch_size} is not a multiple of data.hard_negatives="
             f"{d.hard_negatives}: a run of neighbours must land whole in one rank's micro-batch")
    # data.augment: written as `lo <= x <= hi` so that NaN (YAML .nan) fails too.
    a = d.augment
    need(0.0 <= a.modality_dropout < 1.0,
         f"data.augment.modality_dropout must be in [0, 1) (got {a.modality_dropout}); 0 turns it off")
    need(0.0 <= a.noise_std < math.inf, f"data.augment.noise_std must be a finite value >= 0 (got {a.noise_std}); 0 turns it off")
    need(0.0 <= a.time_mask_prob <= 1.0,
         f"data.augment.time_mask_prob must be in [0, 1] (got {a.time_mask_prob}); 0 turns it off")
    need(0.0 <= a.time_mask_s < math.inf, f"data.augment.time_mask_s must be a finite value >= 0 seconds (got {a.time_mask_s})")
    if a.time_mask_prob > 0:
        need(0.0 < a.time_mask_s < d.context_s,
             f"data.augment.time_mask_s={a.time_mask_s} must be in (0, data.context_s={d.context_s}) seconds when "
             f"data.augment.time_mask_prob > 0: the span is hidden inside the context")
    need(0.0 <= a.time_warp <= 0.5,
         f"data.augment.time_warp must be in [0, 0.5] (got {a.time_warp}): a speed-up by 1 + time_warp repeats the "
         f"first sample over the first time_warp / (1 + time_warp) of the window; 0 turns it off")
    window_s, repeated = d.context_s + max(d.horizons_s), a.time_warp / (1 + a.time_warp)
    need(repeated < d.context_s / window_s,
         f"data.augment.time_warp={a.time_warp}: a speed-up would repeat the first sample over {repeated:.0%} of the "
         f"window, past the context (data.context_s={d.context_s} of {window_s:g} s) into the forecast targets; "
         f"lower data.augment.time_warp below {d.context_s / (window_s - d.context_s):.3g}")


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-6
