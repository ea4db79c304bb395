"""BLT generation one byte at a time, every part cached, patches decided as the bytes arrive.

Each new byte x_t costs one step of each part, never a pass over the context:

    entropy model (KV cache)   x_t -> the entropy of byte t+1's prediction -> does byte t+1 start a patch?
    local encoder (KV cache)   x_t and the n-grams ending at it -> h_t
    if byte t+1 starts one:    pool the bytes of the patch that x_t closes -> one global step (KV cache)
    reading                    h_t attends to the start state and every closed patch
    local decoder (KV cache)   -> logits for byte t+1

This is the whole-block forward (`BLT.forward`) unrolled: the start flag of byte t+1 is known before
byte t+1 exists under every patching rule, so position t sees exactly the patches it sees in
training, and the logits equal those of a full recomputation (tests/test_blt_generate.py).

A sequence starts with EOS (256): generation continues a document, as blocks in training follow the
<|endoftext|> of the document before them. One generator holds one sequence (batch of one).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from neuraflex_ray.models.blt import BLT, patch_slots
from neuraflex_ray.models.blt_patching import EOS, next_byte_entropy, raw_starts
from neuraflex_ray.models.moe_lm import KVCache, MoELM, sample_next


def _caches(n_layers: int, batch: int, n_kv_heads: int, length: int, head_dim: int, like: torch.Tensor) -> list[KVCache]:
    return [KVCache.empty(batch, n_kv_heads, length, head_dim, like.dtype, like.device) for _ in range(n_layers)]


class CachedEntropy:
    """The entropy model one byte at a time: the entropy (nats) of its prediction of the next byte,
    over the 257 byte ids, from the same start token and context as `families/blt/entropy.byte_entropies`."""

    def __init__(self, model: MoELM, to_model: np.ndarray):
        self.model, self.to_model = model.eval(), np.asarray(to_model)

    def reset(self) -> float:
        """Start a sequence: the entropy of byte 0 (given only the start token)."""
        self.caches, self.pos = self.model.new_caches(1), 0
        return self._step(EOS)

    def feed(self, byte: int) -> float:
        """Byte t arrives: the entropy of byte t+1."""
        return self._step(byte)

    def _step(self, raw: int) -> float:
        ids = torch.tensor([[int(self.to_model[raw])]], device=self.model.output.weight.device)
        logits, _ = self.model(ids, self.caches, self.pos)
        self.pos += 1
        return float(next_byte_entropy(logits[0, -1]))


class BLTGenerator:
    """One sequence's incremental state. `reset()` starts a sequence (EOS fed: it returns the logits of
    byte 1); `feed(byte)` appends a byte and returns the logits [257] of the next."""

    def __init__(self, model: BLT, entropy: CachedEntropy | None = None, max_len: int | None = None):
        cfg = model.cfg
        if cfg.patching == "entropy" and entropy is None:
            raise ValueError("entropy patching needs the entropy model (the export's entropy_model/)")
        self.model, self.cfg, self.entropy = model.eval(), cfg, entropy
        # The context: the model's, and the entropy model's less the start token it reads first.
        limits = [max_len or cfg.max_seq_len, cfg.max_seq_len]
        if entropy is not None:
            limits.append(entropy.model.cfg.max_seq_len - 1)
        self.max_len = min(limits)

    @torch.no_grad()
    def reset(self) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        like = m.output.weight
        g = cfg.global_model
        hd = cfg.dim // cfg.n_heads
        self.enc = _caches(cfg.encoder_layers, 1, cfg.n_heads, self.max_len, hd, like)
        self.dec = _caches(cfg.decoder_layers, 1, cfg.n_heads, self.max_len, hd, like)
        self.glob = _caches(g.n_layers, 1, g.n_kv_heads, patch_slots(cfg, self.max_len), g.dim // g.n_heads, like)
        self.h = like.new_zeros(1, self.max_len, cfg.dim)  # encoder states: a patch is pooled from them
        self.keys = [m.start.detach()]  # [1, 1, g] each: what the reading attends to (start, closed patches)
        self.bytes: list[int] = []
        self.entropies = [self.entropy.reset()] if self.entropy is not None else []
        self.patch_start = 0  # first byte of the open patch
        self.starts = [True]
        return self.feed(EOS)

    @property
    def length(self) -> int:
        return len(self.bytes)

    def _next_start(self) -> bool:
        """Whether byte t+1 starts a patch: the rule over the history, then the minimum patch length."""
        cfg, t1 = self.cfg, len(self.bytes)
        ids = torch.tensor([[*self.bytes, 0]])  # byte t+1 itself is not known (and never read by a rule)
        h = torch.tensor([self.entropies]) if self.entropies else None
        raw = raw_starts(ids, h, cfg.patching, threshold=cfg.threshold, size=max(1, round(cfg.patch_size)),
                         monotonic=cfg.monotonic)
        return bool(raw[0, -1]) and t1 - self.patch_start >= cfg.min_patch_bytes

    @torch.no_grad()
    def feed(self, byte: int) -> torch.Tensor:
        m, t = self.model, len(self.bytes)
        if t >= self.max_len:
            raise ValueError(f"the sequence is {t} bytes: this model's context is {self.max_len}")
        self.bytes.append(int(byte))
        if self.entropy is not None:
            self.entropies.append(self.entropy.feed(byte))
        window = self.bytes[-max(m.embed.ngrams, default=1):]
        dev = m.output.weight.device
        x = m.embed(torch.tensor([window], device=dev))[:, -1:]
        cos, sin = m.rope_cos[t:t + 1], m.rope_sin[t:t + 1]
        for block, cache in zip(m.encoder, self.enc, strict=True):
            x, _ = block(x, cos, sin, cache, t)
        self.h[:, t] = x[:, 0]
        start_next = self._next_start()
        self.starts.append(start_next)
        if start_next:  # x_t closes the open patch: pool it and run the global transformer one patch on
            self._close_patch(t)
        keys = torch.cat(self.keys, dim=1)
        read = m.read(x, keys, torch.ones(1, 1, keys.shape[1], dtype=torch.bool, device=dev))
        d = x + read
        for block, cache in zip(m.decoder, self.dec, strict=True):
            d, _ = block(d, cos, sin, cache, t)
        return m.output(m.norm(d))[0, -1]

    def _close_patch(self, t: int) -> None:
        m = self.model
        states = self.h[:, self.patch_start:t + 1]
        query = m.pool_in(states.amax(dim=1, keepdim=True))
        mask = torch.ones(1, 1, states.shape[1], dtype=torch.bool, device=states.device)
        p = query + m.pool(query, states, mask)
        g, _ = m.global_layers(p, self.glob, len(self.keys) - 1)
        self.keys.append(g)
        self.patch_start = t + 1


@torch.no_grad()
def generate_bytes(generator: BLTGenerator, prompt: bytes, max_new_bytes: int, *, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """Continue `prompt` (after the EOS the generator starts with): yields (byte, the logits it was drawn
    from). Stops at EOS (not yielded) when `stop_at_eos`, at max_new_bytes, or at the context's end."""
    logits = generator.reset()
    for b in prompt:
        logits = generator.feed(b)
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    budget = min(max_new_bytes, generator.max_len - generator.length + 1)  # the last byte is never fed
    for i in range(budget):
        nxt = int(sample_next(logits[None], temperature, top_k, top_p, gen)[0])
        if nxt == EOS and stop_at_eos:
            return
        yield nxt, logits
        if i + 1 < budget:
            logits = generator.feed(nxt)
