"""How a datastore is built and searched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from neuraflex_ray.config import ConfigError

INDEX_KINDS = ("flat", "ivfpq", "hnsw")


@dataclass
class DatastoreConfig:
    k: int = 16  # neighbours per query
    shard_blocks: int = 256  # token blocks per Parquet shard: one actor call and one index part each
    actors: int = 2  # encoding actors in the Ray Data pool
    threads: int = 1  # torch threads per actor
    # Merge entries with the same next token whose keys lie within this mean squared difference per
    # dimension (Liorhybrid's "librarian"); the survivor's count keeps their weight. 0: off.
    dedup_distance: float = 0.0
    ivf_nlist: int = 0  # IVF-PQ coarse cells; 0: about 4 sqrt(entries), a power of two
    pq_m: int = 16  # PQ sub-quantizers (must divide the key width): bytes per entry at 8 bits
    pq_bits: int = 8
    nprobe: int = 16  # IVF cells searched per query
    hnsw_m: int = 16  # graph neighbours per entry
    hnsw_ef_search: int = 64
    recall_queries: int = 500  # held-out keys on which recall@k of the approximate indexes is measured

    @classmethod
    def from_overrides(cls, overrides: list[str]) -> DatastoreConfig:
        """`field=value` strings -> a config; an unknown field or a bad value names the field."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in overrides:
            name, sep, raw = item.partition("=")
            if not sep or name not in fields:
                raise ConfigError(f"datastore setting {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
            kind = type(getattr(cls(), name))
            try:
                values[name] = kind(raw)
            except ValueError as e:
                raise ConfigError(f"datastore setting {name}={raw!r}: not a {kind.__name__}") from e
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("k", "shard_blocks", "actors", "threads", "pq_m", "pq_bits", "nprobe", "hnsw_m", "hnsw_ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"datastore {name}={getattr(self, name)} must be >= 1")
        if self.dedup_distance < 0 or self.ivf_nlist < 0:
            raise ConfigError("datastore dedup_distance and ivf_nlist must be >= 0")
