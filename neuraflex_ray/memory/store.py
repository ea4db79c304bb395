"""A built datastore opened for search: its index, the value and count of every entry, and the check
that the export asking is the one whose keys it holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from neuraflex_ray.checkpoint import fingerprint
from neuraflex_ray.checkpoint.untrusted import refuse_pickles
from neuraflex_ray.config import ConfigError
from neuraflex_ray.memory.config import INDEX_KINDS, DatastoreConfig
from neuraflex_ray.memory.index import configure


def read_datastore_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser().resolve()
    try:
        return json.loads((p / "manifest.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"datastore {p}: no manifest.json; build one with `neuraflex-ray datastore build --export "
                          f"DIR --corpus stdlib|kjv|PATH --out {p}`") from None


def check_export(manifest: dict[str, Any], path: str | Path, export_dir: str | Path) -> None:
    """Keys are one model's hidden states: another export's queries would land on meaningless neighbours."""
    mine = fingerprint(export_dir)
    if mine != manifest["export_fingerprint"]:
        raise ConfigError(f"datastore {path} was built by the export {manifest['export']} (fingerprint "
                          f"{manifest['export_fingerprint']}), not by {export_dir} (fingerprint {mine}); build one "
                          f"for this export with `neuraflex-ray datastore build --export {export_dir} ...`")


@dataclass
class Neighbours:
    dist: np.ndarray  # float32 [n, k] squared L2 distances (inf where the index had fewer than k entries)
    values: np.ndarray  # int64 [n, k] the next token each neighbour stores
    counts: np.ndarray  # float32 [n, k] how many entries each neighbour stands for (0 where missing)


def kept_keys(path: str | Path) -> np.ndarray:
    """float32 [n, D]: the keys of a datastore's kept entries in index order, read back from its shards."""
    from neuraflex_ray.memory.keys import read_keys

    p = Path(path)
    manifest = read_datastore_manifest(p)
    kept = np.load(p / "positions.npy", allow_pickle=False)
    parts = []
    for shard in manifest["shards"]:
        s = read_keys(p / shard)
        parts.append(s["key"][np.isin(s["position"], kept)])
    return np.concatenate(parts)


class Datastore:
    """One datastore: `search(queries)` -> Neighbours. Searches one query at a time by default, so a
    query's neighbours never depend on which other queries share its batch (FAISS's exact search
    switches to a BLAS code path, with other rounding, for batches of 20 or more)."""

    def __init__(self, path: str | Path, index: str = "flat", export_dir: str | Path | None = None,
                 **search: Any):
        if index not in INDEX_KINDS:
            raise ConfigError(f"datastore index {index!r}: expected one of {list(INDEX_KINDS)}")
        self.path = Path(path).expanduser().resolve()
        refuse_pickles(self.path, "datastore")
        self.manifest = read_datastore_manifest(self.path)
        if export_dir is not None:
            check_export(self.manifest, self.path, export_dir)
        self.cfg = DatastoreConfig(**{**self.manifest["config"], **search})
        self.cfg.validate()
        self.kind = index
        self.index = configure(faiss.read_index(str(self.path / self.manifest["index"][index]["file"])), self.cfg)
        self.values = np.load(self.path / "values.npy", allow_pickle=False).astype(np.int64)
        self.counts = np.load(self.path / "counts.npy", allow_pickle=False).astype(np.float32)

    @property
    def k(self) -> int:
        return self.cfg.k

    def search(self, queries: np.ndarray, per_row: bool = True) -> Neighbours:
        """The k nearest entries of each query [n, D]. per_row=False searches the batch in one call
        (faster for evaluation; the exact index's rounding then depends on the batch size)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        configure(self.index, self.cfg)
        if per_row:
            parts = [self.index.search(q[i:i + 1], self.k) for i in range(len(q))]
            dist = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, self.k), np.float32)
            ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, self.k), np.int64)
        else:
            dist, ids = self.index.search(q, self.k)
        return self.neighbours(dist, ids)

    def neighbours(self, dist: np.ndarray, ids: np.ndarray) -> Neighbours:
        """A FAISS search's (distances, ids) over this store's entries -> Neighbours (id -1: none there)."""
        found = ids >= 0
        safe = np.where(found, ids, 0)
        return Neighbours(np.where(found, dist, np.inf).astype(np.float32), np.where(found, self.values[safe], 0),
                          np.where(found, self.counts[safe], 0.0).astype(np.float32))
