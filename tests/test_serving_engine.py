"""The continuous-batching engine and the OpenAI text layer, in one process (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.models.moe_lm import MoELM, generate
from neuraflex_ray.serving.engine import LMEngine, SamplingParams
from neuraflex_ray.serving.openai_api import TextStream

FLAVOURS = {"moe": {}, "dense": {"num_experts": 0},
            # A Titans memory beside a 16-token window, updated every 8 tokens: per-slot state in the engine.
            "titans": {"memory": "titans", "attn_window": 16, "memory_chunk": 8}}


def tiny(**kw) -> MoELM:
    torch.manual_seed(0)
    return MoELM(ModelConfig(dim=64, n_layers=2, vocab_size=256, max_seq_len=96, **kw)).eval()


@pytest.fixture(scope="module", params=list(FLAVOURS))
def model(request):
    """The routed model, the dense baseline (`num_experts: 0`) and a Titans model, all served the same way."""
    return tiny(**FLAVOURS[request.param])


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 250 + 1 for j in range(2 + i % 5)] for i in range(n)]


def params(i: int, max_tokens: int = 24) -> SamplingParams:
    # Greedy and sampled requests, with and without top-k/top-p, in the same batch.
    return SamplingParams(max_tokens=max_tokens, temperature=0.0 if i % 3 == 0 else 0.9, top_k=20 * (i % 2),
                          top_p=0.8 if i % 4 == 1 else 1.0, seed=100 + i)


async def run(engine: LMEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    async def one(p: list[int], sp: SamplingParams) -> list[int]:
        return [t async for t in engine.submit(p, sp).stream()]

    return await asyncio.gather(*(one(p, sp) for p, sp in jobs))


def test_a_request_gets_the_same_tokens_alone_and_in_a_full_batch(model):
    engine = LMEngine(model, max_batch_size=16)
    jobs = [(p, params(i)) for i, p in enumerate(prompts(16))]
    alone = [asyncio.run(run(engine, [job]))[0] for job in jobs]
    together = asyncio.run(run(engine, jobs))
    assert together == alone
    assert engine.load()["peak_batch"] == 16  # they really were decoded together
    assert all(len(t) == 24 for t in together)


def test_batched_decode_with_per_row_positions_matches_plain_greedy_generation(model):
    engine = LMEngine(model, max_batch_size=4)
    jobs = [(p, SamplingParams(max_tokens=30, temperature=0.0)) for p in prompts(4)]
    out = asyncio.run(run(engine, jobs))
    for (p, _), tokens in zip(jobs, out, strict=True):
        assert tokens == generate(model, p, 30)  # the single-sequence KV-cache path, one position per step


def test_without_batch_invariance_live_rows_are_compacted_and_decode_correctly(model):
    # Requests of different lengths: as the short ones finish, the long ones (and their cache rows)
    # move down into the freed slots, and must go on exactly where they were.
    engine = LMEngine(model, max_batch_size=4, batch_invariant=False)
    jobs = [(p, SamplingParams(max_tokens=4 + 9 * i, temperature=0.0)) for i, p in enumerate(prompts(6))]
    out = asyncio.run(run(engine, jobs))
    for (p, sp), tokens in zip(jobs, out, strict=True):
        assert tokens == generate(model, p, sp.max_tokens)
    assert engine.load()["peak_batch"] == 4


def test_recompute_and_unbatched_engines_agree_with_the_batched_one(model):
    jobs = [(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts(3)]
    batched = asyncio.run(run(LMEngine(model, 8), jobs))
    assert asyncio.run(run(LMEngine(model, 1), jobs)) == batched
    assert asyncio.run(run(LMEngine(model, 8, kv_cache=False), jobs)) == batched


def test_stop_token_max_tokens_and_context_end(model):
    engine = LMEngine(model, max_batch_size=2)
    p = prompts(1)[0]
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=5)  # an untrained model's greedy text repeats
    first = asyncio.run(run(engine, [(p, sampled)]))[0]

    async def finish(sp: SamplingParams, prompt: list[int] = p) -> tuple[list[int], str | None]:
        seq = engine.submit(prompt, sp)
        return [t async for t in seq.stream()], seq.finish_reason

    assert asyncio.run(finish(sampled)) == (first, "length")
    # A later token as a stop id: generation ends before its first occurrence, and says "stop".
    cut = next(i for i in range(1, 8) if first[i] not in first[:i])
    assert asyncio.run(finish(dataclasses.replace(sampled, stop_ids=(first[cut],)))) == (first[:cut], "stop")
    long_prompt = (p * 100)[:90]
    tokens, reason = asyncio.run(finish(SamplingParams(max_tokens=50, temperature=0.0), long_prompt))
    assert (len(tokens), reason) == (96 - 90, "length")  # the context window ends it
    with pytest.raises(ValueError, match="context"):
        asyncio.run(finish(SamplingParams(max_tokens=5), (p * 100)[:96]))


def test_leaving_a_stream_frees_its_slot(model):
    engine = LMEngine(model, max_batch_size=1)

    async def take_three() -> list[int]:
        seq = engine.submit(prompts(1)[0], SamplingParams(max_tokens=80, temperature=0.0))
        out = []
        async for t in seq.stream():
            out.append(t)
            if len(out) == 3:
                break
        await asyncio.sleep(0.5)  # the engine notices at its next step
        return out

    assert len(asyncio.run(take_three())) == 3
    load = engine.load()
    assert load["active"] == 0 and load["cancelled"] == 1 and load["tokens"] < 80
    # The only slot is free again: the next request runs to its end.
    assert len(asyncio.run(run(engine, [(prompts(1)[0], SamplingParams(max_tokens=4, temperature=0.0))]))[0]) == 4


def test_a_request_that_fails_fails_alone(model):
    engine = LMEngine(model, max_batch_size=4)
    jobs = [(p, SamplingParams(max_tokens=10, temperature=0.0)) for p in prompts(3)]

    async def collect(p: list[int], sp: SamplingParams) -> list[int]:
        return [t async for t in engine.submit(p, sp).stream()]

    async def go() -> list:
        bad = collect([10**6], SamplingParams(max_tokens=10))  # no such token: its prefill raises
        return await asyncio.gather(bad, *(collect(p, sp) for p, sp in jobs), return_exceptions=True)

    bad, *good = asyncio.run(go())
    assert isinstance(bad, IndexError)
    assert good == asyncio.run(run(LMEngine(model, 4), jobs))  # the others ran as if it had not been there
    load = engine.load()
    assert load["failed"] == 1 and load["active"] == 0
    engine.check_alive()


def test_huge_seeds_and_tiny_temperatures_are_served():
    torch.manual_seed(1)
    m = MoELM(ModelConfig(dim=64, n_layers=2, num_experts=4, vocab_size=256, max_seq_len=32)).eval()
    engine = LMEngine(m, max_batch_size=2)
    out = asyncio.run(run(engine, [([1, 2, 3], SamplingParams(max_tokens=4, seed=2**64 - 1, temperature=0.7)),
                                   ([1, 2, 3], SamplingParams(max_tokens=4, temperature=1e-40))]))
    assert len(out[0]) == 4 and out[1] == generate(m, [1, 2, 3], 4)  # a tiny temperature is greedy


def test_text_stream_holds_back_partial_characters_and_cuts_at_stop_strings():
    # A stand-in for byte-level BPE: each token is one byte; a cut multi-byte character decodes to U+FFFD.
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    text = TextStream(decode, stop=["END"])
    out = [text.push(b) for b in "héllo EN".encode()]
    assert "".join(out) == "héllo " and "\ufffd" not in "".join(out)  # "EN" is held: it may start "END"
    assert text.push(ord("D")) == "" and text.stopped
    text = TextStream(decode, stop=["END"])
    assert "".join(text.push(b) for b in b"xEN") + text.finish() == "xEN"  # not a stop after all
    # One token completes a stop string and also starts a multi-byte character: still a stop.
    pieces = {1: b"ab", 2: b"EN", 3: b"D\xc3"}
    text = TextStream(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"), stop=["END"])
    assert [text.push(i) for i in (1, 2, 3)] == ["ab", "", ""] and text.stopped and text.finish() == ""


def test_a_titans_memory_never_carries_one_request_into_another():
    """A secret in request A leaves request B's log-probs bit for bit as they are alone, whether B
    runs after A (the same slot, its memory restarted) or batched with A and 14 others."""
    model = tiny(**FLAVOURS["titans"])
    engine = LMEngine(model, max_batch_size=16)
    scored = SamplingParams(max_tokens=20, temperature=0.0, scores=True, prompt_scores=True)
    secret = [(11 * j) % 250 + 3 for j in range(40)]  # five memory chunks of A's own
    b = [(5 * j) % 200 + 1 for j in range(30)]

    def b_logprobs(jobs: list[list[int]]) -> list[float]:
        seqs = []

        async def go() -> None:
            async def one(p: list[int]) -> None:
                seq = engine.submit(p, scored)
                seqs.append(seq)
                [t async for t in seq.stream()]

            await asyncio.gather(*(one(p) for p in jobs))

        asyncio.run(go())
        seq = next(s for s in seqs if s.prompt == b)
        return [s.logprob for s in seq.prompt_scores[1:]] + [s.logprob for s in seq.scores]

    alone = b_logprobs([b])
    asyncio.run(run(engine, [(secret, scored)]))  # A alone first: B may take the slot A left
    assert b_logprobs([b]) == alone
    others = [secret] + [[(3 * i + j) % 250 + 1 for j in range(8 + i)] for i in range(14)]
    assert b_logprobs([*others, b]) == alone
    assert engine.load()["peak_batch"] == 16
