"""`build_datastore`: a corpus -> token blocks (the export's tokenizer) -> keys by a Ray Data actor
pool -> Parquet shards -> near-duplicates merged -> FAISS indexes from per-shard parts.

Layout of a built datastore (written whole or not at all):

    manifest.json      what was built from what: the export and its fingerprint, corpus, counts, sizes
    shards/            shard-NNNNN.parquet: key, value (next token), position (in the training split)
    values.npy         int32 [n] the next token of each kept entry, in index order
    counts.npy         int32 [n] how many entries each kept entry stands for (1 without de-duplication)
    positions.npy      int64 [n] each kept entry's position
    flat.faiss, ivfpq.faiss, hnsw.faiss
    gate.json          λ and temperature (fixed and adaptive) fitted on half the held-out documents
    text/              the corpus's token blocks, when it is not the export's own training data
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.checkpoint import fingerprint, load_exported, read_export_meta
from neuraflex_ray.config import ConfigError
from neuraflex_ray.config.lm import DataConfig
from neuraflex_ray.memory.config import DatastoreConfig
from neuraflex_ray.memory.dedup import merge_near_duplicates
from neuraflex_ray.memory.heldout import fit_own_gates, write_gates
from neuraflex_ray.memory.index import (
    PQ_POINTS_PER_CENTROID,
    build_indexes,
    check_key_width,
    configure,
    ivf_nlist,
    recall_at_k,
)
from neuraflex_ray.memory.keys import KeyWriter, block_keys, read_keys
from neuraflex_ray.memory.store import Datastore
from pipelines.shards import read_manifest
from pipelines.text import build_text_dataset, load_text_datasets, read_blocks

FORMAT_VERSION = 1
TRAIN_SAMPLE = 65536  # keys that train the IVF-PQ quantizers (at least)


def _log(msg: str) -> None:
    print(f"[datastore] {msg}", flush=True)


def own_training_data(meta: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(dir, manifest) of the dataset the export was trained on, when it is still on disk."""
    out = (meta.get("data") or {}).get("output_dir")
    manifest = read_manifest(Path(out)) if out else None
    return (out, manifest) if manifest is not None else None


def corpus_blocks(export: Path, meta: dict[str, Any], corpus: str, text_dir: Path,
                  data: dict[str, Any]) -> tuple[str, bool]:
    """(dataset dir, is the export's own training data). The export's own corpus (same `source`) means
    its own split, so the held-out documents stay held out; any other corpus is split and tokenized
    afresh with the export's tokenizer and the export's block length."""
    own = own_training_data(meta)
    if own is not None and own[1]["data_config"]["source"] == corpus:
        return own[0], True
    seq_len = own[1]["seq_len"] if own is not None else min(128, int(meta["model"]["max_seq_len"]) - 1)
    cfg = DataConfig(source=corpus, tokenizer=str(export / "tokenizer.json"), seq_len=seq_len,
                     output_dir=str(text_dir), **data)
    build_text_dataset(cfg)
    return str(text_dir), False


def shard_specs(blocks: np.ndarray, shard_blocks: int) -> list[dict[str, Any]]:
    return [{"shard": i, "first_block": a, "tokens": blocks[a:a + shard_blocks]}
            for i, a in enumerate(range(0, len(blocks), shard_blocks))]


def build_datastore(export_dir: str | Path, corpus: str, out_dir: str | Path, cfg: DatastoreConfig | None = None,
                    data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a datastore of `corpus`'s training split for an LM export; return its manifest.
    `data`: DataConfig fields (max_bytes, val_fraction, min_val_documents, seed) for a corpus other than
    the export's own."""
    cfg = cfg or DatastoreConfig()
    cfg.validate()
    export, out = Path(export_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    meta = read_export_meta(export)
    model, _ = load_exported(export)
    if not hasattr(model, "hidden_states") or not (export / "tokenizer.json").is_file():
        raise ConfigError(f"--export {export}: a {meta['model_type']} export has no token-level hidden states and "
                          f"tokenizer; a datastore is built for a token LM (NeuralFlex-MoE)")
    check_key_width(model.cfg.dim, cfg)  # the keys are the hidden states
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        text, own = corpus_blocks(export, meta, corpus, tmp / "text", data or {})
        train_ds, val_ds, text_manifest = load_text_datasets(text)
        blocks = read_blocks(train_ds)
        (tmp / "shards").mkdir()
        specs = shard_specs(blocks, cfg.shard_blocks)
        _log(f"{len(blocks)} blocks of {blocks.shape[1]} tokens from {corpus!r} -> {len(specs)} shards, "
             f"{cfg.actors} encoding actors")
        written = (ray.data.from_items(specs, override_num_blocks=len(specs))
                   .map_batches(KeyWriter, batch_size=1, concurrency=min(cfg.actors, len(specs)), num_cpus=1,
                                fn_constructor_kwargs={"export": str(export), "out_dir": str(tmp / "shards"),
                                                       "threads": cfg.threads})
                   .take_all())
        files = [tmp / "shards" / r["file"] for r in sorted(written, key=lambda r: r["shard"])]
        shards = [read_keys(f) for f in files]
        keys = np.concatenate([s["key"] for s in shards])
        values = np.concatenate([s["value"] for s in shards])
        positions = np.concatenate([s["position"] for s in shards])
        keep, counts = merge_near_duplicates(keys, values, cfg.dedup_distance)
        sizes = np.cumsum([0, *(len(s["value"]) for s in shards)])
        per_shard = [keep[a:b] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        np.save(tmp / "values.npy", values[keep])
        np.save(tmp / "counts.npy", counts[keep])
        np.save(tmp / "positions.npy", positions[keep])
        # FAISS wants >= 39 training points per IVF cell (it warns below); at least TRAIN_SAMPLE for PQ.
        n_train = max(TRAIN_SAMPLE, PQ_POINTS_PER_CENTROID * ivf_nlist(int(keep.sum()), cfg))
        sample = keys[keep][np.sort(np.random.default_rng(0).permutation(int(keep.sum()))[:n_train])]
        t_index = time.perf_counter()
        indexes = build_indexes(files, per_shard, sample, cfg, tmp)
        index_s = time.perf_counter() - t_index
        queries, _ = block_keys(model, read_blocks(val_ds)[: max(1, cfg.recall_queries // (blocks.shape[1] - 1) + 1)])
        queries = queries[: cfg.recall_queries]
        index_info = {kind: {"file": f"{kind}.faiss", "bytes": (tmp / f"{kind}.faiss").stat().st_size}
                      for kind in indexes}
        for kind in ("ivfpq", "hnsw"):
            index_info[kind]["recall_at_k"] = recall_at_k(indexes["flat"], configure(indexes[kind], cfg), queries, cfg.k)
        manifest = {
            "format_version": FORMAT_VERSION,
            "export": str(export), "export_fingerprint": fingerprint(export), "model_type": meta["model_type"],
            "corpus": corpus, "text": "text" if not own else text, "own_training_data": own,
            "key_width": int(keys.shape[1]), "vocab_size": int(text_manifest["vocab_size"]),
            "eos_id": int(text_manifest["eos_id"]), "seq_len": int(text_manifest["seq_len"]),
            "tokens": int(len(values)), "entries": int(keep.sum()), "deduplicated": int(len(values) - keep.sum()),
            "shards": [f"shards/{f.name}" for f in files], "index": index_info, "recall_queries": int(len(queries)),
            "config": dataclasses.asdict(cfg), "build_s": round(time.perf_counter() - t0, 2),
            "index_build_s": round(index_s, 2), "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        # The gates Serve applies when a request names this store: fitted on half the held-out documents.
        write_gates(tmp, fit_own_gates(model, Datastore(tmp)))
    _log(f"{manifest['tokens']} entries ({manifest['deduplicated']} merged as near-duplicates) -> {out} in "
         f"{manifest['build_s']:.1f}s; index bytes " + ", ".join(f"{k} {v['bytes']:,}" for k, v in index_info.items()))
    return manifest
