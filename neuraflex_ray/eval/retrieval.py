"""Cross-modal retrieval: a window embedded through modality a alone should be nearest (cosine) to
the same window embedded through modality b alone; top-k accuracy next to chance (k/n), with a
permutation test's p-value (the columns re-paired at random).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuraflex_ray.eval.common import chunks, device_of, info, make_input, to_numpy, valid_channels


def top_k(sim: np.ndarray, k: int) -> float:
    """Share of rows whose diagonal column is among their k most similar. Ties share the places they
    span (the diagonal is equally likely anywhere among the columns it ties with), so a constant
    embedding scores exactly chance, k/n, not 1."""
    diag = np.diag(sim)[:, None]
    tol = 1e-6 * np.maximum(np.abs(diag), 1.0)
    better = (sim > diag + tol).sum(1)
    ties = (np.abs(sim - diag) <= tol).sum(1)  # includes the diagonal itself
    return float(np.clip((k - better) / ties, 0.0, 1.0).mean())


def permutation_p(sims: list[np.ndarray], k: int, *, n_perm: int = 1000, seed: int = 0) -> float:
    """One-sided p-value of the mean top-k over the pairs' similarity matrices against chance: each
    permutation re-pairs every matrix's columns at random (which window of b belongs to which of a),
    as if the embeddings carried nothing about the window. (1 + count >= observed) / (1 + n_perm)."""
    def stat(mats: list[np.ndarray]) -> float:
        return float(np.mean([0.5 * (top_k(s, k) + top_k(s.T, k)) for s in mats]))

    observed = stat(sims)
    rng = np.random.default_rng(seed)
    hits = sum(stat([s[:, rng.permutation(s.shape[1])] for s in sims]) >= observed - 1e-12 for _ in range(n_perm))
    return (1 + hits) / (1 + n_perm)


def embed_modality(model, a: Any, windows: np.ndarray, m: str, ctx: int, batch_size: int, device) -> np.ndarray:
    """[W, d] L2-normalised embeddings of `windows` seen through modality m alone (NeuroFM: its projection)."""
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


def retrieval(model, val, manifest, idx_val, batch_size, ks: tuple[int, ...] = (1, 5)) -> dict[int, dict]:
    """{k: {"model", "chance", "pairs", ...}}: top-k of every modality pair that co-occurs in >= 2 val
    windows, each direction (a->b, b->a) averaged, pairs pooled by their mean."""
    mods = [m for m in manifest["modalities"] if m in val]
    has = {m: valid_channels(val[m], idx_val).any(1) for m in mods}
    pairs = []
    device = device_of(model)
    for i, a in enumerate(mods):
        for b in mods[i + 1:]:
            windows = idx_val[has[a] & has[b]]
            if len(windows) < 2:
                continue
            ea = embed_modality(model, val[a], windows, a, info(manifest, a)[1], batch_size, device)
            eb = embed_modality(model, val[b], windows, b, info(manifest, b)[1], batch_size, device)
            sim = ea @ eb.T
            n = len(windows)
            pairs.append({"a": a, "b": b, "n": n, "sim": sim,
                          **{k: {"model": 0.5 * (top_k(sim, k) + top_k(sim.T, k)), "chance": min(k, n) / n,
                                 "p_value": permutation_p([sim], k)} for k in ks}})
    out = {}
    for k in ks:
        if not pairs:
            out[k] = {"model": None, "chance": None, "pairs": [], "reason": "no two modalities co-occur in >= 2 val windows"}
            continue
        per_pair = [{"a": p["a"], "b": p["b"], "n": p["n"], **p[k]} for p in pairs]
        out[k] = {"model": float(np.mean([p["model"] for p in per_pair])),
                  "chance": float(np.mean([p["chance"] for p in per_pair])),
                  "p_value": permutation_p([p["sim"] for p in pairs], k), "pairs": per_pair,
                  "pooling": f"mean over pairs (each pair weighs the same); top-{k} averages a->b and b->a"}
    return out
