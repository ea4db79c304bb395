"""The selective state-space backbone (`model.backbone: ssm`) on CPU: the scan against a naive
reference, bidirectionality, gradients, bf16, and NeuroFM built on it (no Ray, tiny sizes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neuraflex_ray.config import ConfigError, load_config
from neuraflex_ray.models.neurofm import NeuroFM, SeriesInput, neurofm_flops_per_window, param_count
from neuraflex_ray.models.neurofm_blocks import Block, backbone_block, backbone_block_macs
from neuraflex_ray.models.neurofm_objectives import neurofm_loss
from neuraflex_ray.models.ssm import DT_MAX, DT_MIN, SSMBlock, selective_scan

MODS = {"eeg": 8, "ecg": 4}  # modality -> samples per patch
N, HORIZONS = 4, [1, 2]
NEUROFM = ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny"]


def tiny_cfg(**kw):
    """The tiny NeuroFM flavour with the fields the driver fills from a dataset manifest."""
    cfg = load_config(None, NEUROFM).model
    return dataclasses.replace(cfg, modalities=list(MODS), patch_lens=list(MODS.values()), context_patches=N,
                               horizon_patches=HORIZONS, n_channel_ids=10, **kw)


def block(seed=0, **kw) -> SSMBlock:
    torch.manual_seed(seed)
    return SSMBlock(tiny_cfg(backbone="ssm", ssm_state=4, **kw))


def window(b=4, seed=0):
    """Random full windows (context + future), 2 EEG channels and 1 ECG channel."""
    g = torch.Generator().manual_seed(seed)
    n = N + max(HORIZONS)
    chans = {"eeg": [1, 2], "ecg": [5]}
    return {m: SeriesInput(x=torch.randn(b, len(c), n * MODS[m], generator=g), chan=torch.tensor(c).expand(b, -1).clone(),
                           present=torch.ones(b, dtype=torch.bool)) for m, c in chans.items()}


def naive_scan(u, delta, A, B, C, D):
    """One batch row, channel and step at a time, straight from the recurrence."""
    b, length, c = u.shape
    y = torch.zeros_like(u)
    for i in range(b):
        for k in range(c):
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(length):
                h = torch.exp(delta[i, t, k] * A[k]) * h + delta[i, t, k] * B[i, t] * u[i, t, k]
                y[i, t, k] = C[i, t] @ h + D[k] * u[i, t, k]
    return y


def scan_inputs(b=2, length=6, c=3, n=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    delta = F.softplus(r(b, length, c) - 2)  # positive steps of various sizes
    A = -torch.rand(c, n, generator=g, dtype=dtype) * 3 - 0.1
    return r(b, length, c), delta, A, r(b, length, n), r(b, length, n), r(c)


def test_scan_equals_the_naive_recurrence():
    args = scan_inputs()
    torch.testing.assert_close(selective_scan(*args), naive_scan(*args), rtol=1e-12, atol=1e-12)


def test_forward_scan_is_causal_and_the_block_is_bidirectional():
    u, delta, A, B, C, D = scan_inputs()
    later = u.clone()
    later[:, 1:] += 1.0  # every position but the first
    y, y_later = selective_scan(u, delta, A, B, C, D), selective_scan(later, delta, A, B, C, D)
    torch.testing.assert_close(y[:, 0], y_later[:, 0])  # a forward-only scan: position 0 sees only itself
    assert not torch.allclose(y[:, 1:], y_later[:, 1:])

    blk = block().double()  # float64: at init (small Δ) the far latents' share is small but must be exact
    x = torch.randn(2, 6, blk.out_proj.out_features, dtype=torch.float64)
    moved = x.clone()
    moved[:, -1] += 1.0  # the last position only
    with torch.no_grad():
        out, out_moved = blk.mix(x), blk.mix(moved)
    assert (out[:, 0] - out_moved[:, 0]).abs().max() > 1e-8  # the first latent sees the last
    # Shared weights in both directions: reversing the latents reverses the output, no end is special.
    with torch.no_grad():
        torch.testing.assert_close(blk(x.flip(1)), blk(x).flip(1), rtol=1e-12, atol=1e-12)


def test_block_shape_finite_and_gradients_reach_every_parameter():
    blk = block()
    x = torch.randn(3, 7, blk.out_proj.out_features, requires_grad=True)
    out = blk(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert blk.residual_outputs() == [blk.out_proj, blk.ffn.w2]


def test_init_puts_delta_in_range_and_a_on_s4d_real():
    blk = block()
    dt = F.softplus(blk.dt_bias)
    assert DT_MIN * 0.999 <= dt.min() and dt.max() <= DT_MAX * 1.001
    assert dt.max() / dt.min() > 50  # spread over the range, not one value
    A = -torch.exp(blk.A_log).view(blk.d_inner, blk.d_state)
    torch.testing.assert_close(A, -torch.arange(1.0, blk.d_state + 1).expand_as(A))
    assert torch.equal(blk.D, torch.ones_like(blk.D))
    assert blk.A_log.ndim == blk.D.ndim == blk.dt_bias.ndim == 1  # 1-D: no weight decay (train/strategy.py)
    # From the meta device, reset_parameters() rebuilds all of it (NeuroFM.init_weights does the Linears).
    with torch.device("meta"):
        meta = SSMBlock(tiny_cfg(backbone="ssm", ssm_state=4))
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    for name in ("dt_bias", "A_log", "D"):
        assert torch.equal(getattr(meta, name), getattr(blk, name)), name
    assert torch.isfinite(meta.conv.weight).all() and torch.isfinite(meta.conv.bias).all()


def test_bf16_parameters_scan_in_fp32():
    u, delta, A, B, C, D = (t.to(torch.bfloat16) for t in scan_inputs(b=2, length=128, c=8, n=16, dtype=torch.float32))
    y = selective_scan(u, delta, A, B, C, D)
    assert y.dtype == torch.bfloat16
    # Exactly the fp32 scan of the same (bf16-rounded) inputs, rounded once at the end.
    assert torch.equal(y, selective_scan(*(t.float() for t in (u, delta, A, B, C, D))).to(torch.bfloat16))

    blk = block()
    x = torch.randn(2, 128, blk.out_proj.out_features)  # the base flavour's 128 latents
    with torch.no_grad():
        ref = blk(x)
        low = blk.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_neurofm_on_the_ssm_backbone_trains_and_counts():
    torch.manual_seed(0)
    cfg = tiny_cfg(backbone="ssm")
    model = NeuroFM(cfg)
    assert all(isinstance(b, SSMBlock) for b in model.blocks) and len(model.blocks) == cfg.n_layers
    loss = neurofm_loss(model, window(), cfg, 0, torch.Generator().manual_seed(0))  # contrastive views on
    loss.total.backward()
    assert torch.isfinite(loss.total) and loss.contrastive > 0
    for name, p in model.blocks.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    transformer = NeuroFM(tiny_cfg())
    assert isinstance(transformer.blocks[0], Block)
    assert 0 < param_count(transformer) != param_count(model) > 0
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert param_count(model) - param_count(transformer) == cfg.n_layers * (
        per_block - sum(p.numel() for p in transformer.blocks[0].parameters()))
    assert 0 < backbone_block_macs(tiny_cfg()) != backbone_block_macs(cfg) > 0
    f_ssm, f_tf = neurofm_flops_per_window(cfg, 50), neurofm_flops_per_window(tiny_cfg(), 50)
    assert f_ssm > 0 and f_tf > 0 and f_ssm != f_tf
    # More latents: attention grows with L^2, the scan with L, so the SSM's count grows by less.
    wide = dict(n_latents=8 * cfg.n_latents)
    growth = lambda c: backbone_block_macs(dataclasses.replace(c, **wide)) / backbone_block_macs(c)  # noqa: E731
    assert growth(cfg) == pytest.approx(8) and growth(tiny_cfg()) > 8


@pytest.mark.parametrize("override, field, fix", [
    ("model.backbone=mamba", "model.backbone", "'ssm'"),
    ("model.ssm_state=0", "model.ssm_state", "default is 16"),
    ("model.ssm_expand=-1", "model.ssm_expand", "default is 2"),
    ("model.ssm_conv=0", "model.ssm_conv", "default is 4"),
])
def test_bad_backbone_config_names_the_field_and_the_fix(override, field, fix):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*NEUROFM, override])
    assert field in str(e.value) and fix in str(e.value)
    assert load_config(None, [*NEUROFM, "model.backbone=ssm"]).model.backbone == "ssm"
    with pytest.raises(ValueError, match="model.backbone"):  # built without validation (an old export's config)
        backbone_block(tiny_cfg(backbone="mamba"))
