"""The TopK sparse autoencoder on a toy problem with known sparse factors (neuraflex_ray/models/sae.py)."""

from __future__ import annotations

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
