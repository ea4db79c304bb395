"""Cross-modal retrieval: a window embedded through modality a alone should be nearest (cosine) to
the same window embedded through modality b alone; top-k accuracy next to chance (k/n).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuraflex_ray.eval.common import chunks, device_of, info, make_input, to_numpy, valid_channels


def _top1(sim: np.ndarray) -> float:
    """Share of rows whose best column is the diagonal; ties share the hit (a constant embedding scores 1/n, not 1)."""
    best = sim.max(1, keepdims=True)
    ties = sim >= best - 1e-6 * np.maximum(np.abs(best), 1.0)
    hit = np.diag(ties) / ties.sum(1)
    return float(hit.mean())


def _embed(model, a: Any, windows: np.ndarray, m: str, ctx: int, batch_size: int, device) -> np.ndarray:
    out = []
    for batch in chunks(windows, batch_size):
        x = np.asarray(a.x[batch])[:, :, :ctx]
        inputs = {m: make_input(x, np.asarray(a.chan)[batch], np.ones(len(batch), bool), device)}
        if hasattr(model, "projection"):  # NeuroFM: the projected space the contrastive loss aligned
            out.append(to_numpy(model(inputs, decode=False, per_modality=True).modality_embeddings[m]))
        else:
            out.append(to_numpy(model.embed(inputs)))
    e = np.concatenate(out).astype(np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def retrieval(model, val, manifest, idx_val, batch_size) -> dict:
    mods = [m for m in manifest["modalities"] if m in val]
    has = {m: valid_channels(val[m], idx_val).any(1) for m in mods}
    pairs = []
    device = device_of(model)
    for i, a in enumerate(mods):
        for b in mods[i + 1:]:
            windows = idx_val[has[a] & has[b]]
            if len(windows) < 2:
                continue
            ea = _embed(model, val[a], windows, a, info(manifest, a)[1], batch_size, device)
            eb = _embed(model, val[b], windows, b, info(manifest, b)[1], batch_size, device)
            sim = ea @ eb.T
            top1 = 0.5 * (_top1(sim) + _top1(sim.T))
            pairs.append({"a": a, "b": b, "n": len(windows), "model": top1, "chance": 1.0 / len(windows)})
    if not pairs:
        return {"model": None, "chance": None, "pairs": [], "reason": "no two modalities co-occur in >= 2 val windows"}
    return {"model": float(np.mean([p["model"] for p in pairs])), "chance": float(np.mean([p["chance"] for p in pairs])),
            "pairs": pairs, "pooling": "mean over pairs (each pair weighs the same); top-1 averages a->b and b->a"}
