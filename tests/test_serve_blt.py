"""The BLT on Ray Serve (families/blt/serve.py): the same OpenAI-compatible routes, a token is a byte.

Over real HTTP with the official `openai` client on an untrained export (what it says is noise; the
wire format, logprobs, streaming and errors are the real ones), and the engine's text stream in this
process with a model made to spell multi-byte characters one byte per step.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import torch
from openai import BadRequestError, OpenAI

from neuraflex_ray.families.blt.scratch import scratch_blt_export
from neuraflex_ray.families.blt.serve import BLTEngine, BLTModel, ByteTokenizer, load_parts
from neuraflex_ray.models.blt_patching import EOS
from neuraflex_ray.serving.deploy import deploy, free_port
from neuraflex_ray.serving.engine import SamplingParams
from neuraflex_ray.serving.generation import pieces

BLT_NAME = "neuraflex-blt"
PROMPT = "naïve café"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return scratch_blt_export(tmp_path_factory.mktemp("blt-serve") / "export")


@pytest.fixture(scope="module")
def server(ray_session, export):
    from ray import serve

    url = deploy([str(export)], port=free_port(), num_cpus=0.5)
    yield {"url": url, "client": OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}
    serve.shutdown()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_completions_with_logprobs_count_bytes_as_tokens(server):
    out = server["client"].completions.create(model=BLT_NAME, prompt=PROMPT, max_tokens=16, logprobs=3, seed=1,
                                              temperature=0.9, extra_body={"ignore_eos": True})
    choice, usage = out.choices[0], out.usage
    assert usage.prompt_tokens == len(PROMPT.encode()) + 1  # its bytes after the <|endoftext|> it continues
    assert usage.completion_tokens == 16 == len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in choice.logprobs.top_logprobs)  # 3 + the sampled byte
    offsets = choice.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    # The same seed gives the same bytes, streamed or not.
    stream = server["client"].completions.create(model=BLT_NAME, prompt=PROMPT, max_tokens=16, seed=1,
                                                 temperature=0.9, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_chat_and_tokenize_say_a_token_is_a_byte(server):
    chat = server["client"].chat.completions.create(model=BLT_NAME, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8, logprobs=True, top_logprobs=2, seed=0)
    content = chat.choices[0].logprobs.content
    assert 0 < len(content) <= 8 and all(len(c.bytes) == 1 for c in content)  # one byte per token
    tok = post(f"{server['url']}/tokenize", {"model": BLT_NAME, "prompt": PROMPT, "return_token_strs": True})
    assert tok["token_unit"] == "byte" and tok["tokens"] == list(PROMPT.encode()) and tok["count"] == 12
    assert post(f"{server['url']}/detokenize", {"model": BLT_NAME, "tokens": tok["tokens"]})["prompt"] == PROMPT
    card = json.loads(urllib.request.urlopen(f"{server['url']}/v1/models/{BLT_NAME}", timeout=60).read())
    assert card["tokenizer"]["unit"] == "byte" and card["patching"]["mode"] == "entropy"


def test_bad_requests_get_a_4xx_naming_the_field_and_the_replica_keeps_serving(server):
    with pytest.raises(BadRequestError, match=r"prompt: a token of this model is a byte"):
        server["client"].completions.create(model=BLT_NAME, prompt=[65, 300], max_tokens=4)
    with pytest.raises(BadRequestError, match="context window"):
        server["client"].completions.create(model=BLT_NAME, prompt="x" * 400, max_tokens=4)
    assert server["client"].completions.create(model=BLT_NAME, prompt="ok", max_tokens=2).usage.completion_tokens <= 2


class Spell(torch.nn.Module):
    """An output head that makes the model say `text`, one byte per call (after `skip` calls for the prompt)."""

    def __init__(self, text: str, skip: int, weight: torch.nn.Parameter):
        super().__init__()
        self.script, self.calls, self.skip = list(text.encode()) + [EOS], 0, skip
        self.weight = weight  # the head it replaces: the generator reads its dtype and device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = max(0, min(self.calls - self.skip, len(self.script) - 1))
        self.calls += 1
        return torch.full((*x.shape[:-1], EOS + 1), -1e4).index_fill(-1, torch.tensor([self.script[i]]), 1e4)


def test_streamed_text_never_splits_a_utf8_character(export):
    text = "é✓ naïve 日本"
    model, entropy, meta = load_parts(export)
    model.output = Spell(text, skip=1, weight=model.output.weight)  # call 0 (the reset) predicts the prompt "a"
    engine = BLTEngine(model, entropy, max_batch_size=2)
    lm = BLTModel(BLT_NAME, export, meta, engine, ByteTokenizer(), EOS)

    async def stream() -> list[str]:
        seq = engine.submit(lm.encode("a", "prompt"), SamplingParams(max_tokens=64, temperature=0.0, stop_ids=(EOS,)))
        return [p.text async for p in pieces(lm, seq, [])]

    deltas = asyncio.run(stream())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) >= len(text) - 1  # streamed as characters complete, not at the end
