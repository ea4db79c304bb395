"""Is an embedding collapsing? Two measures over a set of windows, both blind to the embedding's scale.

- spread: the mean Euclidean distance of the L2-normalised embeddings to their centroid. 0 when
  every window maps to one direction (collapse); about 1 for directions spread over the sphere in
  many dimensions; normalising first means a larger scale cannot buy it.
- effective rank (RankMe, Garrido et al. 2023, "RankMe: Assessing the downstream performance of
  pretrained self-supervised representations by their rank"): exp of the entropy of the
  embedding matrix's singular values normalised to sum 1, p_k = s_k / sum(s) + eps. 1 when every
  window lies on one line (dimensional collapse), up to min(windows, width) when all directions are
  used equally. Computed on the raw embeddings, as the paper does.
"""

from __future__ import annotations

import numpy as np

RANKME_EPS = 1e-7  # the paper's epsilon inside the entropy


def spread(z: np.ndarray) -> float:
    """Mean distance to the centroid of the rows of z [n, d] after L2-normalising each row."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) < 2:
        return float("nan")
    u = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(np.linalg.norm(u - u.mean(0), axis=1).mean())


def effective_rank(z: np.ndarray) -> float:
    """RankMe of z [n, d]: exp(-sum p log p) over its singular values p = s / sum(s) + eps."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) < 2:
        return float("nan")
    s = np.linalg.svd(z, compute_uv=False)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum() + RANKME_EPS
    return float(np.exp(-(p * np.log(p)).sum()))


def embedding_report(z: np.ndarray) -> dict[str, float]:
    """{"spread", "effective_rank", "windows"} of one embedding matrix [n, d]."""
    return {"spread": spread(z), "effective_rank": effective_rank(z), "windows": int(len(z))}
