"""Speculative decoding inside the continuous-batching engine: draft k tokens cheaply, verify them in one pass.

A drafter proposes up to `k` next tokens for a sequence:

- `ngram` (prompt lookup): the longest suffix of the text so far (up to `ngram_max` tokens) that
  occurred earlier in it, and the k tokens that followed it then. Free; it pays off where text
  repeats (code, quotes, a greedy model looping).
- a draft model: another export with the same tokenizer (e.g. the `tiny` flavour trained by the same
  pipeline) decodes k tokens on its own KV cache, one row per engine slot.

The target model then scores [last token, d1 .. dk] in one forward pass into the sequence's slot of
the KV cache, and the standard rule keeps the target's distribution exactly (Leviathan et al. 2023;
Chen et al. 2023): d_i is accepted with probability min(1, p(d_i) / q(d_i)); at the first
rejection a token is drawn from norm(max(0, p - q)) and the rest are dropped; if all k pass, one
more token comes from the target's last position. A prompt-lookup draft is a point mass (q = 1 on
d_i). Greedy requests accept d_i exactly when it is the target's argmax, so their text is the text
plain decoding gives. Each verify step emits between 1 and k + 1 tokens for one target forward.

Cache entries written for rejected drafts sit past the sequence's end and are overwritten before any
query can see them (every read is masked to positions <= the query's). Sequences join and leave
between steps as in plain decoding; each live sequence verifies in its own forward, so its tokens
never depend on its batch-mates (at high concurrency plain batched decoding does more per second).
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import torch

from neuraflex_ray.models.moe_lm import MoELM, is_greedy, sampling_probs
from neuraflex_ray.serving.engine import LMEngine, Sequence, batch_invariant_experts


def ngram_draft(tokens: list[int], k: int, ngram_max: int = 3) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the longest suffix."""
    for n in range(min(ngram_max, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


class Speculator:
    """Drafts and verifies for an `LMEngine` (its `speculator`). `draft`: a draft model, or None for
    prompt lookup only; with both, the n-gram draft is used where it finds a match (it costs nothing)."""

    def __init__(self, k: int = 4, draft: MoELM | None = None, max_batch_size: int = 16, ngram: bool = True,
                 ngram_max: int = 3):
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        if draft is None and not ngram:
            raise ValueError("speculative decoding needs a drafter: a draft model, n-gram lookup, or both")
        self.k, self.ngram, self.ngram_max = k, ngram, ngram_max
        self.draft = draft.eval() if draft is not None else None
        self.draft_caches = draft.new_caches(max_batch_size) if draft is not None else None
        self.draft_len: dict[int, tuple[int, int]] = {}  # slot -> (id of its sequence, tokens cached)
        self.proposed = self.accepted = self.steps = 0
        self.recent: deque[float] = deque(maxlen=32)  # acceptance rate of the latest finished requests

    def method(self) -> str:
        return "+".join(m for m, on in (("ngram", self.ngram), ("draft_model", self.draft is not None)) if on)

    def report(self) -> dict[str, Any]:
        return {"method": self.method(), "k": self.k, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
                "tokens_per_step": None if not self.steps else (self.accepted + self.steps) / self.steps,
                "recent_requests": list(self.recent)}

    # ---- drafting ------------------------------------------------------------------------------

    def propose(self, seq: Sequence, room: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to min(k, room) draft tokens and, for a draft model, their distributions q [n, V]."""
        k = min(self.k, room)
        if k <= 0:
            return [], None
        tokens = seq.prompt + seq.out
        if self.ngram:
            found = ngram_draft(tokens, k, self.ngram_max)
            if found or self.draft is None:
                return found, None
        return self._draft_model(seq, tokens, k)

    def _draft_model(self, seq: Sequence, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor]:
        owner, cached = self.draft_len.get(seq.slot, (0, 0))
        cached = cached if owner == id(seq) else 0  # a new sequence in this slot starts over
        caches = [c.slot(seq.slot) for c in self.draft_caches]
        p = seq.params
        out, qs = [], []
        # Catch up on the tokens the draft has not seen (the prompt at first, then the accepted ones).
        feed = torch.tensor([tokens[cached:]], device=self.draft.tok_embeddings.weight.device)
        pos = cached
        for _ in range(k):
            logits, _ = self.draft(feed, caches, pos)
            pos += feed.shape[1]
            row = logits[0, -1]
            if is_greedy(p.temperature):
                tok = int(row.argmax())
                q = torch.nn.functional.one_hot(torch.tensor(tok), row.shape[-1]).float()
            else:
                q = sampling_probs(row, p.temperature, p.top_k, p.top_p)
                tok = int(torch.multinomial(q, 1, generator=seq.generator))
            out.append(tok)
            qs.append(q)
            feed = torch.tensor([[tok]], device=feed.device)
        self.draft_len[seq.slot] = (id(seq), pos)  # the last draft token's KV is not written
        return out, torch.stack(qs)

    # ---- verifying -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, engine: LMEngine, seq: Sequence) -> None:
        if seq.cancelled:
            return engine._retire(seq, None)
        n = len(seq.prompt) + len(seq.out)  # tokens so far; the last one's KV is not in the cache yet
        room = min(seq.params.max_tokens - len(seq.out) - 1, engine.max_len - n)
        drafts, q = self.propose(seq, room)
        ids = torch.tensor([[seq.out[-1], *drafts]], device=engine.device)
        with engine.adapter(seq.params.adapter), (batch_invariant_experts(engine.model) if engine.batch_invariant
                                                  else contextlib.nullcontext()):
            logits, _ = engine.model(ids, [c.slot(seq.slot) for c in engine.caches], n - 1)
        logits = logits[0]
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the model produced non-finite logits")
        accepted = self._accept(engine, seq, drafts, q, logits)
        self.steps += 1
        self.proposed += len(drafts)
        self.accepted += accepted
        seq.spec_proposed += len(drafts)
        seq.spec_accepted += accepted
        if seq.slot in self.draft_len and self.draft_len[seq.slot][0] == id(seq):
            owner, cached = self.draft_len[seq.slot]
            self.draft_len[seq.slot] = (owner, min(cached, n + accepted))  # drop what the target rejected

    def _accept(self, engine: LMEngine, seq: Sequence, drafts: list[int], q: torch.Tensor | None,
                logits: torch.Tensor) -> int:
        """Emit the accepted drafts and one token from the target; returns how many drafts were accepted."""
        p = seq.params
        for i, d in enumerate(drafts):
            row = logits[i]
            if is_greedy(p.temperature):
                target = int(row.argmax())
                if target != d:
                    self._emit(engine, seq, target, row)
                    return i
            else:
                probs = sampling_probs(row, p.temperature, p.top_k, p.top_p)
                qd = float(q[i, d]) if q is not None else 1.0
                u = float(torch.rand((), generator=seq.generator))
                if u >= min(1.0, float(probs[d]) / qd):
                    residual = (probs - (q[i] if q is not None else _one_hot(d, probs))).clamp(min=0)
                    total = float(residual.sum())
                    residual = residual / total if total > 0 else probs
                    self._emit(engine, seq, int(torch.multinomial(residual, 1, generator=seq.generator)), row)
                    return i
            if not self._emit(engine, seq, d, row):
                return i + 1
        # Every draft passed: the target's own next token comes free from the last position.
        last = logits[len(drafts)]
        if is_greedy(p.temperature):
            tok = int(last.argmax())
        else:
            tok = int(torch.multinomial(sampling_probs(last, p.temperature, p.top_k, p.top_p), 1,
                                        generator=seq.generator))
        self._emit(engine, seq, tok, last)
        return len(drafts)

    def _emit(self, engine: LMEngine, seq: Sequence, tok: int, row: torch.Tensor) -> bool:
        alive = engine.emit_token(seq, tok, row)
        if not alive and seq.spec_proposed:
            self.recent.append(seq.spec_accepted / seq.spec_proposed)
        return alive


def _one_hot(i: int, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    out[i] = 1.0
    return out
