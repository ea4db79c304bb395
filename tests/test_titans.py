"""The Titans memory (models/titans.py) and sliding-window attention on the local path: the update is
the gradient step it claims, reads are causal, the state belongs to one sequence, and every way of
feeding a sequence (whole, chunk by chunk, continuous batching) computes the same thing."""

import pytest
import torch

from neuraflex_ray.config import ConfigError, load_config
from neuraflex_ray.models.moe_lm import MoELM, generate, lm_loss
from neuraflex_ray.models.titans import MAX_STEP, NeuralMemory, memory_grads

TINY = ["model.flavour=tiny", "model.vocab_size=128", "model.max_seq_len=64", "data.seq_len=32"]


def tiny(*overrides: str) -> MoELM:
    torch.manual_seed(0)
    return MoELM(load_config(None, [*TINY, *overrides]).model).eval()


@pytest.fixture(scope="module")
def titans():
    return tiny("model.memory=titans", "model.attn_window=8", "model.memory_chunk=4")


def test_linear_memory_update_is_the_hand_computed_gradient_step():
    torch.manual_seed(0)
    mem = NeuralMemory(2, chunk=2, depth=1)
    mem.init_weights(0.02, 0.02)
    w = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    s = torch.tensor([[[0.1, 0.0], [0.0, -0.1]]])
    k = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])
    v = torch.tensor([[[1.0, -1.0], [0.0, 0.0]]])
    x = torch.tensor([[[0.3, -0.7], [0.1, 0.1]]])
    # Rates 0.5 + 1.0 exceed the chunk's budget of 1: they are scaled to 1/3 and 2/3.
    (w1,), (s1,) = mem.update([w], [s], k, v, torch.tensor([[0.5, 1.0]]), x)
    # By hand: M(k1) = k1 W = [0.6 + 0.4, 1.6] = [1.0, 1.6], error [0, 2.6]; M(k2) = [1, 0], error [1, 0].
    # grad = 2 * (1/3) * k1^T [0, 2.6] + 2 * (2/3) * k2^T [1, 0]
    grad = torch.tensor([[4 / 3, 2 / 3 * 0.6 * 2.6], [0.0, 2 / 3 * 0.8 * 2.6]])
    grad = grad * MAX_STEP / grad.norm()  # a step's norm is clipped to MAX_STEP (this one is 2.2)
    eta = torch.sigmoid(mem.momentum_gate(x.mean(1))).detach()  # the gates' weights are zero at init:
    alpha = torch.sigmoid(mem.forget_gate(x.mean(1))).detach()  # sigmoid(2) and sigmoid(-4)
    assert float(eta) == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert torch.allclose(s1[0], eta * s[0] - grad, atol=1e-6)
    assert torch.allclose(w1[0], (1 - alpha) * w[0] + s1[0], atol=1e-6)
    # Within the budget the rate is used as it is, and a step under the clip is not scaled.
    (_,), (s2,) = mem.update([w], [s], k[:, :1], v[:, :1], torch.tensor([[0.1]]), x[:, :1])
    assert torch.allclose(s2[0], eta * s[0] - torch.tensor([[0.0, 0.2 * 0.6 * 2.6], [0.0, 0.2 * 0.8 * 2.6]]), atol=1e-6)


def test_two_layer_memory_gradient_equals_autograd():
    torch.manual_seed(1)
    weights = [torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True),
               torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)]
    k, v, lr = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64), \
        torch.rand(3, 7, dtype=torch.float64)
    loss = (lr[..., None] * (torch.nn.functional.silu(k @ weights[0]) @ weights[1] - v).pow(2)).sum()
    expected = torch.autograd.grad(loss, weights)
    for got, want in zip(memory_grads(weights, k, v, lr), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_reads_are_causal_chunk_by_chunk(titans):
    x = torch.randint(0, 128, (1, 24))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 128  # in the third chunk of four tokens
    with torch.no_grad():
        a, b = titans(x)[0], titans(y)[0]
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_memory_carries_what_the_window_no_longer_sees(titans):
    window_only = tiny("model.attn_window=8")
    x = torch.randint(0, 128, (1, 32))
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % 128
    with torch.no_grad():
        # Two layers of an 8-token window reach 14 tokens back: position 17 on never sees position 2;
        # the memory took it in with chunk 0.
        assert torch.equal(window_only(x)[0][:, 17:], window_only(y)[0][:, 17:])
        assert not torch.allclose(window_only(x)[0][:, 16], window_only(y)[0][:, 16])
        assert not torch.allclose(titans(x)[0][:, 20:], titans(y)[0][:, 20:])


def test_rows_of_a_batch_share_nothing(titans):
    x = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        batched = titans(x)[0]
        for i in range(3):
            assert torch.equal(batched[i], titans(x[i:i + 1])[0][0])


def test_state_starts_again_for_every_sequence(titans):
    a, b = torch.randint(0, 128, (1, 30)), torch.randint(0, 128, (1, 30))
    caches = titans.new_caches(1)
    with torch.no_grad():
        titans(a, caches, 0)  # A's memory is in the caches ...
        after_a = titans(b, caches, 0)[0]  # ... and a new sequence at position 0 starts from W_0
        assert torch.equal(after_a, titans(b, titans.new_caches(1), 0)[0])
        assert torch.allclose(after_a, titans(b)[0], atol=1e-5)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)])
def test_cached_generation_updates_the_memory_chunk_by_chunk(titans, sampling):
    prompt = [3, 1, 4, 1, 5, 9, 2]  # 7 tokens: the chunk of four ends inside the prompt and during decode
    with_cache = generate(titans, prompt, 30, use_cache=True, **sampling)
    assert len(with_cache) == 30 and with_cache == generate(titans, prompt, 30, use_cache=False, **sampling)


def test_continuous_batching_decode_equals_whole_sequences(titans):
    """Rows prefilled alone at their own lengths, then decoded together at per-row positions (the
    serving engine's way), compute what each whole sequence computes; a row that is not `live` in a
    step keeps its memory as it was."""
    x = torch.randint(0, 128, (3, 40))
    lens = [5, 13, 7]
    caches = titans.new_caches(3)
    outs: list[list[torch.Tensor]] = [[] for _ in lens]
    with torch.no_grad():
        whole = titans(x)[0]
        for i, n in enumerate(lens):
            outs[i].append(titans(x[i:i + 1, :n], [c.slot(i) for c in caches], 0)[0][0])
        pos = torch.tensor(lens)
        for step in range(20):
            live = torch.tensor([True, True, step % 3 != 0])  # row 2 sits out every third step
            logits = titans(x[torch.arange(3), pos][:, None], caches, pos, live)[0]
            for i in live.nonzero().squeeze(1).tolist():
                outs[i].append(logits[i])
            pos = pos + live.long()
    for i, out in enumerate(outs):
        got = torch.cat(out)
        assert torch.allclose(got, whole[i, :len(got)], atol=1e-5)


def test_memory_and_window_train_end_to_end():
    model = tiny("model.memory=titans", "model.attn_window=8", "model.memory_chunk=4").train()
    x = torch.randint(0, 128, (2, 25))
    logits, stats = model(x[:, :-1])
    lm_loss(logits, x[:, 1:], stats, model.cfg).total.backward()
    mem = model.layers[0].memory
    for p in (mem.init[0], mem.init[1], mem.wk.weight, mem.lr_gate.bias, mem.forget_gate.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0  # the meta-parameters learn through the updates


@pytest.mark.parametrize("override,field", [("model.memory=lstm", "model.memory"),
                                            ("model.memory_depth=3", "model.memory_depth"),
                                            ("model.memory_variant=mac", "model.memory_variant"),
                                            ("model.attn_window=-1", "model.attn_window")])
def test_bad_memory_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [*TINY, "model.memory=titans", override])
