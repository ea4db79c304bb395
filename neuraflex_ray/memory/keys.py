"""Keys and values of a retrieval memory: at every position of a token block, the LM's final
normalised hidden state (what its output layer reads) and the token that follows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.shards import vector_column, vector_rows

BATCH_ROWS = 16  # blocks per forward pass


@torch.no_grad()
def block_keys(model: torch.nn.Module, blocks: np.ndarray, batch_rows: int = BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(keys float32 [n * (L - 1), D], values int32 [n * (L - 1)]) of blocks [n, L]: position t of a
    block is keyed by the hidden state after tokens 0..t and valued by token t + 1, as the LM is
    evaluated (each block on its own)."""
    model.eval()
    blocks = np.asarray(blocks, dtype=np.int64)
    keys = []
    for i in range(0, len(blocks), batch_rows):
        h, _ = model.hidden_states(torch.from_numpy(blocks[i:i + batch_rows, :-1]))
        keys.append(h.float().reshape(-1, h.shape[-1]).numpy())
    width = model.cfg.dim
    return (np.concatenate(keys) if keys else np.zeros((0, width), np.float32),
            blocks[:, 1:].reshape(-1).astype(np.int32))


def keys_table(keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> pa.Table:
    """One shard's rows: key (fixed-size list of float32), value (next token), position (index of the
    predicted token in the training split's blocks: block * (L - 1) + t)."""
    return pa.table({"key": vector_column(keys), "value": pa.array(values.astype(np.int32)),
                     "position": pa.array(positions.astype(np.int64))})


def read_keys(path: str | Path) -> dict[str, np.ndarray]:
    """A shard back as arrays: key float32 [n, D], value int32 [n], position int64 [n]."""
    t = pq.read_table(path)
    return {"key": vector_rows(t.column("key")), "value": t.column("value").to_numpy(),
            "position": t.column("position").to_numpy()}


class KeyWriter:
    """Ray Data actor (`map_batches(KeyWriter, batch_size=1, concurrency=...)`): holds the export and
    writes each shard's keys to `out_dir/shard-NNNNN.parquet`; returns one row per shard."""

    def __init__(self, export: str, out_dir: str, threads: int = 1):
        from neuraflex_ray.checkpoint import load_exported

        torch.set_num_threads(threads)
        self.model, _ = load_exported(export)
        self.out = Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, rows = [], []
        for shard, first, tokens in zip(batch["shard"], batch["first_block"], batch["tokens"], strict=True):
            blocks = np.stack(tokens) if tokens.dtype == object else np.asarray(tokens)
            keys, values = block_keys(self.model, blocks)
            per_block = blocks.shape[1] - 1
            positions = int(first) * per_block + np.arange(len(values), dtype=np.int64)
            name = f"shard-{int(shard):05d}.parquet"
            pq.write_table(keys_table(keys, values, positions), self.out / name)
            names.append(name)
            rows.append(len(values))
        return {"shard": np.asarray(batch["shard"]), "file": np.asarray(names), "rows": np.asarray(rows)}
