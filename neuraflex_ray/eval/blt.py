"""A BLT export on held-out bytes: bits per byte measured directly, beside a bigram fitted on training bytes.

No tokenizer conversion: the model predicts bytes (and <|endoftext|> where a document ends), so bits
per byte is its cross entropy in bits over the split's UTF-8 bytes per id (`val_bytes_per_token` of
the byte dataset, just under 1: an <|endoftext|> is predicted but holds no byte), the definition the
BPE model's figure uses. The interval resamples whole held-out documents (eval/bootstrap.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraflex_ray.eval.bootstrap import ratio_interval
from neuraflex_ray.eval.lm import bigram_bits_per_byte, bits_per_byte, position_losses
from neuraflex_ray.models.blt import starts_of
from neuraflex_ray.models.blt_patching import EOS, N_IDS, mean_patch_bytes
from pipelines.text import target_documents


def byte_losses(model: torch.nn.Module, blocks: np.ndarray, starts: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """float64 [n, L - 1]: the model's cross entropy (nats) of bytes 1..L-1 of each block of raw ids [n, L]."""
    model.eval()
    return position_losses(lambda x, rows: model(x, starts[rows])[0], blocks, batch_size)


def evaluate_blt_export(export_dir: str | Path, data_dir: str | Path, limit: int = 0) -> dict[str, Any]:
    """Held-out bits/byte (with a 95% per-document bootstrap interval) beside a bigram of training bytes;
    `limit` > 0 scores only the first `limit` held-out blocks."""
    from neuraflex_ray.checkpoint import load_exported
    from pipelines.shards import read_columns, require_manifest

    model, _ = load_exported(export_dir)
    manifest = require_manifest(Path(data_dir), "build_byte_dataset (`neuraflex-ray data`)")
    cfg = model.cfg
    entropy = cfg.patching == "entropy"
    val = read_columns(data_dir, manifest["val_shards"], ("bytes", "entropy") if entropy else ("bytes",), limit)
    train = read_columns(data_dir, manifest["train_shards"], ("bytes",))["bytes"]
    blocks = val["bytes"].astype(np.int64)
    starts = starts_of(cfg, blocks, val.get("entropy"))
    nats = byte_losses(model, blocks, starts)
    per_id = manifest["val_bytes_per_token"]
    loss = float(nats.mean())
    docs = target_documents(blocks, EOS)
    lo, hi = ratio_interval(nats / math.log(2), np.full(nats.shape, per_id), docs)
    return {
        "val_loss": loss,
        "val_bits_per_byte": bits_per_byte(loss, per_id),
        "val_bits_per_byte_ci95": [lo, hi],
        "bigram_bits_per_byte": bigram_bits_per_byte(train, blocks, N_IDS, per_id),
        "val_documents": int(docs.max()) + 1,
        "val_bytes": int(nats.size),
        "patching": cfg.patching,
        "mean_patch_bytes_train": cfg.mean_patch_bytes,
        "mean_patch_bytes_val": mean_patch_bytes(starts[:, :-1]),
    }
