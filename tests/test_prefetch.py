"""The training loop's read-ahead across epochs keeps the loop's own order of batches."""

from __future__ import annotations

import threading

import pytest

from neuraflex_ray.train.prefetch import EpochPrefetcher


def test_batches_come_in_order_across_epochs_after_a_resume_skip():
    reads: list[tuple[int, int]] = []

    def epoch_batches(skip: int):
        reads.append((len(reads), skip))
        yield from ["a", "b", "c"][skip:]

    feed = EpochPrefetcher(epoch_batches, epoch=2, skip=1, depth=2)
    got = [feed.next() for _ in range(6)]
    feed.close()
    assert got == [(2, "b"), (2, "c"), (3, "a"), (3, "b"), (3, "c"), (4, "a")]
    assert reads[:2] == [(0, 1), (1, 0)]  # only the resumed epoch skips


def test_the_next_epoch_is_read_before_the_loop_reaches_it():
    second_read = threading.Event()
    calls = []

    def epoch_batches(skip: int):
        calls.append(skip)
        if len(calls) == 2:
            second_read.set()
        yield from [1, 2]

    feed = EpochPrefetcher(epoch_batches, epoch=0, depth=4)
    assert feed.next() == (0, 1)
    assert second_read.wait(5)  # epoch 1's read began while the loop had taken one batch of epoch 0
    feed.close()


def test_an_empty_epoch_is_an_error_for_the_loop():
    feed = EpochPrefetcher(lambda skip: iter(()), epoch=0)
    with pytest.raises(RuntimeError, match="no full batch"):
        feed.next()
