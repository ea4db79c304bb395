"""NeuralFlex-MoE's config checks: the model section against the text data and the DeepSpeed layout."""

from __future__ import annotations

from neuraflex_ray.config import JobConfig, ModelConfig, TrainConfig
from neuraflex_ray.config.validate import need
from neuraflex_ray.models.routers import ROUTERS
from neuraflex_ray.models.titans import MEMORY_DEPTHS

MEMORIES = ("none", "titans")
MEMORY_VARIANTS = ("mag",)


def validate_moe_lm(cfg: JobConfig, world: int) -> None:
    """NeuralFlex-MoE's model and text data sections, for a world of `world` ranks."""
    m, d = cfg.model, cfg.data
    validate_moe_model(m, "model.")
    need(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = from the tokenizer), got {m.vocab_size}")
    need(d.seq_len > 0, f"data.seq_len must be > 0 (got {d.seq_len})")
    need(d.seq_len <= m.max_seq_len,
         f"data.seq_len={d.seq_len} is over the model's maximum model.max_seq_len={m.max_seq_len}; "
         f"lower data.seq_len or raise model.max_seq_len")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.min_val_documents >= 0, f"data.min_val_documents must be >= 0 (0: data.val_fraction alone), got "
                                   f"{d.min_val_documents}")
    # 257 = the 256 byte values + <|endoftext|>: a byte-level model with no merges (a BLT's entropy model).
    need(d.vocab_size >= 257, f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE: use >= 257 "
                              f"(257: one token per byte)")
    validate_expert_layout(m, cfg.train, world, "model.")


def validate_moe_model(m: ModelConfig, prefix: str) -> None:
    """A NeuralFlex-MoE stack's own fields (`prefix`: where the section sits, e.g. model.global_model.)."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "top_k", "expert_ffn_dim", "max_seq_len", "moe_every",
                 "sinkhorn_iters"):
        need(getattr(m, name) > 0, f"{prefix}{name} must be > 0 (got {getattr(m, name)})")
    need(m.num_experts >= 0, f"{prefix}num_experts must be >= 0 (0: the dense baseline), got {m.num_experts}")
    need(m.router in ROUTERS, f"{prefix}router={m.router!r} is not known; use one of {list(ROUTERS)}")
    need(m.balance_bias_rate >= 0, f"{prefix}balance_bias_rate must be >= 0 (got {m.balance_bias_rate})")
    need(m.dim % m.n_heads == 0, f"{prefix}dim={m.dim} must be divisible by {prefix}n_heads={m.n_heads}")
    need((m.dim // m.n_heads) % 2 == 0,
         f"{prefix}dim/{prefix}n_heads={m.dim // m.n_heads} must be even for rotary positions")
    need(m.n_heads % m.n_kv_heads == 0,
         f"{prefix}n_heads={m.n_heads} must be divisible by {prefix}n_kv_heads={m.n_kv_heads} (grouped-query attention)")
    need(m.num_experts == 0 or m.top_k <= m.num_experts,
         f"{prefix}top_k={m.top_k} is larger than {prefix}num_experts={m.num_experts}; set {prefix}top_k <= "
         f"{m.num_experts}")
    need(m.capacity_factor > 0, f"{prefix}capacity_factor must be > 0 (got {m.capacity_factor})")
    validate_long_context(m, prefix)


def validate_long_context(m: ModelConfig, prefix: str) -> None:
    """The attention window and the Titans memory."""
    need(m.attn_window >= 0, f"{prefix}attn_window must be >= 0 (0: full causal attention), got {m.attn_window}")
    need(m.memory in MEMORIES, f"{prefix}memory={m.memory!r} is not known; use one of {list(MEMORIES)}")
    if m.memory == "none":
        return
    need(m.memory_variant in MEMORY_VARIANTS,
         f"{prefix}memory_variant={m.memory_variant!r} is not built; use one of {list(MEMORY_VARIANTS)}")
    need(m.memory_chunk > 0, f"{prefix}memory_chunk must be > 0 (got {m.memory_chunk})")
    need(m.memory_depth in MEMORY_DEPTHS, f"{prefix}memory_depth={m.memory_depth} is not built; use one of "
                                          f"{list(MEMORY_DEPTHS)}")


def validate_expert_layout(m: ModelConfig, t: TrainConfig, world: int, prefix: str) -> None:
    """The experts of a NeuralFlex-MoE stack laid out over `world` ranks by DeepSpeed (train.ep_size)."""
    need(t.ep_size >= 1, f"train.ep_size must be >= 1 (got {t.ep_size})")
    need(m.num_experts > 0 or t.ep_size == 1,
         f"train.ep_size={t.ep_size} with {prefix}num_experts=0: the dense baseline has no experts to shard; "
         f"set train.ep_size=1")
    need(m.num_experts % t.ep_size == 0,
         f"{prefix}num_experts={m.num_experts} is not divisible by train.ep_size={t.ep_size}; "
         f"choose train.ep_size among {[e for e in range(1, m.num_experts + 1) if m.num_experts % e == 0]}")
    need(world % t.ep_size == 0,
         f"the world size train.num_workers={world} is not divisible by train.ep_size={t.ep_size}; "
         f"set train.ep_size to a divisor of {world}")
    need(t.zero_stage in (0, 1, 2),
         f"train.zero_stage={t.zero_stage}: DeepSpeed MoE supports ZeRO stages 0, 1 and 2 (stage 3 is refused); use 2")
