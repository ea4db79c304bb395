"""Held-out bits/byte of an LM export with retrieval memories attached (kNN-LM), beside the export alone.

Each datastore's corpus has held-out documents (its own split's validation side; for the export's
own corpus, the documents the export never trained on). They are split by document into a fitting
half, on which the gates (λ, temperature, the adaptive slope) are fitted, and a reported half, on
which every figure is given with a per-document bootstrap interval. Near-copies flatter a datastore
(the stdlib's `encodings/cp*.py`, repeated KJV verses), so the reported half is also scored on its
documents whose 8-grams the datastore mostly lacks.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from neuraflex_ray.eval.bootstrap import ratio_interval
from neuraflex_ray.memory.fit import StoreRows, fit_cross_gates, fit_gates, mixed_target_log_probs
from neuraflex_ray.memory.heldout import HeldOut, document_halves, held_out, text_dir
from neuraflex_ray.memory.store import Datastore, Neighbours

NGRAM = 8
LOW_OVERLAP = 0.2  # a document is "little overlapping" when at most this share of its 8-grams is in the datastore


def ngram_hashes(blocks: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """uint64 [rows, L - 1]: a hash of the n-gram ending at each predicted position (0 where the block
    holds fewer than n tokens up to it)."""
    b = np.asarray(blocks, dtype=np.uint64)
    out = np.zeros((b.shape[0], b.shape[1] - 1), np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros((b.shape[0], b.shape[1] - n + 1), np.uint64)
        for i in range(n):
            h = h * np.uint64(1_000_003) + b[:, i:b.shape[1] - n + 1 + i] + np.uint64(1)
    out[:, n - 2:] = h  # the n-gram of tokens [t - n + 2, t + 1] ends at predicted position t
    return out


def seen_in_store(h: HeldOut, store: Datastore) -> np.ndarray:
    """float64 [q]: 1 if the 8-gram ending at each held-out target occurs in the datastore's text, 0 if not,
    NaN where the block holds fewer than 8 tokens up to it."""
    from pipelines.text import load_text_datasets, read_blocks

    train_ds, _, _ = load_text_datasets(str(text_dir(store)))
    seen_grams = np.unique(ngram_hashes(read_blocks(train_ds)))
    grams = ngram_hashes(h.val).reshape(-1)
    return np.where(grams == 0, np.nan, np.isin(grams, seen_grams).astype(np.float64))


def bpb(log_probs: np.ndarray, docs: np.ndarray, bytes_per_token: float) -> dict[str, Any]:
    """Bits/byte of log-probs (nats) with its per-document 95 % bootstrap interval."""
    bits = -np.asarray(log_probs) / math.log(2)
    den = np.full(len(bits), bytes_per_token)
    lo, hi = ratio_interval(bits, den, docs)
    return {"bpb": float(bits.sum() / den.sum()), "ci95": [lo, hi]}


def gain_interval(log_probs: np.ndarray, base: np.ndarray, docs: np.ndarray, bytes_per_token: float) -> tuple[float, float]:
    """95 % interval of bits/byte(log_probs) - bits/byte(base) over the same positions, documents resampled."""
    diff = (np.asarray(base) - np.asarray(log_probs)) / math.log(2)
    return ratio_interval(diff, np.full(len(diff), bytes_per_token), docs)


def evaluate_with_datastores(export_dir: str | Path, datastores: dict[str, str | Path], *, index: str = "flat",
                             seed: int = 0, **search: Any) -> dict[str, Any]:
    """{"domains": {name: figures on its corpus's reported half}, "mixed_delta": {name: with every store
    attached minus the best with only its own}, "gates": ...}. With several stores, "mixed" is every store
    attached with gates that read every store's nearest distance (memory/fit.py CrossGates);
    "mixed_own_distance" the same with each gate reading only its own store's distance."""
    from neuraflex_ray.checkpoint import load_exported

    model, _ = load_exported(export_dir)
    stores = {name: Datastore(path, index, export_dir=export_dir, **search) for name, path in datastores.items()}
    names = list(stores)
    data = {name: held_out(model, s) for name, s in stores.items()}
    rows = {d: [StoreRows.of(stores[s].search(data[d].keys, per_row=False), data[d].targets) for s in names]
            for d in names}
    halves = {d: document_halves(data[d].docs, seed) for d in names}
    own = {d: {kind: fit_gates(data[d].lm_target[halves[d][0]], [rows[d][i].take(halves[d][0])], kind == "adaptive")[0]
               for kind in ("fixed", "adaptive")} for i, d in enumerate(names)}
    joint = cross = None
    if len(names) > 1:  # every store attached, gates fitted on every domain's fitting half at once
        fit_lm = np.concatenate([data[d].lm_target[halves[d][0]] for d in names])
        fit_rows = [_concat([rows[d][i].take(halves[d][0]) for d in names]) for i in range(len(names))]
        joint = fit_gates(fit_lm, fit_rows, adaptive=True)
        # Each store's gate may also read the other stores' distances, starting from the gates above.
        cross = fit_cross_gates(fit_lm, fit_rows, joint)
    out: dict[str, Any] = {"index": index, "k": stores[names[0]].k, "domains": {}, "gates": {}}
    for i, d in enumerate(names):
        h, rep = data[d], halves[d][1]
        low = rep & _low_overlap_docs(h.docs, seen_in_store(h, stores[d]))
        mine = [rows[d][i].take(rep)]
        scores = {"base": h.lm_target[rep],
                  "knn": mixed_target_log_probs(h.lm_target[rep], mine, [own[d]["fixed"]]),
                  "knn_adaptive": mixed_target_log_probs(h.lm_target[rep], mine, [own[d]["adaptive"]])}
        if joint is not None:
            attached = [r.take(rep) for r in rows[d]]
            scores["mixed_own_distance"] = mixed_target_log_probs(h.lm_target[rep], attached, joint)
            scores["mixed"] = cross.target_log_probs(h.lm_target[rep], attached)
        fig = {k: bpb(v, h.docs[rep], h.bytes_per_token) for k, v in scores.items()}
        for k, v in scores.items():  # the gain over the export alone, its interval paired by document
            if k != "base":
                fig[k]["minus_base_ci95"] = list(gain_interval(v, scores["base"], h.docs[rep], h.bytes_per_token))
        lows = None
        if _docs(low, h.docs) >= 2:
            lows = {k: bpb(v[low[rep]], h.docs[low], h.bytes_per_token) for k, v in scores.items()}
        out["domains"][d] = {**fig, "low_overlap": lows, "documents": {"fit": _docs(halves[d][0], h.docs),
                                                                       "report": _docs(rep, h.docs),
                                                                       "low_overlap": _docs(low, h.docs)},
                             "positions": int(rep.sum()), "corpus": stores[d].manifest["corpus"]}
        out["gates"][d] = {k: g.as_dict() for k, g in own[d].items()}
    if joint is not None:
        out["gates"]["joint"] = {n: g.as_dict() for n, g in zip(names, joint, strict=True)}
        out["gates"]["cross"] = {"stores": names, **dataclasses.asdict(cross)}
        out["mixed_delta"] = {d: out["domains"][d]["mixed"]["bpb"] - min(out["domains"][d]["knn"]["bpb"],
                                                                          out["domains"][d]["knn_adaptive"]["bpb"])
                              for d in names}
    return out


def _docs(mask: np.ndarray, docs: np.ndarray) -> int:
    return len(np.unique(docs[mask]))


def _low_overlap_docs(docs: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """bool [q]: positions of documents whose known 8-grams lie in the datastore at most LOW_OVERLAP of the time."""
    ids, inv = np.unique(docs, return_inverse=True)
    known = ~np.isnan(seen)
    share = np.bincount(inv[known], weights=seen[known], minlength=len(ids)) / np.maximum(
        np.bincount(inv[known], minlength=len(ids)), 1)
    return share[inv] <= LOW_OVERLAP


def _concat(parts: list[StoreRows]) -> StoreRows:
    fields = ("dist", "values", "counts")
    return StoreRows(Neighbours(*(np.concatenate([getattr(p.neighbours, f) for p in parts]) for f in fields)),
                     np.concatenate([p.match for p in parts]))

