"""The BLT's data on Ray Data: raw byte blocks in Parquet, with a byte-level LM's entropies beside them.

    corpus --text pipeline, data.vocab_size=257--> <output_dir>/text: blocks of block_bytes + 1 byte ids
    text shards --map_batches(ids -> raw bytes)--> [--map_batches(EntropyScorer actors)-->]
        <output_dir>/{train,val}/*.parquet: `bytes` int16 [block_bytes + 1] (0-255, EOS = 256),
        `entropy` float32 [block_bytes + 1] when an entropy model is given
    manifest.json, written last

No tokenizer is learnt: with 257 ids the text pipeline's byte-level BPE has no merges, so its blocks
are bytes (reusing its sources, document split, packing and cache). The same byte-level dataset
(`<output_dir>/text`) is what the entropy model trains on, as an ordinary LM. Entropies are scored
by actors that each hold the model (`entropy_actors` of them), so they scale out with the cluster;
a patching threshold is applied when batches are read, so a sweep over it rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray

from neuraflex_ray.config import DataConfig
from neuraflex_ray.config.blt import ByteDataConfig
from neuraflex_ray.families.blt.entropy import EntropyScorer, raw_bytes
from pipelines.shards import load_splits, read_columns, rename_shards, reusable, swap_into_place
from pipelines.text import block_array, build_text_dataset, load_tokenizer

FORMAT_VERSION = 2  # 2: bytes per id in the manifest (bits per byte), the entropy model trained as a stage
ENTROPY_ROWS = 64  # blocks per entropy batch (an actor scores one batch at a time)


def text_config(cfg: ByteDataConfig) -> DataConfig:
    """The text pipeline's view of the byte data: one token per byte, blocks of block_bytes + 1."""
    return DataConfig(source=cfg.source, text_field=cfg.text_field, vocab_size=257, seq_len=cfg.block_bytes,
                      val_fraction=cfg.val_fraction, min_val_documents=cfg.min_val_documents,
                      max_bytes=cfg.max_bytes, output_dir=str(Path(cfg.output_dir).expanduser().resolve() / "text"),
                      seed=cfg.seed)


def _fingerprint(entropy_model: str, text_manifest: dict[str, Any]) -> str:
    entropy = None
    if entropy_model:
        from neuraflex_ray.checkpoint import fingerprint

        entropy = fingerprint(entropy_model)  # the weights, wherever the export was copied to
    state = {"format_version": FORMAT_VERSION, "text": text_manifest["source_fingerprint"], "entropy_model": entropy}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _to_bytes(batch: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
    """Ray task: the byte-level tokenizer's ids -> raw ids."""
    return {"bytes": table[block_array(batch)]}


def build_byte_dataset(cfg: ByteDataConfig, *, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the byte blocks, with entropies when `cfg.entropy_model` names an export."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).expanduser().resolve()
    text_manifest = build_text_dataset(text_config(cfg), force=force)
    entropy_model = cfg.entropy_model
    if entropy_model == "train":
        from neuraflex_ray.families.blt.entropy_stage import trained_entropy_model

        entropy_model = str(trained_entropy_model(cfg, text_manifest, force=force))
    entropy_model = str(Path(entropy_model).expanduser().resolve()) if entropy_model else ""
    fingerprint = _fingerprint(entropy_model, text_manifest)
    if not force and (old := reusable(out, fingerprint)) is not None:
        print(f"[data] reusing {out} (bytes and entropy model unchanged)", flush=True)
        return old
    table = raw_bytes(load_tokenizer(out / "text"))
    text_train, text_val, _ = load_splits(str(out / "text"), "build_byte_dataset")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-build-{uuid.uuid4().hex[:8]}"
    try:
        shards, mean_entropy = {}, {}
        for split, ds in (("train", text_train), ("val", text_val)):
            ds = ds.map_batches(_to_bytes, batch_format="numpy", fn_kwargs={"table": table})
            if entropy_model:
                # Blocks for every actor to score at once (order is kept: reads are ordered).
                ds = ds.repartition(4 * cfg.entropy_actors)
                ds = ds.map_batches(EntropyScorer, batch_format="numpy", batch_size=ENTROPY_ROWS,
                                    concurrency=cfg.entropy_actors, num_cpus=1,
                                    fn_constructor_kwargs={"export": entropy_model})
            ds.write_parquet(str(tmp / split))
            shards[split] = rename_shards(tmp, split)
            if entropy_model:
                mean_entropy[split] = _mean_entropy(tmp, shards[split])
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "block_bytes": cfg.block_bytes,
            **{k: text_manifest[k] for k in ("source", "num_documents", "train_documents", "val_documents",
                                             "train_blocks", "val_blocks", "train_bytes", "val_bytes",
                                             "train_bytes_per_token", "val_bytes_per_token")},
            "text_dir": str(out / "text"),
            "entropy_model": entropy_model,
            # The training checkpoint that export came from (recorded by `neuraflex-ray export` / the stage).
            "entropy_checkpoint": _source_checkpoint(entropy_model),
            "mean_entropy": mean_entropy,
            "train_shards": shards["train"],
            "val_shards": shards["val"],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        swap_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scored = f", entropies from {entropy_model}" if entropy_model else ""
    print(f"[data] wrote {manifest['train_blocks']} train / {manifest['val_blocks']} val byte blocks of "
          f"{cfg.block_bytes + 1}{scored} to {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return manifest


def _source_checkpoint(export: str) -> str:
    if not export:
        return ""
    return json.loads((Path(export) / "config.json").read_text()).get("source_checkpoint", "")


def load_byte_datasets(output_dir: str) -> tuple[ray.data.Dataset, ray.data.Dataset, dict[str, Any]]:
    return load_splits(output_dir, "build_byte_dataset")


def _mean_entropy(root: Path, shards: list[str]) -> float:
    return float(read_columns(root, shards, ("entropy",))["entropy"].astype(np.float64).mean())
