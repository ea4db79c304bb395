"""What a BLT costs: parameters (hashed n-gram tables included) and FLOPs per byte, for run summaries
and the benchmark (`models/blt.forward_flops` has the convention)."""

from __future__ import annotations

from typing import Any

import torch

from neuraflex_ray.config.blt import BLTConfig
from neuraflex_ray.models.blt import BLT, inference_flops_per_byte, patch_slots, train_flops_per_block


def param_count(cfg: BLTConfig) -> dict[str, int]:
    """{"total": every parameter, "hash_embeddings": the n-gram tables' share} (built on the meta device:
    no memory, no time)."""
    with torch.device("meta"):
        model = BLT(cfg)
    return {"total": sum(p.numel() for p in model.parameters()),
            "hash_embeddings": sum(p.numel() for p in model.embed.tables.parameters())}


def model_accounting(cfg: BLTConfig, block_bytes: int) -> dict[str, Any]:
    counts = param_count(cfg)
    return {
        "flops_per_byte": train_flops_per_block(cfg, block_bytes) / block_bytes,
        "infer_flops_per_byte": (inference_flops_per_byte(cfg, block_bytes, cfg.mean_patch_bytes)
                                 if cfg.mean_patch_bytes > 0 else None),
        "mean_patch_bytes": cfg.mean_patch_bytes,
        "patch_slots": patch_slots(cfg, block_bytes),
        "threshold": cfg.threshold,
        "params": counts["total"],
        "hash_embedding_params": counts["hash_embeddings"],
    }
