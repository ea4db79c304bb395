"""An LM request, from validated body to OpenAI response: choices, logprobs, echo, best_of, streams.

`run` turns a completions or chat request into engine sequences, one per sample, and shapes what
the engine produces into the response (or the SSE stream) the client asked for:

- choice i*n + j is prompt i's j-th sample; with a seed, sample j uses seed + j, so the n choices
  differ from each other yet each is reproducible;
- `best_of` samples best_of sequences per prompt and returns the n with the highest mean token
  log-probability (usage counts every sample, as OpenAI bills them);
- `logprobs`/`echo` and chat's `logprobs`/`top_logprobs` follow OpenAI's shapes (serving/logprobs.py);
- the `uncertainty` extension adds per-token entropy and calibrated confidence to each choice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import StreamingResponse

from neuraflex_ray.serving import access
from neuraflex_ray.serving import logprobs as lp
from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving.engine import SamplingParams, Sequence
from neuraflex_ray.serving.errors import RequestError
from neuraflex_ray.serving.models import LMModel

Kind = Literal["text", "chat"]


@dataclass
class Piece:
    """A text delta of one choice and the tokens of `seq.out` it covers, [start, end)."""

    text: str
    finish: str | None
    start: int
    end: int


async def pieces(lm: LMModel, seq: Sequence, stops: list[str]) -> AsyncIterator[Piece]:
    """Text deltas as tokens arrive (stop strings applied); the last piece has a finish reason."""
    text = oai.TextStream(lm.decode, stops)
    n = sent = 0
    try:
        async for tok in seq.stream():
            n += 1
            delta = text.push(tok)
            if text.stopped:
                yield Piece(delta, "stop", sent, n)
                return
            if delta:
                yield Piece(delta, None, sent, n)
                sent = n
        yield Piece(text.finish(), seq.finish_reason, sent, n)
    finally:
        seq.cancel()  # a stop string, an error or a cancelled task: the slot frees at the next step


@dataclass
class Job:
    index: int  # the choice's index (best_of: provisional)
    prompt: list[int]
    params: SamplingParams
    seq: Sequence | None = None
    text: str = ""
    finish: str = "length"
    tokens: int = 0  # tokens of seq.out the choice's text covers


def _params(req: Any, lm: LMModel, prompt: list[int], max_tokens: int | None, sample: int,
            adapter: str | None, datastore: str | None = None) -> SamplingParams:
    scored = bool(req.want_scores() or req.best_of_count() > req.n)
    return SamplingParams(
        max_tokens=lm.context - len(prompt) if max_tokens is None else max_tokens, temperature=req.temperature,
        top_p=req.top_p, top_k=max(req.top_k, 0), seed=None if req.seed is None else req.seed + sample,
        stop_ids=(lm.eos,) if lm.eos is not None and not req.ignore_eos else (),
        scores=scored, n_top=req.n_top(), prompt_scores=bool(getattr(req, "echo", False) and req.logprobs is not None),
        confidence_threshold=req.confidence_threshold, low_confidence=req.low_confidence, adapter=adapter,
        datastore=datastore)


async def run(kind: Kind, lm: LMModel, req: Any, prompts: list[list[int]], max_tokens: int | None,
              adapter: str | None = None, datastore: str | None = None) -> Any:
    longest = max(len(p) for p in prompts)
    limit = access.prompt_limit(lm.context)
    if longest > limit:
        field = "messages" if kind == "chat" else "prompt"
        raise RequestError(f"{field}: {longest} tokens; this server takes prompts of at most {limit} tokens "
                           f"(max_prompt_tokens): shorten it", field, code="prompt_too_long")
    if max_tokens is not None and longest + max_tokens > lm.context:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise RequestError(f"{field}={max_tokens} plus the prompt's {longest} tokens exceed this model's "
                           f"{lm.context}-token context window: lower {field}", field, code="context_length_exceeded")
    stops = req.stop + (list(oai.CHAT_STOP) if kind == "chat" else [])
    samples = req.best_of_count()
    jobs = [Job(i * samples + j, ids, _params(req, lm, ids, max_tokens, j, adapter, datastore))
            for i, ids in enumerate(prompts) for j in range(samples)]
    grant = access.current()
    if req.stream and grant is not None:
        await grant.open_stream()  # 429 when the key has max_concurrent_streams open already
    for job in jobs:
        job.seq = lm.engine.submit(job.prompt, job.params)
    rid = oai.new_id("cmpl" if kind == "text" else "chatcmpl")
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(kind, lm, req, rid, jobs, stops, prompt_tokens, include_usage, grant),
                                 media_type="text/event-stream")
    try:
        await asyncio.gather(*(_collect(lm, job, stops) for job in jobs))
    finally:
        _release(jobs, grant)
    kept = _best(jobs, req.n, samples) if samples > req.n else jobs
    choices = [_choice(kind, lm, req, job, job.text) for job in kept]
    return oai.response(kind, rid, req.model, choices, oai.usage(prompt_tokens, sum(j.tokens for j in jobs)))


def _release(jobs: list[Job], grant: access.Grant | None) -> None:
    """Free the jobs' engine slots; charge what they generated to the caller's key."""
    for job in jobs:
        job.seq.cancel()
    if grant is not None:
        grant.tokens += sum(len(job.seq.out) for job in jobs)


async def _collect(lm: LMModel, job: Job, stops: list[str]) -> None:
    parts = []
    async for piece in pieces(lm, job.seq, stops):
        parts.append(piece.text)
        job.finish, job.tokens = piece.finish or job.finish, piece.end
    job.text = "".join(parts)


def _best(jobs: list[Job], n: int, samples: int) -> list[Job]:
    """Per prompt, the n samples with the highest mean log-probability, renumbered i*n + rank."""
    kept = []
    for i in range(0, len(jobs), samples):
        group = sorted(jobs[i:i + samples], key=lambda j: -lp.mean_logprob(j.seq.scores[:j.tokens]))[:n]
        for rank, job in enumerate(group):
            job.index = i // samples * n + rank
            kept.append(job)
    return kept


def _choice(kind: Kind, lm: LMModel, req: Any, job: Job, text: str, start: int = 0, end: int | None = None,
            finish: str | None = None, chunk: bool = False, first: bool = False) -> dict[str, Any]:
    """One choice (or one chunk of it, tokens [start, end)) with the logprobs and uncertainty asked for."""
    seq, end = job.seq, job.tokens if end is None else end
    finish = job.finish if not chunk else finish
    echo = kind == "text" and req.echo and (first or not chunk)
    prefix = lm.decode(job.prompt) if echo else ""
    out = oai.choice(kind, job.index, prefix + text, finish, chunk=chunk, first=first)
    ids, scores = seq.out[start:end], seq.scores[start:end]
    if kind == "text" and req.logprobs is not None:
        if echo:
            # The prompt's own scores, then the completion's; its offsets continue after the prompt.
            head = lp.completion_logprobs(lm.tokenizer, job.prompt, seq.prompt_scores, 0, req.logprobs)
            tail = lp.completion_logprobs(lm.tokenizer, ids, scores, len(prefix), req.logprobs)
            out["logprobs"] = {k: head[k] + tail[k] for k in head}
        else:
            offset = len(lm.decode(seq.out[:start])) if start else 0
            out["logprobs"] = lp.completion_logprobs(lm.tokenizer, ids, scores, offset, req.logprobs)
    elif kind == "chat" and req.logprobs:
        out["logprobs"] = lp.chat_logprobs(lm.tokenizer, ids, scores, req.top_logprobs or 0)
    if seq.dispatch is not None and (first or not chunk):
        out["dispatch"] = seq.dispatch  # extension: the adapter `<base>:auto` chose
    if req.uncertainty or req.confidence_threshold is not None:
        out["uncertainty"] = lp.uncertainty(scores, lm.engine.calibration_temperature, req.confidence_threshold,
                                            seq.stopped_low_confidence and (finish is not None))
    return out


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(kind: Kind, lm: LMModel, req: Any, rid: str, jobs: list[Job], stops: list[str],
                  prompt_tokens: int, include_usage: bool, grant: access.Grant | None) -> AsyncIterator[str]:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`. Choices stream side
    by side, each chunk carrying the logprobs of the tokens it covers; if the client goes away the
    tasks are cancelled and the slots freed."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async for piece in pieces(lm, job.seq, stops):
                await queue.put((job, piece))
        except Exception as e:  # noqa: BLE001 - reported to the client in the stream
            await queue.put((job, e))

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    started: set[int] = set()
    open_, completion_tokens = len(jobs), 0
    try:
        while open_:
            job, piece = await queue.get()
            if isinstance(piece, Exception):
                yield _sse({"error": {"message": f"generation failed: {piece}", "type": "server_error",
                                      "param": None, "code": None}})
                return
            first = job.index not in started
            started.add(job.index)
            if piece.finish is not None:
                open_ -= 1
                completion_tokens += piece.end
            if piece.text or first or piece.finish:
                c = _choice(kind, lm, req, job, piece.text, piece.start, piece.end, piece.finish, chunk=True, first=first)
                yield _sse(oai.response(kind, rid, req.model, [c], None, chunk=True))
        if include_usage:  # OpenAI's final usage chunk: no choices
            yield _sse(oai.response(kind, rid, req.model, [], oai.usage(prompt_tokens, completion_tokens), chunk=True))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        _release(jobs, grant)
