"""An untrained tiny NeuroFM export, for serving tests where only the wire format matters: two
modalities of one made-up session, described by the manifest keys an export keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import write_export
from neuraflex_ray.config import load_config, neurofm_for_data

_PATCH_S, _CONTEXT_S, _HORIZONS_S = 0.25, 2.0, [0.25, 0.5]
_RATES, _CHANNELS = {"eeg": 32.0, "ecg": 16.0}, {"eeg": ["Fp1", "C3", "Cz"], "ecg": ["II"]}
# The manifest keys a NeuroFM export keeps, as `build_series_dataset` writes them for one session.
SCRATCH_NEURO_MANIFEST: dict[str, Any] = {
    "modalities": {m: {"rate": r, "max_channels": len(_CHANNELS[m]), "patch_len": int(r * _PATCH_S),
                       "context_samples": int(r * _CONTEXT_S), "future_samples": int(r * max(_HORIZONS_S))}
                   for m, r in _RATES.items()},
    "channel_ids": {"ecg:II": 1, "eeg:C3": 2, "eeg:Cz": 3, "eeg:Fp1": 4},  # sorted "modality:channel" keys
    "n_channel_ids": 5,
    "context_s": _CONTEXT_S, "patch_s": _PATCH_S, "horizons_s": _HORIZONS_S, "hop_s": 1.0,
    "context_patches": int(_CONTEXT_S / _PATCH_S), "horizon_patches": [int(h / _PATCH_S) for h in _HORIZONS_S],
    "norm_stats": {"s1": {m: {"channels": c, "mean": [0.0] * len(c), "std": [1.0] * len(c)} for m, c in _CHANNELS.items()}},
}


def scratch_neurofm_export(out_dir: str | Path, seed: int = 0) -> Path:
    """An untrained tiny NeuroFM export for SCRATCH_NEURO_MANIFEST (EEG at 32 Hz x 3, ECG at 16 Hz x 1)."""
    from neuraflex_ray.families.neurofm import FAMILY
    from neuraflex_ray.models.neurofm import NeuroFM

    overrides = [f"model_type={FAMILY.name}", "train.strategy=fsdp", "model.flavour=tiny"]
    cfg = neurofm_for_data(load_config(None, overrides).model, SCRATCH_NEURO_MANIFEST)
    torch.manual_seed(seed)
    model = NeuroFM(cfg)  # untrained, it forecasts persistence: forecasts depend on the samples sent
    return write_export(model.state_dict(), cfg, FAMILY.name, out_dir, {"data": SCRATCH_NEURO_MANIFEST})
