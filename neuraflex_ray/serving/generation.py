"""One choice of an LM request, from the engine's tokens to text deltas (stop strings applied)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving.engine import SamplingParams
from neuraflex_ray.serving.models import LMModel


async def deltas(lm: LMModel, ids: list[int], params: SamplingParams,
                  stops: list[str]) -> AsyncIterator[tuple[str, str | None, int]]:
    """(text delta, finish reason or None, tokens so far) for one choice; the last has a reason."""
    text = oai.TextStream(lm.decode, stops)
    seq = lm.engine.submit(ids, params)
    n = 0
    try:
        async for tok in seq.stream():
            n += 1
            delta = text.push(tok)
            if text.stopped:
                yield delta, "stop", n
                return
            if delta:
                yield delta, None, n
        yield text.finish(), seq.finish_reason, n
    finally:
        seq.cancel()  # a stop string, an error or a cancelled task: the slot frees at the next step


async def collect(lm: LMModel, ids: list[int], params: SamplingParams, stops: list[str]) -> tuple[str, str, int]:
    parts, finish, count = [], "length", 0
    async for delta, reason, n in deltas(lm, ids, params, stops):
        parts.append(delta)
        finish, count = reason or finish, n
    return "".join(parts), finish, count
