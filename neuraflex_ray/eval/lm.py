"""An LM export on held-out text, beside the reference numbers it must beat, in bits per byte.

A model's loss is in nats per token; dividing by ln 2 and by the split's UTF-8 bytes per token
(`val_bytes_per_token` in the data manifest) gives bits per byte, comparable across tokenizers.
`evaluate_lm_export` scores an export on every held-out block beside a bigram fitted on the
training blocks only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Convert a cross entropy in nats/token to bits/byte."""
    return loss_nats_per_token / math.log(2) / bytes_per_token


def bigram_bits_per_byte(train_blocks: np.ndarray, val_blocks: np.ndarray, vocab_size: int,
                         val_bytes_per_token: float, alpha: float = 0.1) -> float:
    """Held-out bits/byte of an add-alpha smoothed bigram model fitted on the train blocks.

    Scores the positions an LM predicts: tokens[1:] given tokens[:-1] within each block. Counts
    are sparse (unique pair codes prev * V + next), so memory grows with the number of distinct
    pairs seen, not with V**2: fine for V = 50k.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (got {alpha})")
    v = int(vocab_size)
    train = np.asarray(train_blocks, dtype=np.int64)
    val = np.asarray(val_blocks, dtype=np.int64)
    if train.ndim != 2 or val.ndim != 2 or val.shape[1] < 2 or val.shape[0] == 0:
        raise ValueError(f"need 2-D blocks with >= 2 tokens and a non-empty val set; got train {train.shape}, "
                         f"val {val.shape}")
    if min(train.min(initial=0), val.min()) < 0 or max(train.max(initial=0), val.max()) >= v:
        raise ValueError(f"token ids must lie in [0, vocab_size={v})")

    prev, nxt = train[:, :-1].ravel(), train[:, 1:].ravel()
    pair_codes, pair_counts = np.unique(prev * v + nxt, return_counts=True)  # sorted codes
    prev_counts = np.bincount(prev, minlength=v)

    vp, vn = val[:, :-1].ravel(), val[:, 1:].ravel()
    codes = vp * v + vn
    counts = np.zeros(len(codes), dtype=np.float64)
    if len(pair_codes):
        idx = np.minimum(np.searchsorted(pair_codes, codes), len(pair_codes) - 1)
        hit = pair_codes[idx] == codes
        counts[hit] = pair_counts[idx[hit]]
    prob = (counts + alpha) / (prev_counts[vp] + alpha * v)
    bits_per_token = float(-np.log2(prob).mean())
    return bits_per_token / val_bytes_per_token


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-token cross entropy (nats/token) over every held-out block, dropless local path."""
    from neuraflex_ray.models.moe_lm import lm_loss

    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        tokens = torch.from_numpy(blocks[i:i + batch_size].astype(np.int64))
        logits, stats = model(tokens[:, :-1])
        ce = lm_loss(logits, tokens[:, 1:], stats, model.cfg).ce
        total += float(ce) * tokens[:, 1:].numel()
        count += tokens[:, 1:].numel()
    return total / count


@torch.no_grad()
def position_losses(logits_of: Callable[[torch.Tensor, slice], torch.Tensor], blocks: np.ndarray,
                    batch_size: int) -> np.ndarray:
    """float64 [n, L - 1]: the cross entropy (nats) of ids 1..L-1 of each block [n, L]; `logits_of(inputs,
    rows)` is the model on inputs [b, L - 1], the blocks `rows` of `blocks`."""
    import torch.nn.functional as F

    out = []
    for i in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(np.asarray(blocks[i:i + batch_size], dtype=np.int64))
        logits = logits_of(ids[:, :-1], slice(i, i + batch_size))
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        out.append(ce.view(ids.shape[0], -1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def token_losses(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """float64 [n, L - 1]: the cross entropy (nats) of each predicted token of each block, dropless local path."""
    model.eval()
    return position_losses(lambda x, rows: model(x)[0], blocks, batch_size)


def evaluate_lm_export(export_dir: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """Held-out bits/byte of an LM export beside a bigram fitted on the training blocks."""
    from neuraflex_ray.checkpoint import load_exported
    from pipelines.text import load_text_datasets, read_blocks

    model, _ = load_exported(export_dir)
    train_ds, val_ds, manifest = load_text_datasets(str(data_dir))
    val_blocks, train_blocks = read_blocks(val_ds), read_blocks(train_ds)
    bpt = manifest["val_bytes_per_token"]
    loss = heldout_loss(model, val_blocks)
    return {
        "val_loss": loss,
        "val_bits_per_byte": bits_per_byte(loss, bpt),
        "bigram_bits_per_byte": bigram_bits_per_byte(train_blocks, val_blocks, manifest["vocab_size"], bpt),
        "val_tokens": int(val_blocks[:, 1:].size),
    }
