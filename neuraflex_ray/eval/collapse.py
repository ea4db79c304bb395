"""How collapsed a NeuroFM's embeddings are on held-out windows (the measures: eval/embedding_stats.py).

- fused: the window embedding the probes read (`NeuroFM.embed` over every modality the window has);
- per modality: the projection retrieval compares (the window seen through that modality alone,
  L2-normalised as retrieval's cosine sees it), over the held-out windows where the modality is present.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from neuraflex_ray.eval.common import chunks, device_of, info, make_input, to_numpy
from neuraflex_ray.eval.embedding_stats import effective_rank, spread
from neuraflex_ray.eval.retrieval import embed_modality


def fused_embeddings(model: torch.nn.Module, val: dict[str, Any], manifest: dict, idx: np.ndarray,
                     batch_size: int) -> np.ndarray:
    """[W, d] window embeddings of the held-out windows `idx`, every present modality's context together."""
    device, out = device_of(model), []
    for batch in chunks(idx, batch_size):
        inputs = {m: make_input(np.asarray(a.x[batch])[:, :, :info(manifest, m)[1]], np.asarray(a.chan)[batch],
                                np.asarray(a.present)[batch], device) for m, a in val.items()}
        out.append(to_numpy(model.embed(inputs)))
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def embedding_collapse(model: torch.nn.Module, val: dict[str, Any], manifest: dict, idx: np.ndarray,
                       batch_size: int) -> dict[str, Any]:
    """{"width", "fused": {"spread", "effective_rank", "windows"}, "spread": {m: s}, "effective_rank":
    {m: r}, "windows": {m: n}} on the held-out windows `idx`."""
    fused = fused_embeddings(model, val, manifest, idx, batch_size)
    out: dict[str, Any] = {"width": int(fused.shape[1]),
                           "fused": {"spread": spread(fused), "effective_rank": effective_rank(fused),
                                     "windows": len(fused)},
                           "spread": {}, "effective_rank": {}, "windows": {}}
    for m, a in val.items():
        rows = idx[np.asarray(a.present)[idx]]
        z = embed_modality(model, a, rows, m, info(manifest, m)[1], batch_size, device_of(model)) if len(rows) \
            else np.zeros((0, fused.shape[1]))
        out["spread"][m], out["effective_rank"][m], out["windows"][m] = spread(z), effective_rank(z), len(rows)
    return out
