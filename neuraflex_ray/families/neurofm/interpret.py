"""NeuroFM's side of interpretability (`Family.activation_*`, `spliced_losses`): activations of its own
dataset's windows, their stimulus phases as labels, and the held-out masked-reconstruction and
forecast losses for splicing.

Labels: a window's stimulus phase where its recording has a labelled protocol (`eval/probe_labels.py`),
else its set of modalities.

A unit is one window (its context part, as the model embeds it); a row is one latent token of it at
the site (`latents`: the final latent tokens, whose mean is the window embedding; `backbone_i`,
`cross_i`: a block's output).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraflex_ray.config import ConfigError

BATCH = 16
LOSS_WINDOWS = 512  # held-out windows the spliced losses score (evenly spread; all when fewer)


@functools.lru_cache(maxsize=2)
def _series(data_dir: str, split: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    from pipelines.timeseries import read_series

    if not (Path(data_dir) / "manifest.json").is_file():
        raise ConfigError(f"the export's training dataset ({data_dir!r}) is not on disk; rebuild it with "
                          f"`neuraflex-ray data --model neurofm` and the export's config")
    return read_series(data_dir, split)


def _data_dir(meta: dict[str, Any]) -> str:
    data = (meta.get("data") or {}).get("output_dir")
    if not data:
        raise ConfigError("the export's config.json names no dataset; export it again with this version")
    return data


def _rows(arrays: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    return {m: dataclasses.replace(a, x=a.x[idx], chan=a.chan[idx], present=a.present[idx]) for m, a in arrays.items()}


def activation_sites(model: Any) -> dict[str, Any]:
    return {"latents": model.norm, **{f"cross_{i}": b for i, b in enumerate(model.cross_blocks)},
            **{f"backbone_{i}": b for i, b in enumerate(model.blocks)}}


def activation_units(meta: dict[str, Any], split: str) -> int:
    return len(_series(_data_dir(meta), split)[1])


def _modality_sets(arrays: dict[str, Any], idx: np.ndarray) -> np.ndarray:
    names = sorted(arrays)
    return np.array(["+".join(m for m in names if arrays[m].present[i]) or "none" for i in idx], dtype=object)


@torch.no_grad()
def site_outputs(model: Any, sites: dict[str, Any], meta: dict[str, Any], split: str,
                 units: np.ndarray) -> dict[str, np.ndarray]:
    from neuraflex_ray.interpret.activations import recording
    from neuraflex_ray.models.neurofm import window_inputs

    arrays, _, _ = _series(_data_dir(meta), split)
    n = model.cfg.context_patches
    model.eval()
    out: dict[str, list[np.ndarray]] = {name: [] for name in sites}
    for lo in range(0, len(units), BATCH):
        inputs = {m: dataclasses.replace(w, x=w.x[..., :n * model.patch_len[m]])
                  for m, w in window_inputs(_rows(arrays, np.asarray(units[lo:lo + BATCH])), slice(None)).items()}
        with recording(sites) as seen:
            model(inputs, decode=False)
        for name, parts in seen.items():
            out[name].append(parts[0].float().reshape(-1, parts[0].shape[-1]).numpy())  # [windows * latents, d]
    return {name: np.concatenate(parts) for name, parts in out.items()}


def check_comparable(a: Path, b: Path) -> None:
    """B reads A's windows: the same modalities at the same rates and context, and every channel of A's
    dataset under the same id in B (the id picks the channel embedding)."""
    from neuraflex_ray.checkpoint import read_export_meta

    da, db = ((read_export_meta(p).get("data") or {}) for p in (a, b))
    for key in ("modalities", "context_s", "patch_s"):
        if da.get(key) != db.get(key):
            raise ConfigError(f"{b}: data.{key} {db.get(key)} differs from {a}'s {da.get(key)}; compare reads A's "
                              f"windows through both models")
    ids_b = db.get("channel_ids") or {}
    wrong = sorted(c for c, i in (da.get("channel_ids") or {}).items() if ids_b.get(c) != i)
    if wrong:
        raise ConfigError(f"{b}: channels {wrong[:3]} of {a}'s dataset have another id (or none) in B; compare "
                          f"reads A's windows through both models")


def activation_rows(model: Any, site: Any, meta: dict[str, Any], split: str, start: int, stop: int) -> dict[str, Any]:
    arrays, recordings, starts = _series(_data_dir(meta), split)
    acts = site_outputs(model, {"site": site}, meta, split, np.arange(start, stop))["site"]
    lat = len(acts) // max(stop - start, 1)
    idx = np.repeat(np.arange(start, stop), lat)
    return {"activation": acts, "block": idx.astype(np.int64),
            "position": np.tile(np.arange(lat), stop - start).astype(np.int32), "recording": recordings[idx].astype(str),
            "start_s": starts[idx].astype(np.float64), "modalities": _modality_sets(arrays, idx).astype(str)}


def activation_labels(export: Path, meta: dict[str, Any], acts: dict[str, np.ndarray]) -> Any:
    """Each row's label is its window's stimulus phase (`window_phases`: "systole: task", "fnirs_tapping:
    rest", ...), rows of windows that have none left unlabelled; where no window has one (the dataset
    holds no labelled recording), its set of modalities. Described by recording, time, modalities and
    latent."""
    from neuraflex_ray.eval.probe_labels import window_phases
    from neuraflex_ray.interpret.features import LabelledRows

    data = meta.get("data") or {}
    phases = window_phases(acts["recording"], acts["start_s"], float(data["context_s"]),
                           (data.get("data_config") or {}).get("cache_dir", ""))
    labels = phases if (phases != "").any() else np.asarray(acts["modalities"], dtype=object)
    names = tuple(sorted(set(labels.tolist()) - {""}))
    index = {k: i for i, k in enumerate(names)}

    def describe(row: int) -> dict[str, str]:
        return {"recording": str(acts["recording"][row]), "start_s": f"{float(acts['start_s'][row]):.1f}",
                "modalities": str(acts["modalities"][row]), "latent": str(int(acts["position"][row]))}

    return LabelledRows(np.asarray(acts["activation"], np.float32),
                        np.array([index.get(k, -1) for k in labels.tolist()], np.int64), names, describe)


def spliced_losses(model: Any, meta: dict[str, Any]) -> dict[str, Callable[[], float]]:
    """Held-out masked reconstruction and forecast losses (the training objectives, final curriculum
    stage, the same masks on every call), contrastive views off: they do not pass through one site."""
    from neuraflex_ray.eval.common import n_windows, subset
    from neuraflex_ray.models.neurofm import window_inputs
    from neuraflex_ray.models.neurofm_objectives import neurofm_loss

    arrays, _, _ = _series(_data_dir(meta), "val")
    idx = subset(n_windows(arrays), LOSS_WINDOWS)
    cfg = dataclasses.replace(model.cfg, contrastive_weight=0.0)
    final = max([s.start_step for s in cfg.curriculum], default=0)

    @torch.no_grad()
    def loss(name: str) -> float:
        model.eval()
        gen = torch.Generator().manual_seed(7)
        total, count = 0.0, 0
        for lo in range(0, len(idx), BATCH):
            part = idx[lo:lo + BATCH]
            out = neurofm_loss(model, window_inputs(_rows(arrays, part), slice(None)), cfg, final, gen)
            total += float(getattr(out, name)) * len(part)
            count += len(part)
        return total / max(count, 1)

    return {"recon": lambda: loss("recon"), "forecast": lambda: loss("forecast")}
