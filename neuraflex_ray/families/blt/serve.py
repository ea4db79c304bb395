"""The BLT behind the OpenAI-compatible routes: a token is a byte.

`ByteTokenizer` gives the routes the tokenizer interface they use (encode, decode, id <-> token) with
ids 0-255 for bytes and 256 for <|endoftext|>, so logprobs, echo, stop strings and streaming work as
they do for the BPE model; the text stream holds back a trailing partial UTF-8 character until its
last byte arrives (`serving/openai_api.TextStream`), so a streamed delta never splits one.

`BLTEngine` is a slot engine (`serving/engine.SlotEngine`) whose sequences each hold a `BLTGenerator`
(every part cached, patches decided by the entropy model as bytes arrive); a step advances every live
sequence by one byte, one after another. A prompt starts with <|endoftext|>: the model continues a
document, as it was trained to.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.families.blt.accounting import param_count
from neuraflex_ray.families.blt.entropy import model_ids
from neuraflex_ray.models.blt_generate import BLTGenerator, CachedEntropy, generate_bytes
from neuraflex_ray.models.blt_patching import EOS, N_IDS
from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving.engine import Sequence, SlotEngine
from neuraflex_ray.serving.errors import RequestError
from neuraflex_ray.serving.logprobs import score
from neuraflex_ray.serving.models import LMModel, ServeOptions, replica_device
from pipelines.text import EOS as EOS_TEXT
from pipelines.text import byte_level_chars, load_tokenizer


@dataclasses.dataclass
class Encoding:
    ids: list[int]


class ByteTokenizer:
    """Bytes as tokens, in the Hugging Face tokenizer interface the routes call."""

    def __init__(self) -> None:
        table = byte_level_chars()
        self._tokens = [table[b] for b in range(256)] + [EOS_TEXT]  # GPT-2's printable stand-ins for bytes

    def encode(self, text: str) -> Encoding:
        return Encoding(list(text.encode("utf-8")))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")  # <|endoftext|> is skipped

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def get_vocab_size(self) -> int:
        return N_IDS

    def token_to_id(self, token: str) -> int | None:
        return self._tokens.index(token) if token in self._tokens else None

    def id_to_token(self, i: int) -> str | None:
        return self._tokens[i] if 0 <= i < N_IDS else None


class BLTEngine(SlotEngine):
    def __init__(self, model: torch.nn.Module, entropy: tuple[torch.nn.Module, Any] | None, max_batch_size: int):
        self.model, self.entropy = model.eval(), entropy
        super().__init__(max_batch_size, self.generator().max_len, N_IDS, model.output.weight.device)
        self._start()

    def generator(self) -> BLTGenerator:
        """A new sequence's generator (its caches are allocated by its reset)."""
        entropy = CachedEntropy(*self.entropy) if self.entropy is not None else None
        return BLTGenerator(self.model, entropy)

    def _prefill(self, seq: Sequence) -> None:
        gen = seq.state = self.generator()
        logits = [gen.reset()]  # it fed the <|endoftext|> every prompt starts with
        for b in seq.prompt[1:]:
            logits.append(gen.feed(b))
        if seq.params.prompt_scores:
            ids = torch.tensor(seq.prompt[1:], device=self.device)
            seq.prompt_scores = [None, *score(torch.stack(logits[:-1]), ids, seq.params.n_top)] if len(ids) else [None]
        if seq.params.max_tokens == 0:
            self._retire(seq, "length")
            return
        self._take(seq, logits[-1])

    def _step(self) -> None:
        live = [s for s in self.slots if s is not None]
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(live))
        for seq in live:
            try:
                self._take(seq, seq.state.feed(seq.out[-1]))
            except Exception as e:  # noqa: BLE001 - that request fails, the others go on
                self._fail(seq, e)
        self.stats["steps"] += 1

    def _free(self, seq: Sequence) -> None:
        super()._free(seq)
        seq.state = None  # its caches


@dataclasses.dataclass
class BLTModel(LMModel):
    tokenizer_class: str = "bytes: ids 0-255 are UTF-8 bytes, 256 is <|endoftext|> (no tokenizer)"
    token_unit: str = "byte"

    def encode(self, prompt: str | list[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            ids = list(prompt.encode("utf-8"))
        else:
            bad = [t for t in prompt if not 0 <= t <= EOS]
            if bad:
                raise RequestError(f"{field}: a token of this model is a byte: ids must be in [0, {EOS}] (256 is "
                                   f"<|endoftext|>), got {bad[:5]}", field)
            ids = list(prompt)
        ids = [EOS, *ids[1:]] if ids[:1] == [EOS] else [EOS, *ids]  # every prompt continues a document
        if len(ids) >= self.context:
            raise RequestError(f"{field} is {len(ids) - 1} bytes; this model's context window is {self.context - 1} "
                               f"bytes and generation needs at least one more: shorten it", field,
                               code="context_length_exceeded")
        return ids

    def card(self) -> dict[str, Any]:
        cfg = self.engine.model.cfg
        return {"model_type": self.meta["model_type"], "config": self.meta["model"], "context_length": self.context,
                "parameters": param_count(cfg), "tokenizer": {"unit": "byte", "vocab_size": N_IDS, "eos": EOS_TEXT},
                "patching": {"mode": cfg.patching, "threshold": cfg.threshold, "mean_patch_bytes": cfg.mean_patch_bytes,
                             "entropy_model": self.meta.get("entropy_model") or None},
                "chat_template": oai.apply_chat_template([{"role": "user", "content": "{content}"}]),
                "serving": {"max_batch_size": self.engine.max_batch_size, "kv_cache": True, "batch_invariant": True,
                            "quantization": None, "speculative": None, "device": str(self.engine.device)}}


def load_parts(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(BLT, (entropy model, its byte -> id table) or None, config.json) of an export, on `device`."""
    model, meta = load_exported(path, device=device)
    entropy = None
    if meta.get("entropy_model"):
        entropy_dir = Path(path) / meta["entropy_model"]
        entropy_lm, _ = load_exported(entropy_dir, device=device)
        entropy = (entropy_lm, model_ids(load_tokenizer(entropy_dir / "tokenizer.json")))
    return model, entropy, meta


def load_blt(name: str, path: Path, options: ServeOptions) -> BLTModel:
    """A BLT export and its entropy model on the replica's device. Of the LM engine's options only
    max_batch_size applies (how many requests decode side by side); continuous batching of one forward,
    quantisation, speculation and adapters are the BPE model's: a BLT sequence decodes byte by byte on
    its own caches."""
    model, entropy, meta = load_parts(path, replica_device(options.device))
    return BLTModel(name, path, meta, BLTEngine(model, entropy, options.max_batch_size), ByteTokenizer(), EOS)


def generate_text(export_dir: Path, prompt: str, max_new_bytes: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0) -> str:
    """A completion of `prompt` in this process (stops at <|endoftext|>); a character the byte budget cut
    short is dropped."""
    model, entropy, _ = load_parts(export_dir)
    gen = BLTGenerator(model, CachedEntropy(*entropy) if entropy is not None else None)
    out = bytes(b for b, _ in generate_bytes(gen, prompt.encode("utf-8"), max_new_bytes, temperature=temperature,
                                              top_k=top_k, top_p=top_p, seed=seed))
    return out.decode("utf-8", errors="ignore")
