"""Training batches that do not wait at epoch boundaries.

A Ray Data shard is read one epoch at a time, and starting an epoch's read costs seconds (its
pipeline starts up). Read in the training loop, that cost lands on the first step of every epoch:
the NeuroFM quickstart fell to a fifth of its throughput there. `EpochPrefetcher` reads from one
background thread, `depth` batches ahead of the loop and straight across epoch boundaries: the next
epoch's read starts the moment the current one ends, while the loop is still training on the
batches already queued. The order of batches is exactly the loop's own (epochs one after another,
the first one skipping what a resumed run already trained on), so resumption and the data each
step sees are unchanged. The loop starts it before building the model, so the first read overlaps
the set-up too (`wait_ready` says how much of it was left).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class EpochPrefetcher:
    """`epoch_batches(skip)` gives one epoch's batches (skipping `skip` first); `next()` returns
    (epoch, batch) for epochs `epoch`, `epoch + 1`, ... for as long as it is called."""

    def __init__(self, epoch_batches: Callable[[int], Iterator[Any]], epoch: int, skip: int = 0, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ready = threading.Event()  # the first batch (or the error) is queued
        self._thread = threading.Thread(target=self._run, args=(epoch_batches, epoch, skip), name="batch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                self._ready.set()
                return True
            except queue.Full:
                continue
        return False

    def _run(self, epoch_batches: Callable[[int], Iterator[Any]], epoch: int, skip: int) -> None:
        try:
            while not self._stop.is_set():
                count = skip
                for batch in epoch_batches(skip):
                    count += 1
                    if not self._put((epoch, batch)):
                        return
                if count == 0:
                    raise RuntimeError("training split produced no full batch: lower train.micro_batch_size")
                epoch, skip = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            self._put((_END, e))

    def wait_ready(self) -> float:
        """Block until the first batch is queued; the seconds that took."""
        start = time.perf_counter()
        self._ready.wait()
        return time.perf_counter() - start

    def next(self) -> tuple[int, Any]:
        epoch, batch = self._q.get()
        if epoch is _END:
            raise batch
        return epoch, batch

    def close(self) -> None:
        self._stop.set()
