"""A byte-level LM's entropy of each byte given the bytes before it: what entropy patching cuts on.

The entropy model is an ordinary NeuralFlex-MoE export trained with `data.vocab_size=257` (one token
per byte; its tokenizer maps each byte to one id through GPT-2's byte-to-character table). Bytes are
kept as raw values here (0-255, EOS = 256), so a table maps them to the model's ids and back.

What the model sees: the bytes of the block before each position, after one <|endoftext|> standing
for a start of document. So a block's first byte is scored as if a document began there, and no
block sees another block's bytes; the same rule holds when generating, so patch boundaries do not
depend on how text was cut into blocks before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraflex_ray.models.blt_patching import EOS, N_IDS, next_byte_entropy
from pipelines.text import EOS as EOS_TOKEN
from pipelines.text import byte_level_chars


def model_ids(tokenizer: Any) -> np.ndarray:
    """int64 [257]: a raw id (byte value, or EOS = 256) -> the byte-level tokenizer's id for it."""
    table = byte_level_chars()
    ids = [tokenizer.token_to_id(table[b]) for b in range(256)] + [tokenizer.token_to_id(EOS_TOKEN)]
    # Entropies are taken over logits[..., :257]: the byte ids must be exactly 0..256 (in any order).
    if None in ids or set(ids) != set(range(N_IDS)):
        raise ValueError(f"not a byte-level tokenizer (vocab {tokenizer.get_vocab_size()}): every byte must be one "
                         f"token; train the entropy model with data.vocab_size=257")
    return np.asarray(ids, dtype=np.int64)


def raw_bytes(tokenizer: Any) -> np.ndarray:
    """int16 [257]: the byte-level tokenizer's id -> the raw id (the inverse of `model_ids`)."""
    inverse = np.zeros(N_IDS, dtype=np.int16)
    inverse[model_ids(tokenizer)] = np.arange(N_IDS, dtype=np.int16)
    return inverse


@torch.no_grad()
def byte_entropies(model: torch.nn.Module, to_model: np.ndarray, blocks: np.ndarray, batch_rows: int = 16) -> np.ndarray:
    """float32 [n, L]: entropy (nats) of the model's prediction of each byte of each block of raw ids [n, L],
    given <|endoftext|> and the block's bytes before it. The distribution is over the 257 byte-level
    ids (the model's padded vocabulary rows are left out)."""
    model.eval()
    blocks = np.asarray(blocks, dtype=np.int64)
    n, length = blocks.shape
    if length > model.cfg.max_seq_len:
        raise ValueError(f"blocks of {length} bytes are longer than the entropy model's context "
                         f"(model.max_seq_len={model.cfg.max_seq_len}); train it with a longer one")
    out = np.empty((n, length), dtype=np.float32)
    bos = np.full((n, 1), to_model[EOS], dtype=np.int64)
    inputs = np.concatenate([bos, to_model[blocks[:, :-1]]], axis=1)  # position t predicts byte t
    for i in range(0, n, batch_rows):
        logits, _ = model(torch.from_numpy(inputs[i:i + batch_rows]))
        out[i:i + batch_rows] = next_byte_entropy(logits).numpy()
    return out


class EntropyScorer:
    """Ray Data actor (`map_batches(EntropyScorer, concurrency=...)`): holds the entropy model and adds
    an `entropy` column beside a batch's `bytes`."""

    def __init__(self, export: str, threads: int = 1):
        from neuraflex_ray.checkpoint import load_exported
        from pipelines.text import load_tokenizer

        torch.set_num_threads(threads)
        self.model, _ = load_exported(export)
        self.to_model = model_ids(load_tokenizer(Path(export) / "tokenizer.json"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blocks = np.stack(batch["bytes"]) if batch["bytes"].dtype == object else batch["bytes"]
        return {**batch, "entropy": byte_entropies(self.model, self.to_model, blocks)}
