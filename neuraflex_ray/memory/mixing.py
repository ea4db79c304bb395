"""p_kNN from a query's neighbours, the λ gate of each attached datastore, and the mixture.

With datastores i = 1..m attached, each has a gate g_i (a logit): fixed (g_i = a_i) or adaptive
(g_i = a_i + b_i (log d_min,i - c_i), d_min the query's nearest squared distance in that store, so
a store that holds nothing close to the query steps aside). The weights are softmax-like with the
LM's own logit fixed at 0: λ_i = exp(g_i) / (1 + Σ_j exp(g_j)), λ_LM = 1 / (1 + Σ_j exp(g_j)).
One store with a fixed gate is the paper's (1 - λ) p_LM + λ p_kNN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from neuraflex_ray.memory.store import Neighbours

DIST_EPS = 1e-6  # log of a zero distance (the query's own key)


@dataclass
class Gate:
    temperature: float  # p_kNN ∝ count · exp(-d / temperature)
    a: float  # logit of λ (against the LM's 0)
    b: float = 0.0  # adaptive: slope in log d_min; 0 = a fixed λ
    center: float = 0.0  # log d_min is centred here (the fitting data's mean)

    @classmethod
    def fixed(cls, lam: float, temperature: float) -> Gate:
        if not 0 <= lam < 1:
            raise ValueError(f"λ={lam} must lie in [0, 1)")
        return cls(temperature, math.log(lam / (1 - lam)) if lam > 0 else -math.inf)

    def logit(self, dmin: torch.Tensor) -> torch.Tensor:
        if self.b == 0:
            return torch.full_like(dmin, self.a, dtype=torch.float64)
        return self.a + self.b * (torch.log(dmin.double() + DIST_EPS) - self.center)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def neighbour_scores(n: Neighbours, temperature: float | torch.Tensor) -> torch.Tensor:
    """float64 [q, k]: log weights of each neighbour, normalised over the k (log count - d / T)."""
    dist = torch.as_tensor(n.dist, dtype=torch.float64)
    counts = torch.as_tensor(n.counts, dtype=torch.float64)
    s = torch.log(counts) - torch.where(torch.isfinite(dist), dist, torch.zeros_like(dist)) / temperature
    s = torch.where(counts > 0, s, torch.full_like(s, -math.inf))
    return s - torch.logsumexp(s, dim=1, keepdim=True)


def knn_log_probs(n: Neighbours, temperature: float, vocab: int) -> torch.Tensor:
    """float64 [q, V]: log p_kNN over the vocabulary (-inf for tokens no neighbour stores)."""
    w = neighbour_scores(n, temperature).exp().nan_to_num(0.0)
    p = torch.zeros(w.shape[0], vocab, dtype=torch.float64)
    p.scatter_add_(1, torch.as_tensor(n.values, dtype=torch.int64), w)
    return torch.log(p)


def mix_log_probs(lm_log_probs: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """log of λ_LM p_LM + Σ λ_i p_kNN,i, for lm_log_probs [q, V] and parts [(knn log-probs [q, V], gate logits
    [q])]. With no part, or every gate at -inf (λ = 0), the LM's own log-probs come back unchanged."""
    if not parts or all(bool(torch.all(torch.isneginf(g))) for _, g in parts):
        return lm_log_probs
    gates = torch.stack([g for _, g in parts], 1)  # [q, m]
    log_norm = torch.logsumexp(torch.cat([torch.zeros_like(gates[:, :1]), gates], 1), dim=1)  # log(1 + Σ e^g)
    terms = [lm_log_probs.double() - log_norm[:, None]]
    terms += [lp + (g - log_norm)[:, None] for (lp, _), g in zip(parts, gates.unbind(1), strict=True)]
    return torch.logsumexp(torch.stack(terms), dim=0).to(lm_log_probs.dtype)


def nearest(n: Neighbours) -> torch.Tensor:
    return torch.as_tensor(np.min(n.dist, axis=1), dtype=torch.float64)
