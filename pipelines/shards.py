"""What both pipelines do with their output folder: swap a finished build into place, manifest last,
decide whether an existing build can be reused, and read it back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from neuraflex_ray.atomic import write_json_atomic
from pipelines.errors import BadInput


def swap_into_place(tmp: Path, out: Path, manifest: dict[str, Any], files: tuple[str, ...] = ()) -> None:
    """Replace out/{train,val} (and `files`) with the new build in tmp, then write the manifest last: a
    crash at any point leaves either no manifest (rebuild) or a manifest that matches the files."""
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ("train", "val"):
        shutil.rmtree(out / name, ignore_errors=True)
        os.rename(tmp / name, out / name)
    for name in files:
        os.replace(tmp / name, out / name)
    write_json_atomic(out / "manifest.json", manifest)


def rename_shards(tmp: Path, split: str) -> list[str]:
    """Name the Parquet files Ray wrote into tmp/<split> `<split>-00000.parquet`, ... in task order (Ray's
    own names sort that way); return them relative to tmp, as a manifest lists them."""
    names = []
    for i, f in enumerate(sorted((tmp / split).glob("*.parquet"))):
        target = f.with_name(f"{split}-{i:05d}.parquet")
        f.rename(target)
        names.append(f"{split}/{target.name}")
    return names


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def reusable(out: Path, fingerprint: str, key: str = "fingerprint") -> dict[str, Any] | None:
    """The existing manifest if it was built from the same inputs and config and its shards exist."""
    m = read_manifest(out)
    if m is None or m.get(key) != fingerprint:
        return None
    if not all((out / s).is_file() for s in m["train_shards"] + m["val_shards"]):
        return None
    return m


def require_manifest(out: Path, build_hint: str) -> dict[str, Any]:
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no dataset in {out} (manifest.json missing); build it first with {build_hint}")
    return manifest


def check_shards(out: Path, shards: list[str]) -> None:
    """Every shard a manifest lists is a whole Parquet file (its footer reads), before any worker
    reads one: a shard cut short (a full disk, a copy killed midway) is one error naming it."""
    import pyarrow.parquet as pq

    for s in shards:
        try:
            pq.read_metadata(out / s)
        except (pa.ArrowInvalid, OSError) as e:
            raise BadInput(f"{out / s}: not a complete Parquet file ({e}); the dataset in {out} is damaged: "
                           f"fix: delete {out / 'manifest.json'} and run again to rebuild it") from None


def load_splits(output_dir: str, build_hint: str) -> tuple[ray.data.Dataset, ray.data.Dataset, dict[str, Any]]:
    """(train, val, manifest) of a built output_dir. Shards are read in manifest order with ordered
    execution, so every reader (e.g. every Ray Train rank) sees the same sequence of rows."""
    out = Path(output_dir).expanduser().resolve()
    manifest = require_manifest(out, build_hint)
    check_shards(out, manifest["train_shards"] + manifest["val_shards"])
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train = ray.data.read_parquet([str(out / s) for s in manifest["train_shards"]])
    val = ray.data.read_parquet([str(out / s) for s in manifest["val_shards"]])
    return train, val, manifest


def column(batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A fixed-length list column of a numpy batch as one 2-D array (our shards hold a fixed-shape tensor
    column, already 2-D; a plain list column arrives as an object array of rows and is stacked)."""
    col = batch[name]
    return np.stack(col) if col.dtype == object else col


def read_columns(out: str | Path, shards: list[str], names: tuple[str, ...], limit: int = 0) -> dict[str, np.ndarray]:
    """Fixed-length list columns of a split's shards (manifest order) as 2-D arrays, read in this
    process with pyarrow; `limit` > 0: the first `limit` rows only."""
    import pyarrow.parquet as pq

    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rows = 0
    for shard in shards:
        table = pq.read_table(Path(out) / shard, columns=list(names))
        for n in names:
            col = table.column(n).combine_chunks()
            col = getattr(col, "storage", col)  # Ray's tensor extension type wraps a fixed-size list
            width = len(col[0]) if len(col) else 0
            parts[n].append(np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), width))
        rows += table.num_rows
        if limit and rows >= limit:
            break
    return {n: np.concatenate(p)[:limit or None] if p else np.zeros((0, 0)) for n, p in parts.items()}


def vector_column(rows: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [n, d] -> a Parquet-ready fixed-size list column (any Arrow reader sees lists of d floats)."""
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def vector_rows(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """vector_column() read back: float32 [n, d]."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy().reshape(-1, col.type.list_size).astype(np.float32, copy=False)
