"""Singular-value fine-tuning (finetune/svf.py): the base exactly at z = 1, U diag(σ ⊙ z) Vᵀ for any
z, only z trains, a small share of the debug MoE's parameters, and state and merge round-trip."""

from __future__ import annotations

import torch

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.finetune.svf import SVF, apply_svf, load_svf_state, merge_svf, svf_modules, svf_state
from neuraflex_ray.models.moe_lm import MoELM

TINY = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2, expert_ffn_dim=32,
            dense_ffn_dim=64, max_seq_len=32, moe_every=1)
TARGETS = ["attention", "dense", "experts"]
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _tiny(seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(ModelConfig(**TINY)).eval()


def _logits(model: MoELM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def test_z_one_is_the_base_exactly_and_any_z_rescales_the_singular_values():
    base, adapted = _tiny(), _tiny()
    counts = apply_svf(adapted, TARGETS)
    assert torch.equal(_logits(adapted), _logits(base))
    assert counts["trainable"] == sum(svf.z.numel() for *_, svf in svf_modules(adapted)) > 0
    path, module, name, svf = next(m for m in svf_modules(adapted) if m[3].U.dim() == 3)  # stacked experts [E, in, out]
    with torch.no_grad():
        svf.z.uniform_(0.5, 1.5)
    w = getattr(module, name)
    want = svf.U @ torch.diag_embed(svf.S * svf.z) @ svf.Vh
    assert w.shape == want.shape and torch.allclose(w, want, atol=1e-5), path


def test_only_z_trains_and_the_trained_state_reloads_and_merges():
    base = _tiny()
    adapted = _tiny()
    apply_svf(adapted, TARGETS)
    before = {k: v.clone() for k, v in adapted.state_dict().items() if "original" in k}
    adapted.train()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        logits = adapted(IDS[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted.eval()
    after = {k: v for k, v in adapted.state_dict().items() if "original" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base weights did not move
    tuned = _logits(adapted)
    assert not torch.allclose(tuned, _logits(base), atol=1e-4)

    state = svf_state(adapted)
    assert all(k.endswith(".svf_z") for k in state) and len(state) == len(svf_modules(adapted))
    again = _tiny()
    apply_svf(again, TARGETS)
    load_svf_state(again, state)
    assert torch.allclose(_logits(again), tuned, atol=1e-6)
    merged = merge_svf(again)
    assert not svf_modules(merged) and torch.allclose(_logits(merged), tuned, atol=1e-5)


def test_svf_trains_under_half_a_percent_of_the_debug_moe():
    model = MoELM(ModelConfig(vocab_size=4096))  # the debug flavour the quickstart trains
    counts = apply_svf(model, TARGETS)
    assert counts["share"] <= 0.005, counts
    assert all(isinstance(p, SVF) for *_, p in svf_modules(model))
