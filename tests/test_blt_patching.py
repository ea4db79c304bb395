"""The Byte Latent Transformer's patching rules (neuraflex_ray/models/blt_patching.py), on exact cases."""

from __future__ import annotations

import pytest
import torch

from neuraflex_ray.models.blt_patching import (
    EOS,
    fit_threshold,
    max_patches,
    mean_patch_bytes,
    patch_ids,
    patch_starts,
)


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())], dtype=torch.long)


def patches(text: str, starts: torch.Tensor) -> list[str]:
    raw = text.encode()
    cuts = [int(i) for i in torch.nonzero(starts[0]).flatten()] + [len(raw)]
    return [raw[a:b].decode() for a, b in zip(cuts, cuts[1:], strict=False)]


def test_static_patches_every_k_bytes():
    starts = patch_starts(torch.zeros(2, 12, dtype=torch.long), None, "static", size=4)
    assert starts[0].tolist() == [True, False, False, False] * 3
    assert mean_patch_bytes(starts) == 4.0 and patch_ids(starts)[1].tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_space_patches_end_after_every_space_like_byte_and_never_cut_a_character():
    text = "héllo wörld,  foo.bar"
    assert patches(text, patch_starts(ids_of(text), None, "space")) == ["héllo ", "wörld,", " ", " ", "foo.", "bar"]
    # With a minimum length, a run of spaces becomes one patch: the start one byte later is dropped.
    assert patches(text, patch_starts(ids_of(text), None, "space", min_bytes=2)) == ["héllo ", "wörld,", "  ", "foo.",
                                                                                   "bar"]
    eos = torch.tensor([[ord("a"), EOS, ord("b")]])
    assert patch_starts(eos, None, "space")[0].tolist() == [True, False, True]  # a document ends a patch


def test_entropy_patches_start_where_the_next_byte_is_hard_to_guess():
    h = torch.tensor([[3.0, 0.5, 0.4, 2.5, 0.3, 0.2, 2.8, 2.9]])
    ids = torch.zeros_like(h, dtype=torch.long)
    assert patch_starts(ids, h, "entropy", threshold=2.0)[0].tolist() == [1, 0, 0, 1, 0, 0, 1, 1]
    # Monotonic: a jump of more than the threshold over the byte before.
    assert patch_starts(ids, h, "entropy", threshold=2.0, monotonic=True)[0].tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    # A minimum length drops the start that would make a 1-byte patch.
    assert patch_starts(ids, h, "entropy", threshold=2.0, min_bytes=2)[0].tolist() == [1, 0, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("mode", ["entropy", "static", "space"])
def test_a_start_is_known_before_its_byte_and_within_the_patch_bound(mode):
    """Whether byte k starts a patch depends on bytes < k and entropies <= k only (the model's position
    k - 1 reads it; generation decides it before byte k exists); a prefix's boundaries are the prefix of
    the whole block's."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (4, 96), generator=g)
    h = torch.rand(4, 96, generator=g) * 4
    whole = patch_starts(ids, h, mode, threshold=2.5, size=5, min_bytes=3)
    for k in (1, 7, 40, 95):
        assert torch.equal(patch_starts(ids[:, :k], h[:, :k], mode, threshold=2.5, size=5, min_bytes=3), whole[:, :k])
        other_ids, other_h = ids.clone(), h.clone()
        other_ids[:, k:] = torch.randint(0, 257, (4, 96 - k), generator=g)  # byte k and after change
        other_h[:, k + 1:] = torch.rand(4, 95 - k, generator=g) * 4  # entropies after k change
        changed = patch_starts(other_ids, other_h, mode, threshold=2.5, size=5, min_bytes=3)
        assert torch.equal(changed[:, :k + 1], whole[:, :k + 1])
    assert int(whole.sum(1).max()) <= max_patches(96, mode, size=5, min_bytes=3)


@pytest.mark.parametrize("target", [4.0, 6.0])
@pytest.mark.parametrize("monotonic", [False, True])
def test_a_fitted_threshold_hits_the_target_mean_patch_size_within_5_percent(target, monotonic):
    g = torch.Generator().manual_seed(1)
    h = torch.distributions.Gamma(2.0, 1.0).sample((64, 256)) if not monotonic else torch.rand(64, 256, generator=g) * 3
    threshold = fit_threshold(h, target, monotonic=monotonic)
    starts = patch_starts(torch.zeros_like(h, dtype=torch.long), h, "entropy", threshold=threshold, monotonic=monotonic)
    assert abs(mean_patch_bytes(starts) / target - 1) < 0.05


def test_an_unknown_mode_names_the_modes():
    with pytest.raises(ValueError, match=r"patching mode 'bpe': use one of \['entropy', 'static', 'space'\]"):
        patch_starts(torch.zeros(1, 4, dtype=torch.long), None, "bpe")
