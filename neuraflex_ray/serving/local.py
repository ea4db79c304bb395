"""Text from an LM export in this process, without Serve: the CLI's `generate` and the quickstart's sample."""

from __future__ import annotations

from pathlib import Path

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.models.moe_lm import generate
from pipelines.text import EOS, load_tokenizer


def generate_text(export_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    """A completion of `prompt` (greedy unless temperature > 0), stopping at the end-of-document token."""
    model, _ = load_exported(export_dir)
    tok = load_tokenizer(str(Path(export_dir) / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids = generate(model, tok.encode(prompt).ids, max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_ids=(eos,) if eos is not None else (), seed=seed)
    return tok.decode(ids)
