"""Where a byte sequence is cut into patches: the Byte Latent Transformer's patching rules.

Ids are bytes 0-255 and EOS (256, a document's end). A patch boundary is a start: `starts[t]` is
True when a new patch begins at byte t; byte 0 always starts one. Modes:

- `entropy`: a small byte LM's entropy H[t] of its prediction of byte t (given the bytes before it)
  decides. Global rule: a patch starts where H[t] > threshold, so patches end before bytes that are
  hard to guess. Monotonic rule: where H[t] - H[t-1] > threshold (a jump in uncertainty).
- `static`: every `size` bytes.
- `space`: after every space-like byte (ASCII whitespace, punctuation, EOS), as the BLT paper's space
  patching: a word and the space or punctuation byte after it form one patch. A byte >= 0x80 counts
  as a letter, so no UTF-8 character is cut.

Every rule is causal in the sense the model needs: whether byte t starts a patch depends on the bytes
before t and on entropies up to t (the entropy of byte t is the entropy model's prediction of it, made
from the bytes before it), never on byte t itself. So the start flag of a byte is known before the
byte exists: position t - 1 may read the patch that byte t closes, and generation finds the same
boundaries as a whole block. A patch is at least `min_bytes` long (a start
closer than that to the previous one is dropped), which bounds a block of T bytes to
ceil(T / min_bytes) patches: the fixed patch count expert parallelism needs (every rank passes the
same number of patches to an MoE layer) is that bound, the rest padding under a mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EOS = 256  # a document's end, after its bytes
N_IDS = 257  # 256 byte values + EOS
PATCHING_MODES = ("entropy", "static", "space")

_SPACE_LIKE = np.zeros(N_IDS, dtype=bool)
for _b in range(128):
    _SPACE_LIKE[_b] = not chr(_b).isalnum()
_SPACE_LIKE[EOS] = True


def next_byte_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a byte-level LM's prediction, over the 257 byte ids only (a model's padded
    vocabulary rows are left out): what entropy patching compares with its threshold. logits [..., V]."""
    logp = torch.log_softmax(logits[..., :N_IDS].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def space_like(ids: torch.Tensor) -> torch.Tensor:
    """Whether each id ends a word: ASCII whitespace or punctuation, or EOS."""
    return torch.from_numpy(_SPACE_LIKE)[ids.long()]


def raw_starts(ids: torch.Tensor, entropies: torch.Tensor | None, mode: str, *, threshold: float = 0.0,
               size: int = 4, monotonic: bool = False) -> torch.Tensor:
    """The mode's boundary rule before the minimum patch length: bool [B, T], True at byte 0."""
    if mode not in PATCHING_MODES:
        raise ValueError(f"patching mode {mode!r}: use one of {list(PATCHING_MODES)}")
    b, t = ids.shape
    if mode == "static":
        starts = (torch.arange(t) % size == 0).expand(b, t).clone()
    elif mode == "space":
        starts = torch.zeros(b, t, dtype=torch.bool)
        starts[:, 1:] = space_like(ids[:, :-1])
    else:
        if entropies is None:
            raise ValueError("entropy patching needs the entropy model's per-byte entropies")
        h = entropies.float()
        starts = torch.zeros(b, t, dtype=torch.bool)
        starts[:, 1:] = (h[:, 1:] - h[:, :-1] > threshold) if monotonic else (h[:, 1:] > threshold)
    starts[:, 0] = True
    return starts


def enforce_min_bytes(starts: torch.Tensor, min_bytes: int) -> torch.Tensor:
    """Drop any start closer than `min_bytes` to the start before it (left to right: causal)."""
    if min_bytes <= 1:
        return starts
    s = starts.cpu().numpy()
    keep = np.zeros_like(s)
    for row in range(s.shape[0]):
        last = -min_bytes
        for t in np.flatnonzero(s[row]):
            if t - last >= min_bytes:
                keep[row, t] = True
                last = t
    return torch.from_numpy(keep).to(starts.device)


def patch_starts(ids: torch.Tensor, entropies: torch.Tensor | None, mode: str, *, threshold: float = 0.0,
                 size: int = 4, monotonic: bool = False, min_bytes: int = 1) -> torch.Tensor:
    """bool [B, T]: where each block's patches start (byte 0 always), the minimum length kept."""
    return enforce_min_bytes(raw_starts(ids, entropies, mode, threshold=threshold, size=size, monotonic=monotonic),
                             min_bytes)


def max_patches(block_bytes: int, mode: str, *, size: int = 4, min_bytes: int = 1) -> int:
    """The most patches a block of `block_bytes` can hold under these settings."""
    if mode == "static":
        return math.ceil(block_bytes / size)
    return math.ceil(block_bytes / max(1, min_bytes))


def patch_ids(starts: torch.Tensor) -> torch.Tensor:
    """long [B, T]: the index of the patch each byte belongs to (0 for the first patch)."""
    return starts.long().cumsum(dim=1) - 1


def mean_patch_bytes(starts: torch.Tensor) -> float:
    """Bytes per patch over all the blocks given."""
    return float(starts.numel() / max(1, int(starts.sum())))


def fit_threshold(entropies: torch.Tensor, target_bytes: float, *, monotonic: bool = False, min_bytes: int = 1,
                  iters: int = 40) -> float:
    """The entropy threshold whose patches average `target_bytes` bytes on these blocks (bisection:
    a higher threshold starts fewer patches). The mean is monotone in the threshold, so bisection over
    the range of the values the rule compares converges to the closest mean the data allows."""
    h = entropies.float()
    ids = torch.zeros_like(h, dtype=torch.long)
    values = (h[:, 1:] - h[:, :-1]) if monotonic else h[:, 1:]
    lo, hi = float(values.min()) - 1e-6, float(values.max()) + 1e-6
    for _ in range(iters):
        mid = (lo + hi) / 2
        starts = patch_starts(ids, h, "entropy", threshold=mid, monotonic=monotonic, min_bytes=min_bytes)
        if mean_patch_bytes(starts) < target_bytes:
            lo = mid  # patches too short: raise the threshold
        else:
            hi = mid
    return (lo + hi) / 2
