"""Continuous-batching decoder for NeuralFlex-MoE: one thread, a slot-per-sequence KV cache.

Each replica owns one `LMEngine`. Requests join and leave between decode steps:

    admit   a waiting request takes a free slot; its prompt is prefilled alone into that slot's
            rows of the KV cache, and its first token is sampled
    decode  one step for every slot at once: the last token of each row at its own position
    emit    each new token goes to the request's asyncio queue; finished or cancelled requests
            free their slot at once (a client that disconnects stops costing compute)

A request's tokens do not depend on what it is batched with (`batch_invariant`, the default).
Prefill runs alone; the decode step always has `max_batch_size` rows (empty slots are padding),
attends over the whole cache length under per-row masks, and runs the experts in their
batch-invariant mode, so every shape a row's arithmetic sees is fixed (matmul kernels pick their
reduction order by shape, so a row's low bits change with the batch size otherwise); sampling uses
the request's own seeded generator. Tests compare a request decoded alone with the same request
among 15 others. The price is paid at low load: a lone request computes a full batch. With
`batch_invariant=False` a step computes only the live rows (kept in the first slots) and routes
experts by group, which is faster when few requests are live and equal up to float rounding.

The model runs in the engine's thread, never on the event loop: the replica keeps answering
health checks and streaming other responses while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from neuraflex_ray.models.moe import MoE
from neuraflex_ray.models.moe_lm import MoELM, sample_next
from neuraflex_ray.serving.dispatch import AUTO
from neuraflex_ray.serving.logprobs import TokenScore, score


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: a fresh random seed per request
    stop_ids: tuple[int, ...] = ()
    scores: bool = False  # score every generated token (serving/logprobs.py): seq.scores
    n_top: int = 0  # with scores: the n most likely alternatives of each token
    prompt_scores: bool = False  # score the prompt's own tokens too (echo): seq.prompt_scores
    confidence_threshold: float | None = None  # with scores: a token below it ...
    low_confidence: str = "stop"  # ... ends the sequence there ("stop") or is only flagged ("flag")
    adapter: str | None = None  # a LoRA adapter of the served model (serving/adapters.py)
    datastore: str | None = None  # a retrieval memory the model reads (serving/memory.py)


@dataclass
class Sequence:
    """One request in the engine. Its events reach the caller's event loop thread-safely."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    out: list[int] = field(default_factory=list)
    slot: int = -1
    cancelled: bool = False
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_tokens, context end)
    generator: torch.Generator | None = None
    scores: list[TokenScore] = field(default_factory=list)  # one per token of `out`, when asked
    prompt_scores: list[TokenScore | None] | None = None  # the first prompt token has none
    stopped_low_confidence: bool = False
    spec_proposed: int = 0  # speculative decoding: draft tokens proposed for this request ...
    spec_accepted: int = 0  # ... and accepted by the target model
    state: Any = None  # what an engine keeps per sequence beside its cache slot (the BLT: its generator)
    dispatch: dict[str, Any] | None = None  # `<base>:auto`: the adapter the first pass chose, and why
    cancel_mark: int | None = None  # len(out) when cancel() was first called: what the engine made after it

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the caller's event loop is gone (replica shutting down): nobody listens
            self.cancelled = True

    async def stream(self) -> AsyncIterator[int]:
        """Token ids as they are sampled. Leaving the loop early (client gone, stop string found)
        cancels the sequence: its slot is free at the engine's next step."""
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "token":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    self.finish_reason = value
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self.cancel_mark is None:
            self.cancel_mark = len(self.out)
        self.cancelled = True  # read by the engine thread; a no-op once finished


class SlotEngine:
    """What every engine shares: `max_batch_size` slots, the waiting queue, the engine thread, and how a
    sampled token is emitted and a sequence retired. A subclass sets its model up, implements
    `_prefill(seq)` (a new sequence's prompt -> its first token) and `_step()` (one token for every live
    sequence), and calls `_start()` last."""

    speculator: Any = None  # serving/speculative.py: drafts k tokens, verifies them in one pass
    adapters: Any = None  # serving/adapters.py: LoRA adapters chosen per request
    kv_cache = True
    batch_invariant = False

    def __init__(self, max_batch_size: int, max_len: int, vocab_size: int, device: torch.device,
                 calibration_temperature: float = 1.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size, self.max_len, self.vocab_size, self.device = max_batch_size, max_len, vocab_size, device
        self.calibration_temperature = calibration_temperature  # fitted at export (eval/calibration.py)
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        # tokens_after_cancel: the most tokens any cancelled sequence (a client gone mid-stream) was given
        # after its cancel() -- the engine drops it at its next step, so at most one step's worth.
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "steps": 0, "tokens": 0, "peak_batch": 0,
                      "tokens_after_cancel": 0}
        self.error: BaseException | None = None  # set only if the loop itself died (health check)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lm-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (event loop) -------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Queue a request; iterate `seq.stream()` on the same event loop for its tokens."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the {self.max_len}-token context")
        seq = Sequence(list(prompt), params, asyncio.get_running_loop())
        with self.cond:
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def load(self) -> dict[str, Any]:
        with self.cond:
            active = sum(s is not None for s in self.slots)
            waiting = sum(not s.cancelled for s in self.waiting)
            out = {"active": active, "waiting": waiting, "slots": self.max_batch_size, **self.stats}
        if self.speculator is not None:
            out["speculative"] = self.speculator.report()
        return out

    def check_alive(self) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise RuntimeError(f"LM engine thread died: {self.error!r}")

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.waiting and not any(self.slots):
                        self.cond.wait()
                try:
                    with torch.inference_mode():
                        self._admit()
                        self._step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the replica
                    self._fail_all(e)
        except BaseException as e:  # pragma: no cover - reported through check_alive
            self.error = e
            raise

    def _admit(self) -> None:
        while True:
            with self.cond:
                free = [i for i, s in enumerate(self.slots) if s is None]
                if not free or not self.waiting:
                    return
                seq = self.waiting.popleft()
                if seq.cancelled:  # gone before it got a slot
                    self.stats["cancelled"] += 1
                    continue
                seq.slot = free[0]
                self.slots[seq.slot] = seq
            try:  # a request that fails here (its seed, its prefill) fails alone
                seq.generator = torch.Generator(device=self.device)
                seed = seq.params.seed if seq.params.seed is not None else int.from_bytes(os.urandom(8), "little")
                seq.generator.manual_seed(seed % 2**64)
                self._prefill(seq)
            except Exception as e:  # noqa: BLE001 - reported to that request's stream
                self._fail(seq, e)

    def _prefill(self, seq: Sequence) -> None:
        """Run a new sequence's prompt (its scores, when asked) and take its first token."""
        raise NotImplementedError

    def _step(self) -> None:
        """One token for every live sequence."""
        raise NotImplementedError

    def adapter(self, name: str | None) -> Any:
        """The context in which the model reads request adapter `name`'s weights (None: the base's)."""
        if self.adapters is None or name is None:
            return contextlib.nullcontext()
        return self.adapters.active(name)

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of `seq` from its logits [V], emit it, and retire `seq` when done."""
        if seq.cancelled:
            return self._retire(seq, None)
        p = seq.params
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the model produced non-finite logits")
        tok = int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, seq.generator)[0])
        self.emit_token(seq, tok, logits)

    def emit_token(self, seq: Sequence, tok: int, logits: torch.Tensor) -> bool:
        """Append `tok` (chosen from `logits` [V]) to `seq` and send it; False once `seq` is finished."""
        p = seq.params
        if tok in p.stop_ids:
            self._retire(seq, "stop")
            return False
        if p.scores:
            s = score(logits[None], torch.tensor([tok], device=logits.device), p.n_top, self.calibration_temperature)[0]
            if p.confidence_threshold is not None and s.confidence < p.confidence_threshold and p.low_confidence == "stop":
                seq.stopped_low_confidence = True
                self._retire(seq, "stop")
                return False
            seq.scores.append(s)
        seq.out.append(tok)
        self.stats["tokens"] += 1
        seq.emit("token", tok)
        if len(seq.out) >= p.max_tokens or len(seq.prompt) + len(seq.out) >= self.max_len:
            self._retire(seq, "length")
            return False
        return True

    def _free(self, seq: Sequence) -> None:
        with self.cond:
            if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
                self.slots[seq.slot] = None

    def _retire(self, seq: Sequence, reason: str | None) -> None:
        self._free(seq)
        self.stats["cancelled" if reason is None else "finished"] += 1
        if reason is None and seq.cancel_mark is not None:
            self.stats["tokens_after_cancel"] = max(self.stats["tokens_after_cancel"], len(seq.out) - seq.cancel_mark)
        if reason is not None:
            seq.emit("done", reason)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self._free(seq)
        self.stats["failed"] += 1
        seq.emit("error", error)

    def _fail_all(self, error: Exception) -> None:
        """A batched step failed: every live request gets the error; the engine goes on."""
        for seq in [s for s in self.slots if s is not None]:
            self._fail(seq, error)


class LMEngine(SlotEngine):
    """Continuous batching over a fixed pool of `max_batch_size` KV-cache slots.

    `max_batch_size=1` is the unbatched baseline (requests decode one after another);
    `kv_cache=False` recomputes the whole sequence for every token (the benchmark's baseline).
    """

    def __init__(self, model: MoELM, max_batch_size: int = 16, kv_cache: bool = True, batch_invariant: bool = True,
                 calibration_temperature: float = 1.0, speculator: Any = None, adapters: Any = None,
                 memories: Any = None):
        if speculator is not None and not kv_cache:
            raise ValueError("speculative decoding verifies drafts against the KV cache: it needs kv_cache=True")
        if speculator is not None and model.cfg.memory != "none":
            raise ValueError(f"speculative decoding rolls rejected drafts back out of the KV cache; model.memory="
                             f"{model.cfg.memory!r} has already taken them in: serve it without a draft model")
        super().__init__(max_batch_size, model.cfg.max_seq_len, model.cfg.vocab_size, model.tok_embeddings.weight.device,
                         calibration_temperature)
        self.speculator, self.adapters, self.memories = speculator, adapters, memories
        self.model = model.eval()
        self.kv_cache = kv_cache
        self.batch_invariant = batch_invariant and max_batch_size > 1  # one slot: nothing to vary with
        self.caches = model.new_caches(max_batch_size) if kv_cache else None
        self._start()

    def _prefill(self, seq: Sequence) -> None:
        if seq.params.adapter == AUTO:  # the first pass (serving/dispatch.py) picks the adapter
            adapter, seq.dispatch = self.adapters.dispatcher.choose(self.model, seq.prompt)
            seq.params = dataclasses.replace(seq.params, adapter=adapter)
        ids = torch.tensor([seq.prompt], device=self.device)
        with self.adapter(seq.params.adapter):
            if self.caches is not None:  # prefill alone, into this slot's rows of the cache
                logits, hidden = self._forward(ids, [c.slot(seq.slot) for c in self.caches], 0)
            else:
                logits, hidden = self._forward(ids)
        rows = slice(None) if seq.params.prompt_scores else slice(-1, None)  # the memory reads only what is used
        logits = self.read_memory(seq, hidden[0, rows], logits[0, rows])
        if seq.params.prompt_scores:
            seq.prompt_scores = [None, *score(logits[:-1], ids[0, 1:], seq.params.n_top, self.calibration_temperature)]
        if seq.params.max_tokens == 0:  # echo alone: the prompt's scores were the whole job
            self._retire(seq, "length")
            return
        self._take(seq, logits[-1])

    def _forward(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, final normalised hidden states): the model's forward, keeping what a memory reads."""
        hidden, _ = self.model.hidden_states(*args)
        return self.model.logits(hidden), hidden

    def read_memory(self, seq: Sequence, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Rows [n, V] of `seq`'s logits, mixed with its datastore's distribution when it names one."""
        if seq.params.datastore is None:
            return logits
        return self.memories.mix(seq.params.datastore, hidden, logits)

    def _step(self) -> None:
        live = [s for s in self.slots if s is not None]
        if not live:
            return
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(live))
        if self.speculator is not None:  # each sequence drafts and verifies on its own (speculative.py)
            for seq in live:
                try:
                    self.speculator.step(self, seq)
                except Exception as e:  # noqa: BLE001 - that request fails, the others go on
                    self._fail(seq, e)
            self.stats["steps"] += 1
            return
        if self.caches is None:  # baseline: recompute every live sequence in full
            for seq in live:
                with self.adapter(seq.params.adapter):
                    logits, hidden = self._forward(torch.tensor([seq.prompt + seq.out], device=self.device))
                self._take(seq, self.read_memory(seq, hidden[0, -1:], logits[0, -1:])[0])
            return
        if not self.batch_invariant:
            live = self._compact()  # live rows first: the step computes rows [0, len(live)) only
        rows = self.max_batch_size if self.batch_invariant else len(live)
        groups: dict[str | None, list[Sequence]] = {}
        for seq in live:  # one forward per adapter among the live requests (usually one: the base)
            groups.setdefault(seq.params.adapter, []).append(seq)
        for adapter, members in groups.items():
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
            positions = torch.zeros(rows, dtype=torch.long, device=self.device)
            writes = torch.zeros(rows, dtype=torch.bool, device=self.device)  # rows whose memory reads this token
            writes[[seq.slot for seq in members]] = True
            for seq in live:
                tokens[seq.slot, 0] = seq.out[-1]
                positions[seq.slot] = len(seq.prompt) + len(seq.out) - 1
                if seq.params.adapter != adapter:
                    # Another adapter's row: its key/value go to the last cache column, which no query
                    # reads before its own forward rewrites it (reads are masked to positions <= the query's).
                    positions[seq.slot] = self.max_len - 1
            with self.adapter(adapter), (batch_invariant_experts(self.model) if self.batch_invariant
                                         else contextlib.nullcontext()):
                logits, hidden = self._forward(tokens, self.caches, positions, writes)
            for seq in members:
                try:
                    self._take(seq, self.read_memory(seq, hidden[seq.slot, -1:], logits[seq.slot, -1:])[0])
                except Exception as e:  # noqa: BLE001 - one request's sampling fails that request only
                    self._fail(seq, e)
        self.stats["steps"] += 1

    def _compact(self) -> list[Sequence]:
        """Move live sequences (and their cache rows) down into free slots, keeping their order."""
        with self.cond:
            live = [s for s in self.slots if s is not None]
            for new, seq in enumerate(live):
                if seq.slot != new:  # new < seq.slot: the row copied over is free
                    for c in self.caches:
                        c.move_row(new, seq.slot)
                    self.slots[seq.slot], self.slots[new], seq.slot = None, seq, new
            return live


class batch_invariant_experts:  # noqa: N801 - used as a context manager, reads like a function
    """Run every MoE layer of `model` in its batch-invariant mode inside the block."""

    def __init__(self, model: torch.nn.Module):
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]

    def __enter__(self) -> None:
        for m in self.moes:
            m.batch_invariant = True

    def __exit__(self, *exc: object) -> None:
        for m in self.moes:
            m.batch_invariant = False
