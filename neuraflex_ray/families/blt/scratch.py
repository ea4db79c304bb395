"""An untrained BLT export with an untrained entropy model beside it, for API tests where only the wire
format matters: what it says is noise, but its patches, caches and routes are the real ones."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import write_export
from neuraflex_ray.config import build
from neuraflex_ray.config.blt import BLT_FLAVOURS, BLTConfig
from neuraflex_ray.families.blt import ENTROPY_DIR, FAMILY
from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.models.blt import BLT


def scratch_blt_export(out_dir: str | Path, seed: int = 0, **model: Any) -> Path:
    """The `tiny` flavour with entropy patching (`model` overrides its fields); the entropy model is an
    untrained byte-level NeuralFlex-MoE, so its entropies sit near ln 257 and the threshold is set there."""
    raw = {**BLT_FLAVOURS["tiny"], "patching": "entropy", "threshold": 5.5, "mean_patch_bytes": 2.0, **model}
    cfg = build(BLTConfig, raw, "model.")
    torch.manual_seed(seed)
    net = BLT(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        entropy = scratch_lm_export(Path(tmp) / "entropy", vocab_size=257, seed=seed, dim=32, n_layers=1, n_heads=2,
                                    n_kv_heads=1, num_experts=0, dense_ffn_dim=64, max_seq_len=cfg.max_seq_len + 1)
        files = {f"{ENTROPY_DIR}/{name}": entropy / name for name in ("model.safetensors", "config.json",
                                                                      "tokenizer.json")}
        return write_export(net.state_dict(), cfg, FAMILY.name, out_dir,
                            {"source_checkpoint": None, "note": "untrained (scratch_blt_export)",
                             "entropy_model": ENTROPY_DIR}, files=files)
