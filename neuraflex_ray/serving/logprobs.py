"""How sure the model is about each token: log-probabilities, entropy and calibrated confidence.

The engine scores a token only when its request asks (logprobs, echo, best_of, uncertainty): one
log-softmax over the vocabulary per token. Two distributions are involved, on purpose:

- `logprob` and `top` are the model's raw next-token distribution (temperature 1, no top-k/top-p),
  what OpenAI's and vLLM's `logprobs` report and what evaluation tools sum into log-likelihoods.
- `entropy` and `confidence` use the distribution divided by the *calibration temperature* fitted on
  the validation split when the model was exported (eval/calibration.py). `confidence` is the
  probability of the most likely token: after calibration, tokens reported at confidence 0.7 are
  the model's top prediction about 70% of the time on held-out text.

The OpenAI shapes are built here too: completions' `{tokens, token_logprobs, top_logprobs,
text_offset}` and chat's `{content: [{token, logprob, bytes, top_logprobs}]}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from pipelines.text import byte_level_chars


@dataclass(frozen=True)
class TokenScore:
    logprob: float  # log p(token), the raw model distribution
    top: tuple[tuple[int, float], ...]  # the n most likely (id, logprob), most likely first
    entropy: float  # nats, of the calibrated distribution
    confidence: float  # calibrated probability of the most likely token


def score(logits: torch.Tensor, tokens: torch.Tensor, n_top: int, temperature: float = 1.0) -> list[TokenScore]:
    """logits [T, V] at the positions that predicted `tokens` [T] -> one score per token."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    cal = torch.log_softmax(logits.float() / temperature, dim=-1) if temperature != 1.0 else logp
    entropy = (-(cal.exp() * cal).sum(-1)).tolist()
    confidence = cal.max(-1).values.exp().tolist()
    if n_top > 0:
        values, ids = logp.topk(min(n_top, logp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [TokenScore(c, t, e, f) for c, t, e, f in zip(chosen, tops, entropy, confidence, strict=True)]


def mean_logprob(scores: list[TokenScore]) -> float:
    """What best_of ranks samples by (an empty completion ranks last)."""
    return sum(s.logprob for s in scores) / len(scores) if scores else -math.inf


# ---------------------------------------------------------------------------------------------
# Token text: byte-level BPE tokens can hold part of a UTF-8 character
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's)."""
    return {c: b for b, c in byte_level_chars().items()}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    table = _byte_of_char()
    piece = tokenizer.id_to_token(token_id) or ""
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return piece.encode()  # a special token (e.g. <|endoftext|>): its own text


def token_text(tokenizer: Any, token_id: int) -> str:
    """The token as text; one that is not whole UTF-8 is written `bytes:\\xNN...`, as OpenAI does."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# ---------------------------------------------------------------------------------------------
# OpenAI's shapes
# ---------------------------------------------------------------------------------------------


def completion_logprobs(tokenizer: Any, ids: list[int], scores: list[TokenScore | None], start_offset: int,
                        n_top: int) -> dict[str, Any]:
    """Completions' logprobs object for tokens `ids` whose text starts at `start_offset` characters.

    A None score is the first prompt token under echo (nothing predicts it): null logprob and top.
    """
    tokens = [token_text(tokenizer, i) for i in ids]
    # Where each token starts in the decoded text (a character split across tokens belongs to the
    # token that completes it).
    prefixes = tokenizer.decode_batch([ids[:k] for k in range(len(ids))]) if ids else []
    offsets = [start_offset + len(p.rstrip("\ufffd")) for p in prefixes]
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to
    # logprobs+1 elements" in each top_logprobs entry.
    top = [None if s is None else {**{token_text(tokenizer, t): lp for t, lp in s.top[:n_top]}, tok: s.logprob}
           for tok, s in zip(tokens, scores, strict=True)]
    return {"tokens": tokens, "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, ids: list[int], scores: list[TokenScore], n_top: int) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(token_bytes(tokenizer, token_id))}

    return {"content": [{**entry(i, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top[:n_top]]}
                        for i, s in zip(ids, scores, strict=True)]}


def uncertainty(scores: list[TokenScore], temperature: float, threshold: float | None,
                stopped_low: bool) -> dict[str, Any]:
    """The `uncertainty` extension of a choice: per-token entropy and confidence, and the sequence's
    confidence (the mean of its tokens' confidences; 1.0 for an empty completion)."""
    conf = [s.confidence for s in scores]
    out: dict[str, Any] = {"token_entropy": [s.entropy for s in scores], "token_confidence": conf,
                           "confidence": sum(conf) / len(conf) if conf else 1.0,
                           "calibration_temperature": temperature}
    if threshold is not None:
        out["threshold"] = threshold
        out["low_confidence_tokens"] = [i for i, c in enumerate(conf) if c < threshold]
        out["stopped_low_confidence"] = stopped_low
    return out
