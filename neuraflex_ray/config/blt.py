"""The byte-level (BLT) family's sections: the Byte Latent Transformer and its byte data.

`BLTConfig` is the model (`neuraflex_ray/models/blt.py`): local encoder and decoder over bytes, and a
global transformer over patches whose section is a NeuralFlex-MoE `ModelConfig` (the same MoE blocks,
routers and dense option). `ByteDataConfig` is its data: a corpus the text pipeline reads becomes byte
blocks, and a trained byte-level LM's per-byte entropies are written beside them
(`neuraflex_ray/families/blt/data.py`). The family is `neuraflex_ray/families/blt/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neuraflex_ray.config.lm import MODEL_FLAVOURS, ModelConfig


def _global_default() -> ModelConfig:
    return ModelConfig(flavour="debug", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2,
                       expert_ffn_dim=256, dense_ffn_dim=512, max_seq_len=256)


@dataclass
class BLTConfig:
    """Byte Latent Transformer. Widths of the local parts are `dim`; the global part is `global_model`."""

    flavour: str = "debug"
    dim: int = 64  # local encoder and decoder width
    n_heads: int = 4  # local attention heads (also the cross-attentions')
    encoder_layers: int = 1
    decoder_layers: int = 2
    local_ffn_dim: int = 256
    hash_ngrams: list[int] = field(default_factory=lambda: [3, 4, 5, 6])  # n-grams ending at each byte
    hash_buckets: int = 4096  # rows of each n-gram's hashed embedding table
    max_seq_len: int = 512  # bytes of context
    # Patching (models/blt_patching.py): entropy | static | space. patch_size: the target mean bytes per
    # patch (static: exactly); threshold: entropy mode's cut (0: fitted to patch_size on the training split).
    patching: str = "entropy"
    patch_size: float = 4.0
    threshold: float = 0.0
    monotonic: bool = False
    min_patch_bytes: int = 2  # bounds a block's patches to ceil(bytes / min_patch_bytes), the padded count
    # Bytes per patch measured on the training split with the rule above (filled in from the data before
    # training, recorded in the checkpoint and the export; 0 until then).
    mean_patch_bytes: float = 0.0
    global_model: ModelConfig = field(default_factory=_global_default)  # its vocab_size is unused
    norm_eps: float = 1e-5
    init_std: float = 0.02


# Presets. `tiny` is for tests; `debug` trains in minutes on 2 CPU cores; `small` is a single-GPU model
# whose global transformer is NeuralFlex-MoE's `small`. A flavour's `global_model` is merged key by key
# with the YAML's, so `model.global_model.n_layers=2` changes one number.
BLT_FLAVOURS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=32, n_heads=2, encoder_layers=1, decoder_layers=1, local_ffn_dim=64, hash_ngrams=[3, 4],
                 hash_buckets=512, max_seq_len=256,
                 global_model=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2,
                                   expert_ffn_dim=64, dense_ffn_dim=128, max_seq_len=256)),
    "debug": {},
    "small": dict(dim=256, n_heads=8, encoder_layers=1, decoder_layers=4, local_ffn_dim=1024, hash_buckets=65536,
                  max_seq_len=2048, global_model={**MODEL_FLAVOURS["small"], "flavour": "small"}),
}


@dataclass
class ByteDataConfig:
    """Where the bytes come from (as the text pipeline's `data.source`) and how they are cut and scored."""

    source: str = "stdlib"  # stdlib, kjv, a local file / directory / glob, or a remote URI (as DataConfig)
    text_field: str = "text"  # column / JSON key that holds the text for .jsonl and .parquet
    block_bytes: int = 256  # bytes a block is trained on; blocks hold block_bytes + 1 (the last is a target)
    val_fraction: float = 0.05  # share of documents held out (split by document, deterministic)
    min_val_documents: int = 0  # hold out at least this many documents (held-out figures need enough of them)
    max_bytes: int = 0  # cap on the corpus size in bytes (0: no cap)
    # The byte-level LM whose entropy of each byte (given the bytes before it) is written beside the
    # bytes: `train` (a stage before the bytes are scored: an moe_lm of entropy_flavour trained for
    # entropy_steps on this corpus one byte per token, on the same Ray Train loop, kept under
    # <output_dir>/entropy), or the path of such an export (data.vocab_size=257). Empty: bytes only.
    entropy_model: str = ""
    entropy_flavour: str = "tiny"  # `train`: its NeuralFlex-MoE flavour
    entropy_steps: int = 300  # `train`: its optimizer steps (2 workers, DeepSpeed EP, micro-batches of 8)
    entropy_actors: int = 1  # Ray Data actors that hold the entropy model (each scores whole batches)
    output_dir: str = "data/bytes"  # Parquet shards + manifest.json go here
    seed: int = 0
