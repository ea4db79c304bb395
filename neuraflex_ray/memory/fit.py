"""Fitting the gates (λ, temperature, and the adaptive slope) on held-out text the report never sees.

Only the target token's probability matters for the fit, so each position contributes its LM
log-prob of the target and, per attached store, its neighbours' distances, counts and whether each
neighbour's value is the target: no vocabulary-wide distribution is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from neuraflex_ray.memory.mixing import DIST_EPS, Gate, nearest, neighbour_scores
from neuraflex_ray.memory.store import Neighbours

FIT_STEPS = 300
FIT_LR = 0.05
LAMBDA_INIT = 0.25


@dataclass
class StoreRows:
    """One attached store's neighbours of a set of positions, and which of them hold each target."""

    neighbours: Neighbours
    match: np.ndarray  # bool [q, k]: the neighbour's value is the position's target

    @classmethod
    def of(cls, neighbours: Neighbours, targets: np.ndarray) -> StoreRows:
        return cls(neighbours, (neighbours.values == np.asarray(targets)[:, None]) & (neighbours.counts > 0))

    def take(self, rows: np.ndarray) -> StoreRows:
        n = self.neighbours
        return StoreRows(Neighbours(n.dist[rows], n.values[rows], n.counts[rows]), self.match[rows])


def target_log_knn(rows: StoreRows, temperature: float | torch.Tensor) -> torch.Tensor:
    """float64 [q]: log p_kNN(target) (-inf where no neighbour holds it)."""
    s = neighbour_scores(rows.neighbours, temperature)
    s = torch.where(torch.as_tensor(rows.match), s, torch.full_like(s, -math.inf))
    return torch.logsumexp(s, dim=1)


def mixed_target_log_probs(lm_target: np.ndarray, stores: list[StoreRows], gates: list[Gate]) -> np.ndarray:
    """float64 [q]: log of the mixture's probability of each target."""
    lm = torch.as_tensor(lm_target, dtype=torch.float64)
    if not stores:
        return lm.numpy()
    logits = torch.stack([g.logit(nearest(r.neighbours)) for r, g in zip(stores, gates, strict=True)], 1)
    return _mixture(lm, stores, logits, [torch.tensor(g.temperature, dtype=torch.float64) for g in gates]).numpy()


def _mixture(lm: torch.Tensor, stores: list[StoreRows], logits: torch.Tensor, temps: list[torch.Tensor]) -> torch.Tensor:
    log_norm = torch.logsumexp(torch.cat([torch.zeros_like(logits[:, :1]), logits], 1), dim=1)
    terms = [lm - log_norm] + [logits[:, i] - log_norm + target_log_knn(r, temps[i]) for i, r in enumerate(stores)]
    return torch.logsumexp(torch.stack(terms), dim=0)


def fit_gates(lm_target: np.ndarray, stores: list[StoreRows], adaptive: bool, steps: int = FIT_STEPS) -> list[Gate]:
    """Gates (one per store) that maximise the mixture's log-likelihood of the targets: a fixed λ and a
    temperature per store, and with `adaptive` a slope in log d_min as well."""
    lm = torch.as_tensor(lm_target, dtype=torch.float64)
    centers = _centers(stores)
    feats = _features(stores, centers)
    first = [r.neighbours.dist[:, 0] for r in stores]
    log_t = torch.tensor([math.log(max(float(np.median(d[np.isfinite(d)])) if np.isfinite(d).any() else 1.0, 1e-3))
                          for d in first], dtype=torch.float64, requires_grad=True)
    a = torch.full((len(stores),), math.log(LAMBDA_INIT / (1 - LAMBDA_INIT)), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(stores), dtype=torch.float64, requires_grad=adaptive)
    params = [log_t, a] + ([b] if adaptive else [])
    opt = torch.optim.Adam(params, lr=FIT_LR)
    for _ in range(steps):
        opt.zero_grad()
        logits = a + feats * b
        loss = -_mixture(lm, stores, logits, [log_t[i].exp() for i in range(len(stores))]).mean()
        loss.backward()
        opt.step()
    log_t, a, b = log_t.detach(), a.detach(), b.detach()
    return [Gate(float(log_t[i].exp()), float(a[i]), float(b[i]) if adaptive else 0.0, centers[i] if adaptive else 0.0)
            for i in range(len(stores))]


@dataclass
class CrossGates:
    """Gates of several stores attached at once, each a function of every store's nearest distance:
    g_i = a_i + Σ_j B_ij (log d_min,j - c_j). A store can then step aside when another one holds the
    context more closely, which a gate that sees only its own distance cannot do."""

    temperatures: list[float]
    a: list[float]
    weights: list[list[float]]  # B [m, m]
    centers: list[float]

    def logits(self, stores: list[StoreRows]) -> torch.Tensor:
        return _cross_logits(_features(stores, self.centers), torch.tensor(self.a, dtype=torch.float64),
                             torch.tensor(self.weights, dtype=torch.float64))

    def target_log_probs(self, lm_target: np.ndarray, stores: list[StoreRows]) -> np.ndarray:
        lm = torch.as_tensor(lm_target, dtype=torch.float64)
        temps = [torch.tensor(t, dtype=torch.float64) for t in self.temperatures]
        return _mixture(lm, stores, self.logits(stores), temps).numpy()


def _centers(stores: list[StoreRows]) -> list[float]:
    """Each store's mean log nearest distance over the rows it returned something for."""
    logd = [torch.log(nearest(r.neighbours) + DIST_EPS) for r in stores]
    return [float(x[torch.isfinite(x)].mean()) if bool(torch.isfinite(x).any()) else 0.0 for x in logd]


def _features(stores: list[StoreRows], centers: list[float]) -> torch.Tensor:
    """[q, m]: each store's log nearest distance, centred (30 where a store returned nothing)."""
    logd = torch.stack([torch.log(nearest(r.neighbours) + DIST_EPS) for r in stores], 1)
    logd = logd - torch.tensor(centers, dtype=torch.float64)
    return torch.where(torch.isfinite(logd), logd, torch.full_like(logd, 30.0))


def _cross_logits(feats: torch.Tensor, a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return a + feats @ weights.T


def fit_cross_gates(lm_target: np.ndarray, stores: list[StoreRows], start: list[Gate],
                    steps: int = FIT_STEPS) -> CrossGates:
    """CrossGates fitted from each store's own fitted gate (`start`: its temperature, λ and slope)."""
    lm = torch.as_tensor(lm_target, dtype=torch.float64)
    centers = _centers(stores)
    feats = _features(stores, centers)
    log_t = torch.tensor([math.log(g.temperature) for g in start], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([g.a if math.isfinite(g.a) else -10.0 for g in start], dtype=torch.float64, requires_grad=True)
    weights = torch.diag(torch.tensor([g.b for g in start], dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([log_t, a, weights], lr=FIT_LR)
    for _ in range(steps):
        opt.zero_grad()
        loss = -_mixture(lm, stores, _cross_logits(feats, a, weights), list(log_t.exp().unbind())).mean()
        loss.backward()
        opt.step()
    return CrossGates(log_t.detach().exp().tolist(), a.detach().tolist(), weights.detach().tolist(), centers)
