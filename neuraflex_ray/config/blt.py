"""The byte-level (BLT) family's sections: the Byte Latent Transformer and its byte data.

`BLTConfig` is the model (`neuraflex_ray/models/blt.py`): local encoder and decoder over bytes, and a
global transformer over patches whose section is a NeuralFlex-MoE `ModelConfig` (the same MoE blocks,
routers and dense option). `ByteDataConfig` is its data: a corpus the text pipeline reads becomes byte
blocks, and a trained byte-level LM's per-byte entropies are written beside them
(`neuraflex_ray/families/blt/data.py`). The family itself is being built (issue 26).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neuraflex_ray.config.lm import ModelConfig


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
    global_model: ModelConfig = field(default_factory=_global_default)  # its vocab_size is unused
    norm_eps: float = 1e-5
    init_std: float = 0.02


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
