"""What every NeuroFM evaluation shares: window arrays in, model inputs out, JSON-ready numbers.

Inputs are duck-typed: an arrays dict maps modality -> an object with `x` float32 [W, C, T] (context
+ future samples), `chan` int [W, C] (0 = padding) and `present` bool [W]
(pipelines.timeseries.SeriesArrays).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from neuraflex_ray.models.neurofm import SeriesInput


def n_windows(arrays: dict[str, Any]) -> int:
    counts = {m: len(a.present) for m, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"every modality must hold the same windows (rows); got counts {counts}")
    return next(iter(counts.values()), 0)


def subset(n: int, limit: int | None) -> np.ndarray:
    """Window indices 0..n-1, or `limit` of them evenly spread (so every recording keeps its share)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def chunks(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(idx), size):
        yield idx[lo:lo + size]


def valid_channels(a: Any, idx: np.ndarray) -> np.ndarray:
    """[B, C] True where the modality is present in the window and the channel slot is not padding."""
    return np.asarray(a.present)[idx][:, None] & (np.asarray(a.chan)[idx] > 0)


def info(manifest: dict, m: str) -> tuple[int, int]:
    """(P samples per patch, context samples) of modality m."""
    n_ctx = int(manifest["context_patches"])
    p = int(manifest["modalities"][m]["patch_len"])
    return p, n_ctx * p


def device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_input(x: np.ndarray, chan: np.ndarray, present: np.ndarray, device: torch.device) -> SeriesInput:
    return SeriesInput(x=torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device),
                       chan=torch.as_tensor(np.asarray(chan, dtype=np.int64), device=device),
                       present=torch.as_tensor(np.asarray(present, dtype=bool), device=device))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def skill(mse: float | None, base: float | None) -> float | None:
    """1 - mse / mse_baseline: > 0 beats the baseline."""
    if mse is None or base is None or base <= 0:
        return None
    return 1.0 - mse / base


def plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, so the result is JSON-ready."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj
