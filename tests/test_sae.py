"""The TopK sparse autoencoder on a toy problem with known sparse factors (neuraflex_ray/models/sae.py)."""

from __future__ import annotations

import math

import pytest
import torch

from neuraflex_ray.models.sae import SAEConfig, TopKSAE, fvu, train_step

D, ATOMS, K = 16, 24, 3


def toy(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x = codes @ atoms + offset: each row mixes exactly K of ATOMS unit-norm directions, positive values."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(ATOMS, D, generator=g), dim=1)
    idx = torch.stack([torch.randperm(ATOMS, generator=g)[:K] for _ in range(n)])
    codes = torch.zeros(n, ATOMS).scatter(1, idx, 0.5 + torch.rand(n, K, generator=g))
    return codes @ atoms + 0.3, atoms


def trained(steps: int = 1500, seed: int = 0) -> tuple[TopKSAE, torch.Tensor, torch.Tensor]:
    x, atoms = toy(4096, seed)
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=D, expansion=3, k=K, dead_after=50))
    sae.init_decoder_bias(x)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        train_step(sae, x[torch.randint(0, len(x), (256,), generator=g)], opt)
    return sae, x, atoms


def test_it_recovers_the_known_sparse_factors_with_unit_norm_decoder_rows():
    sae, x, atoms = trained()
    with torch.no_grad():
        out = sae(x)
    assert float(out.fvu) < 0.1  # explained variance above 0.9 at L0 = 3
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents), atol=1e-5)
    best = (atoms @ sae.W_dec.detach().T).max(1).values  # each true factor's closest decoder row
    assert float((best > 0.9).float().mean()) >= 0.9, best


def test_auxk_gives_dead_latents_a_gradient_and_revives_them():
    x, _ = toy(512, 1)
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=D, expansion=3, k=K, dead_after=5))
    with torch.no_grad():
        sae.steps_since_fired[: sae.cfg.n_latents // 2] = 10  # half the latents count as dead
        out = sae(x)
    assert float(out.aux) > 0
    sae.zero_grad()
    sae(x).loss.backward()
    dead_rows = sae.encoder.weight.grad[: sae.cfg.n_latents // 2]
    assert float(dead_rows.abs().sum()) > 0  # AuxK reaches latents the main loss would not
    sae.steps_since_fired.zero_()
    assert float(sae(x).aux) == 0.0  # nothing dead, no auxiliary term


def test_parallel_gradient_removal_keeps_steps_on_the_unit_sphere():
    x, _ = toy(256, 2)
    sae = TopKSAE(SAEConfig(d_in=D, expansion=2, k=K))
    sae(x).loss.backward()
    sae.remove_parallel_grads()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(sae.cfg.n_latents), atol=1e-6)
    assert float(fvu(x, x)) == 0.0


def test_splicing_an_identity_sae_leaves_the_lm_loss_unchanged(tmp_path):
    import numpy as np

    from neuraflex_ray.checkpoint import export_family, load_exported
    from neuraflex_ray.eval.lm import heldout_loss
    from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
    from neuraflex_ray.interpret.sae_eval import identity_sae, sae_stats, spliced_loss_score

    export = scratch_lm_export(tmp_path / "lm", vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               num_experts=4, expert_ffn_dim=32, dense_ffn_dim=64, max_seq_len=64)
    model, _ = load_exported(export)
    blocks = np.random.default_rng(0).integers(0, 500, size=(8, 33))
    site = export_family(export).activation_sites(model)["resid_1"]  # the last block's output
    sae = identity_sae(32)
    out = spliced_loss_score(lambda: heldout_loss(model, blocks), site, sae)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-6)
    # Zeroed, the last residual normalises to zero logits: the uniform distribution's ln V exactly. An untrained
    # model is near uniform anyway, so zeroing barely moves its loss and no score is given (gap reported).
    assert out["ce_zero"] == pytest.approx(math.log(model.cfg.vocab_size), abs=1e-5)
    assert out["ce_loss_score"] is None or out["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    x = np.random.default_rng(1).normal(size=(2000, 32)).astype(np.float32)
    stats = sae_stats(sae, x)
    assert stats["explained_variance"] == pytest.approx(1.0, abs=1e-6) and stats["dead_frac"] == 0.0
    assert stats["l0"] == pytest.approx(32.0)  # one of +e_j / -e_j per dimension


def test_pca_baseline_explains_a_low_rank_signal_with_its_rank():
    import numpy as np

    from neuraflex_ray.interpret.sae_eval import pca_explained_variance

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(3, 20))
    train, test = rng.normal(size=(500, 3)) @ mix, rng.normal(size=(200, 3)) @ mix
    assert pca_explained_variance(train, test, 3) == pytest.approx(1.0, abs=1e-9)
    assert pca_explained_variance(train, test, 1) < 0.9
