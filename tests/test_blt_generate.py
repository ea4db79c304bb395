"""Incremental BLT generation (models/blt_generate.py) equals full recomputation: the same patches, the
same logits at every step, under every patching rule, with the entropy model deciding as it goes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuraflex_ray.config import ModelConfig, load_config
from neuraflex_ray.families.blt.entropy import byte_entropies
from neuraflex_ray.models.blt import BLT
from neuraflex_ray.models.blt_generate import BLTGenerator, CachedEntropy, generate_bytes
from neuraflex_ray.models.blt_patching import EOS, patch_starts
from neuraflex_ray.models.moe_lm import MoELM

PROMPT = "def f(x):\n    return x"


@pytest.fixture(scope="module")
def entropy_model():
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, num_experts=4, top_k=2,
                      expert_ffn_dim=32, dense_ffn_dim=64, max_seq_len=160, init_std=0.5)  # peaky: entropies vary
    to_model = np.random.default_rng(0).permutation(320)[:257]
    return MoELM(cfg).eval(), to_model


def blt(mode: str, **extra: object) -> BLT:
    overrides = [f"model.patching={mode}", "model.flavour=tiny", "model.max_seq_len=128", "data.block_bytes=64",
                 *(f"model.{k}={v}" for k, v in extra.items())]
    if mode == "entropy":
        overrides.append("data.entropy_model=train")
    torch.manual_seed(0)
    return BLT(load_config("jobs/configs/blt_debug.yaml", overrides).model).eval()


def full_recomputation(model: BLT, seq: list[int], entropy_model) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence in one forward, its starts from the block rule (and byte_entropies)."""
    cfg = model.cfg
    block = torch.tensor([[*seq, 0]])  # the flag of the byte after the last one is read by the last position
    h = None
    if cfg.patching == "entropy":
        h = torch.from_numpy(byte_entropies(entropy_model[0], entropy_model[1], block.numpy()))
    starts = patch_starts(block, h, cfg.patching, threshold=cfg.threshold, size=round(cfg.patch_size),
                          monotonic=cfg.monotonic, min_bytes=cfg.min_patch_bytes)
    with torch.no_grad():
        logits, _ = model(block[:, :-1], starts)
    return logits[0], starts[0]


@pytest.mark.parametrize("mode, extra", [
    ("static", {"patch_size": 3}),
    ("space", {}),
    ("entropy", {"threshold": 3.0}),
    ("entropy", {"threshold": 0.6, "monotonic": True}),
])
def test_incremental_generation_equals_full_recomputation(entropy_model, mode, extra):
    model = blt(mode, **extra)
    entropy = CachedEntropy(*entropy_model) if mode == "entropy" else None
    gen = BLTGenerator(model, entropy)
    steps = list(generate_bytes(gen, PROMPT.encode(), 40, temperature=0.8, seed=1, stop_at_eos=False))
    new = [b for b, _ in steps]
    seq = [EOS, *PROMPT.encode(), *new]
    assert len(new) == 40 and gen.bytes == seq[:-1]  # the last sampled byte is yielded, never fed
    full, starts = full_recomputation(model, seq[:-1], entropy_model)
    assert gen.starts == starts.tolist()  # the same patches
    assert 2 <= len(starts) / int(starts.sum()) <= 8  # several patches
    first = len(PROMPT.encode())  # position of the last prompt byte: it predicts the first new byte
    for i, (_, logits) in enumerate(steps):
        torch.testing.assert_close(logits, full[first + i], atol=2e-5, rtol=1e-4)


def test_greedy_generation_is_the_argmax_of_the_full_forward_and_stops_at_eos(entropy_model):
    model = blt("space")
    new = [b for b, _ in generate_bytes(BLTGenerator(model), b"abc ", 20, stop_at_eos=False)]
    full, _ = full_recomputation(model, [EOS, *b"abc ", *new[:-1]], entropy_model)
    assert new == full[4:].argmax(-1).tolist()  # position 4 (the space) predicts the first new byte
    model.output.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.tensor([EOS]), 1e4))
    assert list(generate_bytes(BLTGenerator(model), b"abc ", 20)) == []  # EOS first: nothing generated


def test_a_generator_refuses_entropy_patching_without_its_entropy_model():
    with pytest.raises(ValueError, match="entropy patching needs the entropy model"):
        BLTGenerator(blt("entropy", threshold=1.0))
