"""The byte-level (BLT) family's data section: raw bytes in fixed-length blocks, and their entropies.

The model section comes with the model (issue 26 in progress); the data side exists first: a corpus
the text pipeline reads becomes byte blocks, and a trained byte-level LM's per-byte entropies are
written beside them (`neuraflex_ray/families/blt/data.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ByteDataConfig:
    """Where the bytes come from (as the text pipeline's `data.source`) and how they are cut and scored."""

    source: str = "stdlib"  # stdlib, kjv, a local file / directory / glob, or a remote URI (as DataConfig)
    text_field: str = "text"  # column / JSON key that holds the text for .jsonl and .parquet
    block_bytes: int = 256  # bytes a block is trained on; blocks hold block_bytes + 1 (the last is a target)
    val_fraction: float = 0.05  # share of documents held out (split by document, deterministic)
    min_val_documents: int = 0  # hold out at least this many documents (held-out figures need enough of them)
    max_bytes: int = 0  # cap on the corpus size in bytes (0: no cap)
    # An export of a byte-level LM (an moe_lm trained with data.vocab_size=257 on the same corpus):
    # its entropy of each byte given the bytes before it is written beside the bytes. Empty: bytes only.
    entropy_model: str = ""
    entropy_actors: int = 1  # Ray Data actors that hold the entropy model (each scores whole batches)
    output_dir: str = "data/bytes"  # Parquet shards + manifest.json go here
    seed: int = 0
