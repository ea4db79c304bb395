"""An untrained NeuralFlex-MoE export, for API tests and load benchmarks where only the wire format
and the speed matter, not what the model says. Its tokenizer is a real byte-level BPE trained in
a second on a slice of the running Python's standard library."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import write_export
from neuraflex_ray.config import ModelConfig, model_for_data
from neuraflex_ray.models.moe_lm import MoELM


def scratch_lm_export(out_dir: str | Path, vocab_size: int = 512, seed: int = 0, **model: Any) -> Path:
    """Write an export of a randomly initialised model (`model` overrides ModelConfig fields)."""
    from neuraflex_ray.families.moe_lm import FAMILY
    from pipelines.text import train_bpe

    files = sorted(Path(os.__file__).parent.glob("*.py"))[:40]
    tok = train_bpe(iter([[f.read_text(errors="replace") for f in files]]), vocab_size)
    cfg = model_for_data(ModelConfig(**model), {"vocab_size": tok.get_vocab_size()})
    torch.manual_seed(seed)
    net = MoELM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        return write_export(net.state_dict(), cfg, FAMILY.name, out_dir,
                            {"source_checkpoint": None, "note": "untrained (scratch_lm_export)"},
                            files={"tokenizer.json": Path(tmp) / "tokenizer.json"})
