"""The collapse measures (eval/embedding_stats.py) against their definitions on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuraflex_ray.eval.embedding_stats import RANKME_EPS, effective_rank, embedding_report, spread


def test_spread_is_zero_for_one_direction_and_blind_to_scale():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    collapsed = np.outer(rng.uniform(0.1, 10, 50), direction)  # every window the same direction, any length
    assert spread(collapsed) == pytest.approx(0.0, abs=1e-12)
    z = rng.normal(size=(200, 16))
    assert spread(z) == pytest.approx(spread(z * rng.uniform(0.01, 100, (200, 1))))  # per-row scale changes nothing


def test_spread_of_an_orthonormal_basis():
    # Unit vectors e_1..e_d: the centroid is (1/d, ..., 1/d) and each lies sqrt(1 - 1/d) from it.
    d = 8
    assert spread(np.eye(d)) == pytest.approx(math.sqrt(1 - 1 / d))


def test_effective_rank_counts_the_directions_used():
    assert effective_rank(np.eye(10)) == pytest.approx(10.0, rel=1e-4)  # ten equal singular values
    rng = np.random.default_rng(1)
    line = np.outer(rng.normal(size=40), rng.normal(size=12))  # rank one
    assert effective_rank(line) == pytest.approx(1.0, rel=1e-4)
    # Singular values 3 and 1: p = (0.75, 0.25) + eps, rank = exp(H(p)).
    z = np.diag([3.0, 1.0])
    p = np.array([0.75, 0.25]) + RANKME_EPS
    assert effective_rank(z) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank(z * 1000) == pytest.approx(effective_rank(z))


def test_report_on_too_few_windows_is_nan_not_an_error():
    r = embedding_report(np.ones((1, 4)))
    assert r["windows"] == 1 and math.isnan(r["spread"]) and math.isnan(r["effective_rank"])


def test_retrieval_permutation_p_value():
    from neuraflex_ray.eval.retrieval import permutation_p, top_k

    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 8))
    b = a + 0.1 * rng.normal(size=(40, 8))
    matched = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    # cosine similarity: every window nearest its own partner
    assert top_k(matched, 1) == 1.0
    assert permutation_p([matched], 1, n_perm=199) == pytest.approx(1 / 200)  # no re-pairing does as well
    unrelated = rng.normal(size=(40, 40))
    assert permutation_p([unrelated], 1, n_perm=199) > 0.05
    # Pooled over pairs: one informative pair beside one unrelated one still beats chance.
    assert permutation_p([matched, unrelated], 1, n_perm=199) < 0.01
