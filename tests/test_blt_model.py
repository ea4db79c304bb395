"""The Byte Latent Transformer in one process (neuraflex_ray/models/blt.py): causal over bytes and patches,
blind to its padded patch slots, and trainable."""

from __future__ import annotations

import pytest
import torch

from neuraflex_ray.config.blt import BLTConfig
from neuraflex_ray.models.blt import BLT, blt_loss, patch_slots
from neuraflex_ray.models.blt_patching import patch_starts

T = 48


def tiny() -> BLTConfig:
    cfg = BLTConfig(dim=32, n_heads=2, local_ffn_dim=64, hash_buckets=256, max_seq_len=T)
    cfg.global_model.dim, cfg.global_model.n_layers, cfg.global_model.expert_ffn_dim = 64, 2, 64
    return cfg


@pytest.fixture(scope="module")
def model() -> BLT:
    torch.manual_seed(0)
    return BLT(tiny()).eval()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 257, (3, T + 1), generator=g)
    starts = patch_starts(x, torch.rand(3, T + 1, generator=g) * 3, "entropy", threshold=1.8, min_bytes=2)
    return x, starts


@pytest.mark.parametrize("t", [0, 5, 23, 46])
def test_position_t_depends_on_bytes_up_to_t_and_the_start_flag_of_byte_t_plus_1_only(model, t):
    x, starts = batch(0)
    x2, starts2 = batch(1)
    x2[:, :t + 1], starts2[:, :t + 2] = x[:, :t + 1], starts[:, :t + 2]
    with torch.no_grad():
        a, _ = model(x[:, :-1], starts)
        b, _ = model(x2[:, :-1], starts2)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:]) if t < T - 1 else True


def test_padded_patch_slots_change_nothing(model):
    x, starts = batch(2)
    with torch.no_grad():
        a, _ = model(x[:, :-1], starts)
        b, _ = model(x[:, :-1], starts, n_slots=patch_slots(model.cfg, T) + 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax_topk", "sinkhorn"])
def test_padded_patch_slots_are_routed_nowhere(router):
    """In training, too: the router losses and expert loads count real patches only, however many empty
    slots follow them (padding would otherwise tune load balancing and, under expert parallelism, take
    expert capacity)."""
    cfg = tiny()
    cfg.global_model.router = router
    torch.manual_seed(0)
    m = BLT(cfg).train()
    x, starts = batch(3)
    a, sa = m(x[:, :-1], starts)
    b, sb = m(x[:, :-1], starts, n_slots=patch_slots(cfg, T) + 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for s, t in zip(sa, sb, strict=True):
        torch.testing.assert_close(s.aux_loss, t.aux_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(s.expert_fraction, t.expert_fraction, rtol=0, atol=0)
    n_real = int(starts[:, :-1].sum())
    assert float(sa[0].expert_fraction.sum()) == pytest.approx(1.0)
    assert sa[0].expert_fraction.mul(n_real * cfg.global_model.top_k).round().sum() == n_real * cfg.global_model.top_k


def test_more_patches_than_slots_is_an_error_naming_the_setting(model):
    x = torch.randint(0, 257, (1, T))
    every_byte = torch.ones(1, T + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="min_patch_bytes"):
        model(x, every_byte)


def test_it_learns_a_repeating_text():
    torch.manual_seed(0)
    m = BLT(tiny())
    x = torch.tensor([list((b"the model routes each byte. " * 4)[:T + 1])] * 2)
    starts = patch_starts(x, None, "space")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits, stats = m(x[:, :-1], starts)
        loss = blt_loss(logits, x[:, 1:], stats, m.cfg)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
