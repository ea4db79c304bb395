"""The numerics behind the serving features, in process: temperature calibration, weight-only
quantisation, prompt-lookup drafting and the speculative accept rule."""

from __future__ import annotations

import asyncio

import pytest
import torch

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.eval.calibration import expected_calibration_error, fit_temperature
from neuraflex_ray.models.moe_lm import MoELM
from neuraflex_ray.serving.engine import LMEngine, SamplingParams
from neuraflex_ray.serving.quantize import quantize_int4, quantize_int8, quantize_model, weight_bytes
from neuraflex_ray.serving.speculative import Speculator, ngram_draft


def test_temperature_scaling_recovers_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 50, generator=g) * 2
    targets = torch.multinomial(true_logits.softmax(-1), 1, generator=g)[:, 0]  # labels drawn from the truth
    overconfident = true_logits * 3  # a model 3x too sure of itself
    t = fit_temperature(overconfident, targets)
    assert t == pytest.approx(3.0, rel=0.05)
    before, after = expected_calibration_error(overconfident, targets), expected_calibration_error(overconfident, targets, t)
    assert after < 0.02 < before


def test_int8_and_int4_round_trip_within_their_step():
    w = torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and ((q.float() * s[..., None]) - w).abs().max() <= s.max() / 2 + 1e-6
    packed, s4 = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 64, 48) and s4.shape == (4, 64, 3)
    # Values that sit exactly on the int4 grid come back exactly.
    grid = torch.randint(-7, 8, (2, 8, 64), generator=torch.Generator().manual_seed(0)).float() * 0.5
    grid[..., ::32] = 3.5  # every group of 32 reaches 7 steps, so its scale is exactly 0.5
    packed, s4 = quantize_int4(grid)
    from neuraflex_ray.serving.quantize import Int4Weight

    assert torch.allclose(Int4Weight(s4, transposed=False)(packed), grid, atol=1e-6)


@pytest.mark.parametrize("mode,ratio,tol", [("int8", 0.30, 0.05), ("int4", 0.20, 0.5)])
def test_a_quantised_model_keeps_its_logits_and_shrinks(mode, ratio, tol):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2,
                      expert_ffn_dim=64, dense_ffn_dim=128, max_seq_len=32)
    model = MoELM(cfg).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref, _ = model(x)
    fp32 = weight_bytes(model)
    info = quantize_model(model, mode)
    assert info["bytes_fp32"] == fp32 and info["bytes_ratio"] < ratio
    assert model.output.parametrizations.weight.original is model.tok_embeddings.parametrizations.weight.original
    with torch.no_grad():
        out, _ = model(x)
    assert (out - ref).abs().max() < tol * ref.abs().max()
    assert all(m.router.weight.dtype == torch.float32 for m in model.modules() if hasattr(m, "router"))


def test_prompt_lookup_finds_the_latest_repeat():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2) == [7, 8]
    assert ngram_draft([5, 6, 7], k=3) == []
    assert ngram_draft([4, 4, 4, 4], k=2) == [4]  # the continuation stops at the end of the text


async def _decode(engine: LMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return [t async for t in engine.submit(prompt, params).stream()]


def test_speculative_greedy_matches_plain_greedy_with_a_draft_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2,
                      expert_ffn_dim=32, dense_ffn_dim=64, max_seq_len=96)
    target, draft = MoELM(cfg), MoELM(cfg)
    draft.load_state_dict(target.state_dict())  # a perfect draft: every greedy proposal is accepted
    prompt, params = [1, 2, 3, 4, 1, 2], SamplingParams(max_tokens=40, temperature=0.0)
    plain = asyncio.run(_decode(LMEngine(target, 2), prompt, params))
    spec = Speculator(k=4, draft=draft, max_batch_size=2, ngram=False)
    fast = asyncio.run(_decode(LMEngine(target, 2, speculator=spec), prompt, params))
    assert fast == plain and spec.report()["acceptance_rate"] == 1.0
    assert spec.report()["tokens_per_step"] > 4  # k accepted + 1 from the target per verify step
