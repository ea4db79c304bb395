"""Features people can read (neuraflex_ray/interpret/features.py): token-kind precision of SAE latents and
of the baseline directions, against counts done by hand."""

from __future__ import annotations

import numpy as np
import torch

from neuraflex_ray.interpret.features import LabelledRows, concept_table, direction_concepts, latent_kind_counts
from neuraflex_ray.interpret.sae_eval import identity_sae


def _tokens(rng: np.random.Generator, n: int = 600, d: int = 4) -> LabelledRows:
    kind = rng.integers(0, 3, n)
    x = rng.standard_normal((n, d)).astype(np.float32) * 0.1
    x[:, 0] += (kind == 0) * 3.0  # neuron 0 fires on kind 0 only; the others carry no kind
    return LabelledRows(x, kind, ("a", "b", "c"), lambda row: {"row": str(row)})


def test_latent_counts_are_the_firings_per_kind():
    rng = np.random.default_rng(0)
    data = _tokens(rng)
    sae = identity_sae(4)  # latent j fires where x_j > 0 (j < 4) or x_j < 0 (j >= 4), all four top-k
    counts = latent_kind_counts(sae, data.activation, data.kind, 3)
    dense = torch.cat([torch.from_numpy(data.activation), -torch.from_numpy(data.activation)], 1).numpy() > 0
    want = np.stack([[(dense[:, j] & (data.kind == c)).sum() for c in range(3)] for j in range(8)])
    assert np.array_equal(counts, want)


def test_a_direction_is_a_concept_only_where_its_top_firings_are_one_kind():
    rng = np.random.default_rng(1)
    data = _tokens(rng)
    eye = np.eye(4, dtype=np.float32)
    ok, _ = direction_concepts(data.activation, data.kind, 3, eye, rate=0.1, min_firings=20, precision=0.9)
    assert ok.tolist() == [True, False, False, False]
    # too few firings at every rate: nothing qualifies
    assert not direction_concepts(data.activation, data.kind, 3, eye, rate=0.005, min_firings=20, precision=0.9)[0].any()


def test_the_table_counts_latents_neurons_and_random_directions():
    data = _tokens(np.random.default_rng(2))
    table = concept_table(identity_sae(4), data, min_firings=20, precision=0.9)
    # latent 0 (+x_0) fires on all of kind 0 but also on half of the rest: not a concept; no latent is
    assert table["concept_latents"] == 0.0 and table["concept_neurons"] == 0.25
    # at the SAE's own rate (1/2 here) neuron 0's top half is 2/3 kind 0: only the generous rule finds it
    assert table["concept_neurons_plain"] == 0.0
    assert 0 <= table["concept_random"] <= 1 and table["tokens"] == 600
    assert len(table["per_latent"]["precision"]) == 8
