"""Routers (`model.router`) and the dense baseline on the local path; the DeepSpeed EP parity of every
router is in test_deepspeed_train.py."""

import pytest
import torch

from neuraflex_ray.config import ConfigError, load_config
from neuraflex_ray.models.moe import MoE, naive_moe_forward
from neuraflex_ray.models.moe_lm import MoELM, lm_loss, param_counts
from neuraflex_ray.models.routers import ROUTERS, balance_biases, nudge_balance_bias, route
from neuraflex_ray.parallel.deepspeed_moe import capacity_slots


def lm_cfg(*extra: str):
    return load_config("jobs/configs/moe_debug.yaml", ["model.flavour=tiny", "model.vocab_size=128",
                                                       "train.ep_size=1", *extra]).model


def share_of_busiest(experts: torch.Tensor, num_experts: int) -> float:
    return float(torch.bincount(experts.flatten(), minlength=num_experts).max()) / experts.numel()


@pytest.mark.parametrize("moe_every", [1, 2])
@pytest.mark.parametrize("shared", [0, 32])
def test_dense_baseline_matches_active_parameters(moe_every, shared):
    moe = lm_cfg(f"model.moe_every={moe_every}", f"model.shared_expert_ffn_dim={shared}", "model.n_layers=4")
    dense = lm_cfg(f"model.moe_every={moe_every}", f"model.shared_expert_ffn_dim={shared}", "model.n_layers=4",
                   "model.num_experts=0")
    # The router (d x E per MoE layer) is the one thing a dense model has no counterpart for.
    assert param_counts(dense)["active"] == param_counts(moe)["active"] - param_counts(moe)["router"]
    assert param_counts(dense)["router"] == 0
    model = MoELM(dense)
    assert sum(p.numel() for p in model.parameters()) == param_counts(dense)["total"]
    widths = [layer.ffn.w1.out_features for layer in model.layers]
    routed = moe.top_k * moe.expert_ffn_dim + shared
    assert widths == [routed if i % moe_every == moe_every - 1 else moe.dense_ffn_dim for i in range(4)]
    x = torch.randint(0, 128, (2, 16))
    logits, stats = model(x)
    assert stats == [] and logits.shape == (2, 16, 128)
    assert torch.isfinite(lm_loss(logits, x, stats, dense).total)


def test_dense_baseline_refuses_expert_parallelism():
    with pytest.raises(ConfigError, match="train.ep_size=1"):
        load_config("jobs/configs/moe_debug.yaml", ["model.num_experts=0", "train.ep_size=2"])
    with pytest.raises(ConfigError, match="model.router"):
        lm_cfg("model.router=hash")


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("training", [False, True])
def test_every_router_dropless_matches_naive_loop(router, training):
    torch.manual_seed(0)
    moe = MoE(32, 48, num_experts=4, top_k=2, shared_ffn_dim=16, router=router).train(training)
    moe.init_weights(0.1, 0.1)
    if moe.balance_bias is not None:
        moe.balance_bias.copy_(torch.tensor([0.05, -0.05, 0.0, 0.02]))
    x = torch.randn(3, 10, 32)
    y, stats = moe(x)
    torch.testing.assert_close(y, naive_moe_forward(moe, x))
    assert float(stats.expert_fraction.sum()) == pytest.approx(1.0)


def test_aux_free_bias_chooses_but_does_not_weigh():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([-10.0, 0.0, 0.0, 0.0])  # expert 0 is made unchoosable
    r = route(logits, 2, "aux_free", bias)
    assert r.experts.tolist() == [[1, 2]]
    p = logits.softmax(-1)[0]
    torch.testing.assert_close(r.weights[0], torch.stack([p[1], p[2]]) / (p[1] + p[2]))


def test_aux_free_bias_moves_toward_balance_on_skewed_input():
    torch.manual_seed(0)
    e = 4
    logits = torch.randn(512, e)
    logits[:, 0] += 2.0  # most tokens prefer expert 0
    bias = torch.zeros(e)
    start = share_of_busiest(route(logits, 2, "aux_free", bias).experts, e)
    for _ in range(300):
        r = route(logits, 2, "aux_free", bias)
        load = torch.bincount(r.experts.flatten(), minlength=e).float()[None]
        nudge_balance_bias([bias], load, rate=0.01)
    end = share_of_busiest(route(logits, 2, "aux_free", bias).experts, e)
    assert start > 0.45 and end < 1.1 / e, (start, end)
    assert float(bias[0]) < 0 < float(bias[1:].max())  # the busy expert is pushed down, the others up
    # The buffer is found on the model, in layer order, and saved with it.
    model = MoELM(lm_cfg("model.router=aux_free"))
    assert len(balance_biases(model)) == 2
    assert all(f"layers.{i}.ffn.balance_bias" in model.state_dict() for i in range(2))


def test_sinkhorn_balances_in_training_and_is_plain_topk_in_eval():
    torch.manual_seed(0)
    for e, k in [(4, 1), (4, 2), (8, 2)]:
        logits = torch.randn(512, e)
        logits[:, 0] += 3.0
        train = route(logits, k, "sinkhorn", training=True)
        assert share_of_busiest(train.experts, e) <= 1.15 / e
        assert share_of_busiest(route(logits, k, "softmax_topk").experts, e) > 1.5 / e  # what plain top-k does
        ev = route(logits, k, "sinkhorn", training=False)
        assert torch.equal(ev.experts, route(logits, k).experts)
        # Weights are the chosen experts' softmax probabilities, renormalised over the k picks.
        p = logits.softmax(-1).gather(-1, train.experts)
        torch.testing.assert_close(train.weights, p / p.sum(-1, keepdim=True) if k > 1 else p)


def test_capacity_slots_put_first_choices_first():
    experts = torch.tensor([[0, 1], [0, 2], [1, 0]])  # 3 tokens, top-2
    slots = capacity_slots(experts, 3)
    # First choices fill slots in token order (expert 0: tokens 0, 1; expert 1: token 2), then second
    # choices queue behind them (expert 1: token 0 at slot 1; expert 0: token 2 at slot 2).
    assert slots.tolist() == [[0, 1, 0], [1, 0, 2]]
