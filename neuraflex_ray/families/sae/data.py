"""An SAE's data: the rows of a `neuraflex-ray activations` directory, split by token block into rows the
SAE trains on and rows that only evaluate it (whole blocks go to one side, so neighbouring tokens of
one context never straddle the split)."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuraflex_ray.config import ConfigError
from pipelines.shards import load_splits, rename_shards, swap_into_place

HASH_MULT = 2654435761  # Knuth's multiplicative hash: blocks scatter evenly over [0, 1)


@dataclass
class SAEDataConfig:
    activations: str = ""  # a directory `neuraflex-ray activations` wrote (use the LM's train split)
    output_dir: str = "data/sae"  # the split's manifest goes here
    val_fraction: float = 0.1  # share of token blocks kept out of SAE training, for its evaluation
    seed: int = 0


def held_out(block: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool per row: its token block is on the evaluation side."""
    u = ((np.asarray(block, dtype=np.uint64) * np.uint64(HASH_MULT) + np.uint64(seed)) % np.uint64(2**32))
    return u.astype(np.float64) / 2**32 < fraction


def build_split(cfg: SAEDataConfig) -> dict[str, Any]:
    """A Ray Data job: the activation rows -> output_dir/{train,val} Parquet shards (by token block), then
    the manifest (the Train loop reads splits as shard files)."""
    import ray

    src = Path(cfg.activations).expanduser().resolve()
    try:
        acts = json.loads((src / "manifest.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.activations={cfg.activations!r}: no activations there; write them with "
                          f"`neuraflex-ray activations --export DIR --site SITE --out DIR`") from None
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must lie in (0, 1)")
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-build-{uuid.uuid4().hex[:8]}"
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet([str(src / s) for s in acts["shards"]], columns=["activation", "block"])
    try:
        shards, rows = {}, {}
        for split in ("train", "val"):
            part = ds.map_batches(_side, batch_format="pyarrow",
                                  fn_kwargs={"fraction": cfg.val_fraction, "seed": cfg.seed, "val": split == "val"})
            part.write_parquet(str(tmp / split))
            shards[split] = rename_shards(tmp, split)
            rows[split] = sum(pq.ParquetFile(tmp / s).metadata.num_rows for s in shards[split])
            if rows[split] == 0:
                raise ConfigError(f"data.val_fraction={cfg.val_fraction}: the {split} side holds no rows of "
                                  f"{acts['rows']}; collect more activations or change the fraction")
        manifest = {"activations": str(src), "export": acts["export"], "site": acts["site"], "split": acts["split"],
                    "width": acts["width"], "rows": acts["rows"], "train_rows": rows["train"], "val_rows": rows["val"],
                    "train_shards": shards["train"], "val_shards": shards["val"], "val_fraction": cfg.val_fraction,
                    "seed": cfg.seed, "train_mean": _mean(tmp, shards["train"])}
        swap_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _mean(root: Path, shards: list[str]) -> list[float]:
    """The mean activation of the training side (the SAE's decoder bias starts there)."""
    from pipelines.shards import vector_rows

    total, n = None, 0
    for s in shards:
        for batch in pq.ParquetFile(root / s).iter_batches(batch_size=65536, columns=["activation"]):
            x = vector_rows(batch.column(0)).astype(np.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            n += len(x)
    return (total / max(n, 1)).round(6).tolist()


def _side(batch: pa.Table, fraction: float, seed: int, val: bool) -> pa.Table:
    keep = held_out(batch.column("block").to_numpy(), fraction, seed) == val
    return batch.filter(pa.array(keep))


def open_split(output_dir: str) -> tuple[Any, Any]:
    train, val, _ = load_splits(output_dir, "`neuraflex-ray data --config <sae config>`")
    return train, val
