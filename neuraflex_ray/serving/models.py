"""The models a Serve replica holds: an LM with its engine and tokenizer, or a NeuroFM predictor.

`resolve_models` checks export directories before any replica starts; `load_model` loads one
export onto the replica's device. The routes that use them are in `serving/app.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.models.moe_lm import param_counts
from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving.engine import LMEngine
from neuraflex_ray.serving.errors import RequestError
from pipelines.text import EOS, load_tokenizer

DEFAULT_NAMES = {"moe_lm": "neuraflex-moe", "neurofm": "neurofm"}




@dataclass
class LMModel:
    name: str
    path: Path
    meta: dict[str, Any]
    engine: LMEngine
    tokenizer: Any
    eos: int | None

    @property
    def context(self) -> int:
        return self.engine.max_len

    def encode(self, prompt: str | list[int], field: str) -> list[int]:
        vocab = self.engine.model.cfg.vocab_size
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids
        else:
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{field}: token ids must be in [0, {vocab}), got {bad[:5]}", field)
            ids = list(prompt)
        ids = ids or ([self.eos] if self.eos is not None else [])  # an empty prompt starts a new document
        if not ids:
            raise RequestError(f"{field} must not be empty", field)
        if len(ids) >= self.context:
            raise RequestError(f"{field} is {len(ids)} tokens; this model's context window is {self.context} tokens "
                               f"and generation needs at least one more: shorten it", field,
                               code="context_length_exceeded")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def card(self) -> dict[str, Any]:
        cfg = self.engine.model.cfg
        return {"model_type": "moe_lm", "config": self.meta["model"], "context_length": cfg.max_seq_len,
                "parameters": param_counts(cfg), "tokenizer": {"vocab_size": self.tokenizer.get_vocab_size(),
                                                               "eos": EOS if self.eos is not None else None},
                "chat_template": oai.apply_chat_template([{"role": "user", "content": "{content}"}]),
                "serving": {"max_batch_size": self.engine.max_batch_size, "kv_cache": self.engine.kv_cache,
                            "batch_invariant": self.engine.batch_invariant,
                            "device": str(self.engine.device), "dtype": str(self.engine.model.output.weight.dtype)}}


@dataclass
class NeuroModel:
    name: str
    path: Path
    meta: dict[str, Any]
    predictor: Any  # neuro.NeuroPredictor

    def card(self) -> dict[str, Any]:
        from neuraflex_ray.serving.neuro import card

        return {"model_type": "neurofm", **card(self.meta)}


def resolve_models(models: dict[str, str] | list[str] | str) -> dict[str, Path]:
    """{name: export dir}; a bare path (or list of them) is named after its model type."""
    if isinstance(models, str):
        models = [models]
    if isinstance(models, dict):
        out = {name: Path(p).expanduser().resolve() for name, p in models.items()}
        for path in out.values():
            _model_type(path)  # checks it is an export
    else:
        out = {}
        for p in models:
            path = Path(p).expanduser().resolve()
            name = DEFAULT_NAMES.get(_model_type(path), "model")
            if name in out:
                raise ValueError(f"models: two {name} exports; give them names ({{name: path}})")
            out[name] = path
    if not out:
        raise ValueError("models: give at least one export directory")
    return out


def _model_type(path: Path) -> str:
    cfg = path / "config.json"
    if not (path / "model.safetensors").is_file() or not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a model export (model.safetensors + config.json): pass the directory "
                                f"`neuraflex-ray export` or `quickstart` wrote (<run dir>/export)")
    return json.loads(cfg.read_text()).get("model_type", "moe_lm")


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_model(name: str, path: Path, max_batch_size: int = 16, kv_cache: bool = True, device: str = "auto",
               batch_invariant: bool = True) -> LMModel | NeuroModel:
    dev = _device(device)
    model, meta = load_exported(path, device=dev)
    if meta.get("model_type") == "neurofm":
        from neuraflex_ray.serving.neuro import NeuroPredictor

        return NeuroModel(name, path, meta, NeuroPredictor(model, meta))
    if dev.startswith("cuda"):
        # Decode is memory-bound: bf16 weights, half the bytes per step. Parameters only: the rotary
        # tables stay fp32 (in bf16 an angle at position 2000 keeps ~3 digits).
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    tok = load_tokenizer(path / "tokenizer.json")
    engine = LMEngine(model, max_batch_size, kv_cache, batch_invariant)
    return LMModel(name, path, meta, engine, tok, tok.token_to_id(EOS))
