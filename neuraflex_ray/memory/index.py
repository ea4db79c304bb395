"""FAISS indexes of a datastore's keys, built from per-shard parts so the build spreads over a cluster.

- `flat`: exact search (IndexFlatL2); each shard's keys are a part (a Ray task), merged in shard order.
- `ivfpq`: compressed (IVF cells of product-quantized codes, pq_m bytes per key at 8 bits): the
  quantizers are trained once on a sample, each shard is encoded by a Ray task, the parts merged.
- `hnsw`: a graph (IndexHNSWFlat: each entry linked to its nearest neighbours, the "knowledge graph").
  A graph cannot be merged from parts, so it is grown in the driver shard by shard.
Every index numbers the kept entries 0..n-1 in shard order, so one `values` array serves all three.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
import ray

from neuraflex_ray.config import ConfigError
from neuraflex_ray.memory.config import DatastoreConfig
from neuraflex_ray.memory.keys import read_keys

PQ_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per centroid


def ivf_nlist(n: int, cfg: DatastoreConfig) -> int:
    if cfg.ivf_nlist:
        return min(cfg.ivf_nlist, n)
    return max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // PQ_POINTS_PER_CENTROID))


def check_key_width(width: int, cfg: DatastoreConfig) -> None:
    """PQ splits a key into pq_m equal parts: refused (naming the fix) before any encoding starts."""
    if width % cfg.pq_m:
        raise ConfigError(f"datastore pq_m={cfg.pq_m} must divide the key width {width}; pick a divisor, e.g. "
                          f"pq_m={math.gcd(width, 16)}")


def trained_ivfpq(sample: np.ndarray, n: int, cfg: DatastoreConfig) -> faiss.Index:
    """An empty IVF-PQ index whose coarse and product quantizers are trained on `sample`."""
    width = sample.shape[1]
    check_key_width(width, cfg)
    bits = min(cfg.pq_bits, int(math.log2(max(2, len(sample)))))  # a tiny store cannot train 256 centroids
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(width), width, ivf_nlist(n, cfg), cfg.pq_m, bits)
    index.train(sample)
    return index


def _part(empty: np.ndarray, path: str, keep: np.ndarray, first_id: int) -> np.ndarray:
    """One shard's kept keys added to a copy of the trained empty index; the part, serialized."""
    index = faiss.deserialize_index(empty)
    keys = read_keys(path)["key"][keep]
    if isinstance(index, faiss.IndexIVF):
        index.add_with_ids(keys, first_id + np.arange(len(keys), dtype=np.int64))
    else:
        index.add(keys)
    return faiss.serialize_index(index)


def merged_from_parts(empty: faiss.Index, files: list[Path], keep: list[np.ndarray]) -> faiss.Index:
    """Every shard's part built by a Ray task (1 CPU each), merged in shard order."""
    blob = ray.put(faiss.serialize_index(empty))
    task = ray.remote(num_cpus=1)(_part)
    firsts = np.concatenate([[0], np.cumsum([int(k.sum()) for k in keep])])[:-1]
    parts = ray.get([task.remote(blob, str(f), k, int(first)) for f, k, first in zip(files, keep, firsts, strict=True)])
    index = faiss.deserialize_index(parts[0])
    for part in parts[1:]:
        other = faiss.deserialize_index(part)
        if isinstance(index, faiss.IndexIVF):
            index.merge_from(other, 0)  # ids were set per shard
        else:
            index.merge_from(other)
    return index


def grown_hnsw(files: list[Path], keep: list[np.ndarray], width: int, cfg: DatastoreConfig) -> faiss.Index:
    index = faiss.IndexHNSWFlat(width, cfg.hnsw_m)
    for f, k in zip(files, keep, strict=True):
        index.add(read_keys(f)["key"][k])
    return index


def build_indexes(files: list[Path], keep: list[np.ndarray], sample: np.ndarray, cfg: DatastoreConfig,
                  out: Path) -> dict[str, faiss.Index]:
    """flat, ivfpq and hnsw over the kept entries of `files`, written to out/<kind>.faiss."""
    n = int(sum(k.sum() for k in keep))
    width = sample.shape[1]
    indexes = {
        "flat": merged_from_parts(faiss.IndexFlatL2(width), files, keep),
        "ivfpq": merged_from_parts(trained_ivfpq(sample, n, cfg), files, keep),
        "hnsw": grown_hnsw(files, keep, width, cfg),
    }
    for kind, index in indexes.items():
        if index.ntotal != n:
            raise RuntimeError(f"the {kind} index holds {index.ntotal} entries, not the {n} kept")
        faiss.write_index(index, str(out / f"{kind}.faiss"))
    return indexes


def configure(index: faiss.Index, cfg: DatastoreConfig) -> faiss.Index:
    """Search-time parameters: IVF cells probed, HNSW's search breadth."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = cfg.nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(cfg.hnsw_ef_search, cfg.k)
    return index


def recall_at_k(exact: faiss.Index, approx: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Mean share of each query's exact k nearest entries that the approximate index returns."""
    _, truth = exact.search(queries, k)
    _, found = approx.search(queries, k)
    return float(np.mean([len(set(t[t >= 0]) & set(f[f >= 0])) / k for t, f in zip(truth, found, strict=True)]))


def single_index(kind: str, keys: np.ndarray, cfg: DatastoreConfig) -> faiss.Index:
    """One index of `kind` over keys held in memory, in one process (a sweep's trial builds its own)."""
    if kind == "flat":
        index = faiss.IndexFlatL2(keys.shape[1])
    elif kind == "ivfpq":
        n_train = max(65536, PQ_POINTS_PER_CENTROID * ivf_nlist(len(keys), cfg))
        sample = keys[np.random.default_rng(0).permutation(len(keys))[:n_train]]
        index = trained_ivfpq(sample, len(keys), cfg)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(keys.shape[1], cfg.hnsw_m)
    else:
        raise ConfigError(f"index kind {kind!r}: expected flat, ivfpq or hnsw")
    index.add(keys)
    return configure(index, cfg)
