"""Issue 27's objectives against collapse, on CPU (no Ray): each term is zero or minimal where it
should be, large on a collapsed batch, and training with it on moves the embedding's spread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuraflex_ray.eval.embedding_stats import spread
from neuraflex_ray.models.neurofm import spectral_bands
from neuraflex_ray.models.neurofm_objectives import band_edges, neurofm_loss, vicreg_terms, window_band_power
from tests.test_neurofm_model import MODS, N, make_window, new_model


def test_vicreg_terms_are_near_zero_for_spread_decorrelated_rows_and_large_for_collapsed():
    g = torch.Generator().manual_seed(0)
    spread_rows = torch.randn(512, 16, generator=g)
    var, cov, n = vicreg_terms(spread_rows, torch.ones(512, dtype=torch.bool), 0.5)
    assert float(var) == 0.0 and float(cov) < 0.05 and int(n) == 512
    collapsed = torch.randn(1, 16, generator=g).expand(512, -1) * torch.rand(512, 1, generator=g) * 5  # one direction
    var, cov, _ = vicreg_terms(collapsed, torch.ones(512, dtype=torch.bool), 0.5)
    assert float(var) > 0.45  # scale differs row to row, but the rms-normalised rows are one point
    shared = torch.randn(512, 1, generator=g)  # every dimension carries the same signal
    correlated = shared + 0.1 * torch.randn(512, 16, generator=g)
    _, cov_corr, _ = vicreg_terms(correlated, torch.ones(512, dtype=torch.bool), 0.5)
    assert float(cov_corr) > 10 * float(vicreg_terms(spread_rows, torch.ones(512, dtype=torch.bool), 0.5)[1])


def test_vicreg_terms_ignore_rows_of_absent_modalities():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 8, generator=g)
    rows = torch.rand(64, generator=g) < 0.5
    junk = z.clone()
    junk[~rows] = 1e6  # what an absent modality's projection holds does not matter
    for a, b in zip(vicreg_terms(z, rows, 0.5), vicreg_terms(junk, rows, 0.5), strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-5)
    var, cov, n = vicreg_terms(z, torch.zeros(64, dtype=torch.bool).index_fill(0, torch.tensor([3]), True), 0.5)
    assert float(var) == float(cov) == float(n) == 0.0  # one window: nothing to measure


@pytest.mark.parametrize(("n_bins", "bands"), [(256, 8), (8, 8), (7, 8), (3, 2), (64, 1)])
def test_band_edges_cover_every_bin_once_with_no_empty_band(n_bins, bands):
    edges = band_edges(n_bins, bands)
    assert edges[0] == 0 and edges[-1] == n_bins and len(edges) == min(bands, n_bins) + 1
    assert all(b > a for a, b in zip(edges, edges[1:], strict=False))


def test_band_power_peaks_in_the_band_of_a_sinusoid_and_skips_padded_channels():
    t = torch.arange(128, dtype=torch.float64)
    edges = band_edges(64, 8)
    for k in (2, 9, 40):
        x = torch.stack([torch.sin(2 * math.pi * k * t / 128), torch.randn(128) * 100])[None]  # [1, 2, 128]
        p = window_band_power(x, torch.tensor([[True, False]]), 8)[0]
        band = next(i for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False)) if a <= k - 1 < b)  # DC dropped
        assert int(p.argmax()) == band, (k, p)


def _train(seed: int, steps: int = 40, **weights) -> tuple[float, float]:
    """Spread of the fused embedding and of the ECG projection on held-out toy windows after
    training a tiny NeuroFM on a fixed toy batch."""
    model = new_model(seed=seed, **weights)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = make_window(b=16, seed=seed)
    for step in range(steps):
        loss = neurofm_loss(model, train, model.cfg, step, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    held = make_window(b=32, seed=seed + 100)
    with torch.no_grad():
        ctx = {m: type(w)(x=w.x[..., : N * MODS[m]], chan=w.chan, present=w.present) for m, w in held.items()}
        out = model(ctx, decode=False, per_modality=True)
    return spread(out.embedding.numpy()), spread(out.modality_embeddings["ecg"].numpy())


def test_each_term_moves_the_spread_it_targets_on_a_toy_batch():
    base_fused, base_proj = _train(0, contrastive_weight=0.1)
    _, vic_proj = _train(0, contrastive_weight=0.1, vicreg_weight=1.0, vicreg_cov_weight=0.04)
    spec_fused, _ = _train(0, contrastive_weight=0.1, spectral_weight=1.0)
    assert vic_proj > base_proj, (vic_proj, base_proj)
    assert spec_fused > base_fused, (spec_fused, base_fused)


def test_spectral_head_exists_only_when_trained_and_fits_each_modality():
    assert new_model().spectral_head is None  # exports without it keep their parameter set
    model = new_model(spectral_weight=1.0, spectral_bands=8)
    for m in MODS:
        assert model.spectral_head[m].out_features == spectral_bands(model.cfg, m) == min(8, N * MODS[m] // 2)
    loss = neurofm_loss(model, make_window(b=4), model.cfg, 0, torch.Generator().manual_seed(0))
    assert float(loss.spectral.detach()) > 0 and np.isfinite(float(loss.total.detach()))
