"""Representation comparisons against closed-form cases (neuraflex_ray/interpret/similarity.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from neuraflex_ray.interpret.similarity import (
    canonical_correlations,
    cca,
    linear_cka,
    procrustes_distance,
    rsa,
    rsa_noise_ceiling,
    svcca,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(200, 16)) @ RNG.normal(size=(16, 32))  # rank 16 in 32 units


def test_a_rotated_scaled_shifted_copy_is_the_same_representation():
    y = 3.7 * X @ ortho_group.rvs(32, random_state=1) + 5.0
    assert linear_cka(X, y) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(X, y, debiased=False) == pytest.approx(1.0, abs=1e-9)
    assert procrustes_distance(X, y) == pytest.approx(0.0, abs=1e-9)
    assert svcca(X, y) == pytest.approx(1.0, abs=1e-6)
    assert rsa(X, 2.0 * X) == pytest.approx(1.0)


def test_a_non_isotropic_stretch_is_not_a_rotation():
    y = X * np.linspace(0.1, 3.0, 32)  # CCA is blind to it, CKA and Procrustes are not
    assert cca(X, y) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, y) < 0.99 and procrustes_distance(X, y) > 0.01


def test_the_debiased_cka_of_unrelated_matrices_is_near_zero_where_the_biased_one_is_not():
    a, b = RNG.normal(size=(100, 200)), RNG.normal(size=(100, 200))  # width above the number of inputs
    assert abs(linear_cka(a, b)) < 0.05
    assert linear_cka(a, b, debiased=False) > 0.5


def test_cca_has_the_closed_form_correlations_and_fails_when_width_reaches_the_inputs():
    z = RNG.normal(size=(5000, 2))
    noise = RNG.normal(size=(5000, 2))
    x = np.c_[z[:, 0], noise[:, 0]]
    y = np.c_[0.6 * z[:, 0] + 0.8 * noise[:, 1], z[:, 1]]  # corr(x0, y0) = 0.6, the rest independent
    rho = canonical_correlations(x, y)
    assert rho[0] == pytest.approx(0.6, abs=0.03) and rho[1] == pytest.approx(0.0, abs=0.05)
    a, b = RNG.normal(size=(50, 50)), RNG.normal(size=(50, 50))
    assert cca(a, b) == pytest.approx(1.0, abs=1e-6)  # every correlation 1 for unrelated inputs


def test_procrustes_is_bounded_and_the_rsa_noise_ceiling_is_high_for_a_redundant_code():
    a, b = RNG.normal(size=(300, 8)), RNG.normal(size=(300, 8))
    assert 1.0 < procrustes_distance(a, b) <= 2.0
    redundant = np.repeat(RNG.normal(size=(60, 4)), 8, axis=1) + 0.01 * RNG.normal(size=(60, 32))
    assert rsa_noise_ceiling(redundant) > 0.95
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(a, b[:10])
