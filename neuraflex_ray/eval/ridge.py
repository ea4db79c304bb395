"""Closed-form ridge regression from streamed sufficient statistics: the baselines' workhorse.

Baselines are fitted with numpy ((X'X + lambda I) w = X'y, intercept unpenalised) from sums streamed
over the TRAIN windows; alpha is chosen on the last slice of the train windows, never on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-8, 3))  # relative to the mean feature variance (see RidgeStats)
DEFAULT_ALPHA = 1e-3  # used when the train windows are too few to hold a slice out
HELD_FRACTION = 0.2  # the last 20% of the (ordered) train windows choose alpha


class RidgeStats:
    """Sums over rows (x [F], y [O]) from which a ridge with an unpenalised intercept is solved in closed form.

    Streaming X'X, X'y, ... lets a fit run over millions of rows chunk by chunk, and scoring a held slice
    from its own sums means choosing alpha never needs the rows again.
    """

    def __init__(self, n_in: int, n_out: int):
        self.n = 0
        self.sx, self.sy = np.zeros(n_in), np.zeros(n_out)
        self.sxx, self.sxy, self.syy = np.zeros((n_in, n_in)), np.zeros((n_in, n_out)), np.zeros(n_out)

    def add(self, x: np.ndarray, y: np.ndarray) -> RidgeStats:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).reshape(len(x), -1)
        return self.add_sums(len(x), x.sum(0), y.sum(0), x.T @ x, x.T @ y, (y * y).sum(0))

    def add_sums(self, n: int, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, sxy: np.ndarray, syy: np.ndarray) -> RidgeStats:
        self.n += n
        self.sx += sx
        self.sy += sy
        self.sxx += sxx
        self.sxy += sxy
        self.syy += syy
        return self

    def merged(self, other: RidgeStats) -> RidgeStats:
        out = RidgeStats(len(self.sx), len(self.sy))
        out.n = self.n + other.n
        for k in ("sx", "sy", "sxx", "sxy", "syy"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(w [F, O], b [O]) minimising sum |y - x w - b|^2 + lam |w|^2 with lam = alpha * n * mean feature variance.

        Centring removes the intercept from the penalty; scaling lam by the data makes alpha unit-free.
        """
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        g = self.sxx - n * np.outer(mx, mx)
        c = self.sxy - n * np.outer(mx, my)
        lam = alpha * max(float(np.trace(g)) / len(g), 1e-12)
        w = np.linalg.solve(g + lam * np.eye(len(g)), c)
        return w, my - mx @ w

    def sse(self, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Sum of squared errors of x w + b over the rows summed here, per output column."""
        cross = np.einsum("fo,fo->o", self.sxy, w) + b * self.sy
        pred2 = np.einsum("fo,fg,go->o", w, self.sxx, w) + 2 * b * (self.sx @ w) + self.n * b * b
        return self.syy - 2 * cross + pred2


@dataclass
class Ridge:
    w: np.ndarray  # [F, O]
    b: np.ndarray  # [O]
    alpha: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.w + self.b


def fit_ridge(fit: RidgeStats, held: RidgeStats, alphas: tuple[float, ...] = ALPHAS) -> Ridge | None:
    """Pick alpha by the held slice's error of a ridge fitted on `fit`, then refit on fit + held (both train)."""
    total = fit.merged(held)
    if total.n < 2:
        return None
    alpha = DEFAULT_ALPHA
    if fit.n >= 2 and held.n >= 1:
        errors = [float(held.sse(*fit.solve(a)).sum()) for a in alphas]
        alpha = alphas[int(np.argmin(errors))]
    return Ridge(*total.solve(alpha), alpha)


def split_fit_held(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train windows -> (fit part, held slice): the held slice is the END of the train order, as val is of each recording."""
    if len(idx) < 5:
        return idx, idx[:0]
    cut = int(round(len(idx) * (1 - HELD_FRACTION)))
    return idx[:cut], idx[cut:]
