"""Text pipeline on Ray Data: raw text -> byte-level BPE -> fixed-length token blocks in Parquet.

    input files --read--> documents --hash split--> train / val documents
    train documents --> byte-level BPE (or the user's tokenizer.json) --> tokenizer.json
    documents --map_batches(tokenize, + <|endoftext|>)--> --map_batches(pack)--> blocks of seq_len + 1
    train blocks --seeded shuffle--> train/*.parquet      val blocks --> val/*.parquet
    manifest.json, written last: counts, tokenizer hash, bytes per token (for bits per byte)

Every block holds exactly seq_len + 1 tokens, so every batch has the same shape: DeepSpeed's expert
parallel all-to-all hangs when ranks disagree on shapes. The build is deterministic (sorted inputs,
hash split, ordered execution, seeded shuffle) and cached: an unchanged fingerprint of the
inputs and config reuses the shards. The caller owns Ray: call `ray.init(...)` first.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from neuraflex_ray.config import DataConfig
from pipelines.shards import column, load_splits, rename_shards, reusable, swap_into_place
from pipelines.text_sources import _cap_files, _file_documents, _filesystem, _InputFile, _list_inputs

EOS = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when the output or the build logic changes: it invalidates old caches
PACK_DOCS = 1024  # documents per packing batch: each batch drops < one block of ragged tail
SHARD_BLOCKS = 2048  # about this many blocks per Parquet shard, at most MAX_SHARDS shards
MAX_SHARDS = 16


def _log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_text_dataset(cfg: DataConfig, *, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) train/val Parquet shards of token blocks; return the manifest.

    Reuses the existing output when its manifest's fingerprint (input files + config) matches, so
    every `train` run can call this cheaply; `force=True` rebuilds anyway.
    """
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).expanduser().resolve()
    fs, files, where = _list_inputs(cfg, exclude=str(out))
    files = _cap_files(files, cfg.max_bytes)
    user_tokenizer = _read_tokenizer_bytes(cfg.tokenizer, "data.tokenizer") if cfg.tokenizer else None
    fingerprint = _fingerprint(cfg, files, user_tokenizer)
    if not force and (old := _reusable(out, fingerprint)) is not None:
        _log(f"reusing {out} (inputs and config unchanged; force=True rebuilds)")
        return old

    # Ordered execution makes packing and shard order reproducible run to run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    block_len = cfg.seq_len + 1

    try:
        docs = (
            ray.data.from_items([{"path": f.path, "id": f.rel} for f in files],
                                override_num_blocks=min(len(files), 64))
            .map_batches(_read_documents, batch_format="numpy",
                         fn_kwargs={"fs": fs, "text_field": cfg.text_field, "seed": cfg.seed})
            .materialize()
        )
    except Exception:
        # Ray Data hands a task's error back wrapped, as text; find the bad file here to raise its own
        # one-line BadInput (naming the file and line) instead.
        _find_bad_input(fs, files, cfg.text_field)
        raise
    cols = _columns(docs, ["u", "nbytes"])  # per document, in order
    keep = _num_to_keep(cols["nbytes"], cfg.max_bytes)
    if keep < len(cols["u"]):
        docs = docs.limit(keep)
    threshold = _val_threshold(cols["u"][:keep], cfg.val_fraction, cfg.min_val_documents)
    _log(f"source {where}: {keep} documents, {cols['nbytes'][:keep].sum() / 1e6:.2f} MB from "
         f"{len(files)} files; {int((cols['u'][:keep] <= threshold).sum())} held out for validation")

    train_docs = docs.map_batches(_select, batch_format="pyarrow", fn_kwargs={"threshold": threshold, "val": False})
    tok, tok_bytes = _tokenizer(cfg, user_tokenizer, train_docs)
    eos_id = tok.token_to_id(EOS)

    tokenized = docs.map_batches(
        _tokenize, batch_format="pyarrow", batch_size=256,
        fn_kwargs={"tokenizer_json": tok_bytes.decode(), "eos_id": eos_id},
    ).materialize()
    cols = _columns(tokenized, ["u", "nbytes", "n_tokens"])  # per document, in order
    is_val = cols["u"] <= threshold
    masks = {"train": ~is_val, "val": is_val}
    doc_tokens = {s: int(cols["n_tokens"][m].sum()) for s, m in masks.items()}  # before packing
    doc_bytes = {s: int(cols["nbytes"][m].sum()) for s, m in masks.items()}

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-build-{uuid.uuid4().hex[:8]}"
    try:
        shards: dict[str, list[str]] = {}
        blocks: dict[str, int] = {}
        for split in masks:
            packed = tokenized.map_batches(
                _pack, batch_format="pyarrow", batch_size=PACK_DOCS,
                fn_kwargs={"block_len": block_len, "threshold": threshold, "val": split == "val"},
            )
            shards[split], blocks[split] = _write_split(packed, tmp, split, doc_tokens[split] // block_len,
                                                        shuffle_seed=cfg.seed if split == "train" else None)
            if blocks[split] == 0:
                raise ValueError(
                    f"the {split} split has {doc_tokens[split]} tokens, fewer than one block of "
                    f"data.seq_len + 1 = {block_len}; use more text (data.source, data.max_bytes), "
                    f"a larger data.val_fraction or a smaller data.seq_len"
                )
        (tmp / "tokenizer.json").write_bytes(tok_bytes)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": cfg.source,
            "source_fingerprint": fingerprint,
            "num_documents": int(keep),
            "train_documents": int(keep - is_val.sum()),
            "val_documents": int(is_val.sum()),
            "train_tokens": blocks["train"] * block_len,
            "val_tokens": blocks["val"] * block_len,
            "train_blocks": blocks["train"],
            "val_blocks": blocks["val"],
            "seq_len": cfg.seq_len,
            "vocab_size": tok.get_vocab_size(),
            "eos_id": eos_id,
            "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
            # UTF-8 bytes / tokens (with one EOS per document) before packing: nats/token -> bits/byte.
            "train_bytes_per_token": doc_bytes["train"] / doc_tokens["train"],
            "val_bytes_per_token": doc_bytes["val"] / doc_tokens["val"],
            "train_bytes": doc_bytes["train"],
            "val_bytes": doc_bytes["val"],
            "train_shards": shards["train"],
            "val_shards": shards["val"],
            "data_config": dataclasses.asdict(cfg),
            "output_dir": str(out),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        swap_into_place(tmp, out, manifest, files=("tokenizer.json",))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {blocks['train']} train / {blocks['val']} val blocks of {block_len} tokens to {out} "
         f"in {time.perf_counter() - t0:.1f}s")
    return manifest


def load_text_datasets(output_dir: str) -> tuple[ray.data.Dataset, ray.data.Dataset, dict[str, Any]]:
    """(train, val, manifest) from a built output_dir; rows hold `tokens`, int32 [seq_len + 1].

    Shards are read in manifest order with ordered execution, so every reader (e.g. every Ray Train
    rank) sees the same, already shuffled, sequence of blocks.
    """
    return load_splits(output_dir, "build_text_dataset or `neuraflex-ray data`")


def target_documents(blocks: np.ndarray, eos: int) -> np.ndarray:
    """int [n, L - 1]: the document of each predicted position of blocks [n, L] that hold a split's
    documents in order, each followed by `eos` (which belongs to the document it ends)."""
    flat = np.asarray(blocks).reshape(-1)
    doc = np.concatenate([[0], np.cumsum(flat[:-1] == eos)]).reshape(np.shape(blocks))
    return doc[:, 1:]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a built dataset: pass its output_dir or a tokenizer.json path (or URI)."""
    return Tokenizer.from_str(_read_tokenizer_bytes(str(path), "tokenizer path").decode())


def block_array(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The `tokens` column of a numpy-format batch as one [rows, seq_len + 1] array.

    Our shards hold a fixed-shape tensor column (already 2-D); a plain list column arrives as an
    object array of rows and is stacked.
    """
    return column(batch, "tokens")


def read_blocks(ds: ray.data.Dataset) -> np.ndarray:
    """All blocks of a dataset as one int32 array [num_blocks, seq_len + 1] (for evaluation)."""
    parts = [block_array(batch) for batch in ds.iter_batches(batch_size=4096, batch_format="numpy")]
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros((0, 0), np.int32)


# --------------------------------------------------------------------------------------------
# Inputs: listing, capping, reading (through pyarrow.fs, so s3:// and gs:// work like local paths)
# --------------------------------------------------------------------------------------------


def _num_to_keep(nbytes: np.ndarray, max_bytes: int) -> int:
    """Documents are taken in order until the cap is reached (the last one may cross it)."""
    if max_bytes <= 0:
        return len(nbytes)
    before = np.cumsum(nbytes) - nbytes  # bytes taken before each document
    return int((before < max_bytes).sum())


def _fingerprint(cfg: DataConfig, files: list[_InputFile], user_tokenizer: bytes | None) -> str:
    """Hash of everything that changes the output: input files (path, size, mtime) and config."""
    state = {
        "format_version": FORMAT_VERSION,
        "files": [(f.path, f.size, f.mtime_ns) for f in files],
        "source": cfg.source,
        "text_field": cfg.text_field,
        "tokenizer": hashlib.sha256(user_tokenizer).hexdigest() if user_tokenizer else None,
        "vocab_size": None if user_tokenizer else cfg.vocab_size,
        **{k: getattr(cfg, k) for k in ("seq_len", "val_fraction", "max_bytes", "seed")},
        # Only when set, so that builds from before the setting existed keep their fingerprint.
        **({"min_val_documents": cfg.min_val_documents} if cfg.min_val_documents else {}),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _read_documents(batch: dict[str, np.ndarray], fs: pafs.FileSystem, text_field: str,
                    seed: int) -> pa.Table:
    """Ray task: a batch of files -> one row per non-empty document (id, text, nbytes, u)."""
    ids, texts = [], []
    for path, file_id in zip(batch["path"], batch["id"], strict=True):
        for row, text in _file_documents(fs, str(path), text_field):
            text = "" if text is None else str(text)
            if text:
                ids.append(str(file_id) if row is None else f"{file_id}#{row}")
                texts.append(text)
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.string()),
        "nbytes": pa.array([len(t.encode()) for t in texts], pa.int64()),
        "u": pa.array([_unit_hash(i, seed) for i in ids], pa.float64()),
    })


def _find_bad_input(fs: pafs.FileSystem, files: list[_InputFile], text_field: str) -> None:
    """Read every input in this process; the first that cannot be read raises its BadInput."""
    for f in files:
        for _ in _file_documents(fs, f.path, text_field):
            pass


def _unit_hash(doc_id: str, seed: int) -> float:
    """A stable number in [0, 1) per document: decides its split, whatever the order or machine."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / 2.0**53


def _val_threshold(u: np.ndarray, fraction: float, min_documents: int = 0) -> float:
    """Documents with u <= threshold are validation: about `fraction`, at least one (and at least
    `min_documents`), never all."""
    if len(u) < 2:
        raise ValueError(f"data.source gave {len(u)} non-empty document(s); at least 2 are needed "
                         f"(one to train on, one to validate on)")
    s = np.sort(u)
    if min_documents >= len(u):
        raise ValueError(f"data.min_val_documents={min_documents}, but data.source gave {len(u)} documents: "
                         f"use a larger corpus (data.source, data.max_bytes) or hold out fewer")
    return float(min(max(fraction, s[max(0, min_documents - 1)]), s[-2]))


# --------------------------------------------------------------------------------------------
# Ray Data batch functions: select a split, tokenize, pack
# --------------------------------------------------------------------------------------------


def _select(batch: pa.Table, threshold: float, val: bool) -> pa.Table:
    u = batch.column("u").to_numpy()
    return batch.filter(pa.array((u <= threshold) == val))


def _text_batches(ds: ray.data.Dataset) -> Iterator[list[str]]:
    for batch in ds.select_columns(["text"]).iter_batches(batch_size=256, batch_format="pyarrow"):
        yield batch.column("text").to_pylist()


def _tokenizer(cfg: DataConfig, user_tokenizer: bytes | None,
               train_docs: ray.data.Dataset) -> tuple[Tokenizer, bytes]:
    """The user's tokenizer.json (plus <|endoftext|> if it lacks one), or a BPE trained on train docs."""
    if user_tokenizer is not None:
        tok = Tokenizer.from_str(user_tokenizer.decode())
        if tok.token_to_id(EOS) is not None:
            _log(f"using tokenizer {cfg.tokenizer} (vocab {tok.get_vocab_size()})")
            return tok, user_tokenizer  # byte-identical copy: its sha256 stays the user's
        tok.add_special_tokens([EOS])  # documents must end in a known end-of-text id
        _log(f"using tokenizer {cfg.tokenizer} plus {EOS} (vocab {tok.get_vocab_size()})")
        return tok, tok.to_str(pretty=True).encode()
    t = time.perf_counter()
    tok = train_bpe(_text_batches(train_docs), cfg.vocab_size)
    _log(f"trained byte-level BPE, vocab {tok.get_vocab_size()}, on the train split in {time.perf_counter() - t:.1f}s")
    return tok, tok.to_str(pretty=True).encode()


@functools.lru_cache(maxsize=1)
def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte-level table, as the ByteLevel pre-tokenizer uses it: each byte -> one printable character
    (a byte-level BPE's tokens are strings of these)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def train_bpe(batches: Iterator[list[str]], vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE: any input round-trips, no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(batches, trainer=trainer)
    return tok


@functools.lru_cache(maxsize=2)
def _tokenizer_from_json(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)  # once per worker process, not once per batch


def _tokenize(batch: pa.Table, tokenizer_json: str, eos_id: int) -> pa.Table:
    """Ray task: documents -> token ids, each document followed by EOS."""
    encodings = _tokenizer_from_json(tokenizer_json).encode_batch(
        batch.column("text").to_pylist(), add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int32)
    values = np.fromiter((t for e in encodings for t in (*e.ids, eos_id)), np.int32, int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({
        "u": batch.column("u"),
        "nbytes": batch.column("nbytes"),
        "n_tokens": pa.array(lengths),
        "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
    })


def _pack(batch: pa.Table, block_len: int, threshold: float, val: bool) -> dict[str, np.ndarray]:
    """Ray task: one split's documents of a batch, concatenated and cut into [n, block_len]."""
    batch = _select(batch, threshold, val)
    flat = batch.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    n = len(flat) // block_len  # the ragged tail (< block_len tokens) is dropped
    return {"tokens": flat[: n * block_len].astype(np.int32).reshape(n, block_len)}


# --------------------------------------------------------------------------------------------
# Output: shards, manifest, atomic replacement
# --------------------------------------------------------------------------------------------


def _write_split(packed: ray.data.Dataset, tmp: Path, split: str, est_blocks: int,
                 shuffle_seed: int | None) -> tuple[list[str], int]:
    """Write one split as tmp/<split>/<split>-00000.parquet ...; return (shard names, blocks).

    The train split is shuffled once here, seeded, so training can simply read in file order.
    """
    # Materialized first so Ray cannot fuse packing into the shuffle (which would pack per input
    # block, leaving more ragged tails, instead of per PACK_DOCS documents).
    ds = packed.materialize()
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed)
    ds.repartition(max(1, min(MAX_SHARDS, est_blocks // SHARD_BLOCKS))).write_parquet(str(tmp / split))
    names = rename_shards(tmp, split)
    return names, sum(pq.ParquetFile(tmp / name).metadata.num_rows for name in names)


def _reusable(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The existing manifest if it was built from the same inputs and config and is intact."""
    m = reusable(out, fingerprint, key="source_fingerprint")
    tok = out / "tokenizer.json"
    if m is None or not tok.is_file() or hashlib.sha256(tok.read_bytes()).hexdigest() != m["tokenizer_sha256"]:
        return None
    return m


def _read_tokenizer_bytes(path: str, what: str) -> bytes:
    """Bytes of a tokenizer.json given its path, its directory, or a URI; `what` names it in errors."""
    uri = path if "://" in path else os.path.abspath(os.path.expanduser(path))
    fs, p = _filesystem(uri)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        p = p.rstrip("/") + "/tokenizer.json"
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise ValueError(f"{what}={path!r}: no tokenizer.json there; give the path of a Hugging Face "
                         f"tokenizer.json, or leave data.tokenizer empty to train a byte-level BPE")
    with fs.open_input_stream(p) as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _columns(ds: ray.data.Dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Small per-row columns gathered to the driver, in dataset order."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in ds.select_columns(names).iter_batches(batch_size=None, batch_format="numpy"):
        for n in names:
            parts[n].append(batch[n])
    return {n: np.concatenate(p) if p else np.zeros(0) for n, p in parts.items()}
