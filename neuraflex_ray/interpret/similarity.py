"""How alike two representations of the same n inputs are: X [n, p] and Y [n, q], rows paired.

- `linear_cka`: centred kernel alignment with linear kernels (Kornblith et al. 2019), by default with
  the unbiased HSIC estimator (Song et al. 2012; Davari et al. 2023): the biased estimator gives two
  independent random matrices a CKA far from 0 when p or q is not small against n.
- `rsa`: Spearman correlation between the two representational dissimilarity matrices (1 - Pearson
  correlation between inputs' activation patterns), over the upper triangle; `rsa_noise_ceiling`: how
  well one representation's RDM agrees with itself across two random halves of its units
  (Spearman-Brown corrected), the most an RSA with it could say.
- `procrustes_distance`: both centred and scaled to unit Frobenius norm, then the squared distance
  left after the best rotation, min_R |X - Y R|^2 = 2 - 2 |X^T Y|_* (0 for a rotated or isotropically
  scaled copy, at most 2).
- `cca` / `svcca`: mean canonical correlation, on the raw matrices or after keeping the top singular
  directions that explain 99 % of each one's variance (Raghu et al. 2017). CCA needs n well above
  p + q: with as many dimensions as samples every correlation is 1, whatever the inputs.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D activation matrix [inputs, units], got shape {x.shape}")
    return x - x.mean(0, keepdims=True)


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _centred(x), _centred(y)
    if len(x) != len(y):
        raise ValueError(f"the two representations must be of the same inputs: {len(x)} vs {len(y)} rows")
    return x, y


def _zero_diagonal_gram(x: np.ndarray) -> np.ndarray:
    g = x @ x.T
    np.fill_diagonal(g, 0.0)
    return g


def _hsic_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Song et al. (2012)'s unbiased HSIC of two symmetric Gram matrices with zero diagonals, in O(n^2):
    tr(AB) = sum(A * B) and 1^T A B 1 = (A 1) . (B 1) for symmetric A, B."""
    n = len(a)
    trace_ab = float((a * b).sum())
    ones_ab_ones = float(a.sum(0) @ b.sum(0))
    return (trace_ab + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * ones_ab_ones / (n - 2)) / (n * (n - 3))


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = True) -> float:
    """Linear CKA in [0, 1] (the debiased estimate can dip slightly below 0 for unrelated inputs)."""
    x, y = _paired(x, y)
    if debiased:
        if len(x) < 4:
            raise ValueError("the debiased CKA needs at least 4 inputs")
        return float(cka_matrix([x], [y])[0, 0])
    cross = np.linalg.norm(x.T @ y) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / den) if den > 0 else 0.0


def cka_matrix(xs: list[np.ndarray], ys: list[np.ndarray]) -> np.ndarray:
    """Debiased linear CKA between every x in xs and every y in ys (same inputs): each Gram matrix and
    self-HSIC is computed once, so a sites x sites table costs O(sites^2 n^2), not O(sites^2 n^3)."""
    gx = [_zero_diagonal_gram(_centred(x)) for x in xs]
    gy = [_zero_diagonal_gram(_centred(y)) for y in ys]
    if len({len(g) for g in gx + gy}) != 1:
        raise ValueError("the representations must be of the same inputs (equal row counts)")
    if len(gx[0]) < 4:
        raise ValueError("the debiased CKA needs at least 4 inputs")
    sx = [_hsic_unbiased(g, g) for g in gx]
    sy = [_hsic_unbiased(g, g) for g in gy]
    out = np.zeros((len(xs), len(ys)))
    for i, a in enumerate(gx):
        for j, b in enumerate(gy):
            den = np.sqrt(sx[i] * sy[j]) if sx[i] > 0 and sy[j] > 0 else 0.0
            out[i, j] = _hsic_unbiased(a, b) / den if den > 0 else 0.0
    return out


def rdm(x: np.ndarray) -> np.ndarray:
    """Upper triangle (k=1) of 1 - Pearson correlation between the inputs' activation patterns."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    d = 1.0 - x @ x.T
    return d[np.triu_indices(len(d), k=1)]


def rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation between the two RDMs."""
    if len(x) != len(y):
        raise ValueError(f"the two representations must be of the same inputs: {len(x)} vs {len(y)} rows")
    return float(spearmanr(rdm(x), rdm(y)).statistic)


def rsa_noise_ceiling(x: np.ndarray, seed: int = 0) -> float:
    """Split-half reliability of x's RDM: RSA between the RDMs of two random halves of its units,
    Spearman-Brown corrected to the full width."""
    x = np.asarray(x)
    if x.shape[1] < 2:
        raise ValueError("a split-half noise ceiling needs at least 2 units")
    units = np.random.default_rng(seed).permutation(x.shape[1])
    r = rsa(x[:, units[: len(units) // 2]], x[:, units[len(units) // 2:]])
    return float(2 * r / (1 + r)) if r > -1 else -1.0


def procrustes_distance(x: np.ndarray, y: np.ndarray) -> float:
    """2 - 2 |X^T Y|_* after centring and scaling each to unit Frobenius norm (widths may differ)."""
    x, y = _paired(x, y)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        raise ValueError("a constant representation has no shape to compare")
    nuclear = np.linalg.svd((x / nx).T @ (y / ny), compute_uv=False).sum()
    return float(max(0.0, 2.0 - 2.0 * nuclear))


def _whitened_basis(x: np.ndarray, eps: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, s > eps * s.max()] if s.size and s.max() > 0 else u[:, :0]


def canonical_correlations(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """The canonical correlations of x and y (descending): singular values of Qx^T Qy, with Qx, Qy
    orthonormal bases of the centred column spaces."""
    x, y = _paired(x, y)
    qx, qy = _whitened_basis(x, eps), _whitened_basis(y, eps)
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def cca(x: np.ndarray, y: np.ndarray) -> float:
    """Mean canonical correlation."""
    rho = canonical_correlations(x, y)
    return float(rho.mean()) if rho.size else 0.0


def top_directions(x: np.ndarray, keep: float = 0.99) -> np.ndarray:
    """x projected on the fewest singular directions that explain `keep` of its variance."""
    x = _centred(x)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    share = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
    d = int(np.searchsorted(share, keep) + 1)
    return u[:, :d] * s[:d]


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """SVCCA: mean canonical correlation between the directions that explain `keep` of each's variance."""
    return cca(top_directions(x, keep), top_directions(y, keep))
