"""What the console says about checkpoints: one line when a checkpoint is complete, and one when a
resume passes over a checkpoint that a kill left half-written.

Ray Train's own "Checkpoint successfully created" goes to the library log with the rest of its
chatter (console.py), so the line that a person needs comes from here: from a callback in Train's
controller, which runs once every rank has reported the checkpoint, i.e. when it is whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train import UserCallback


class AnnounceCheckpoints(UserCallback):
    """`[ckpt] step N complete: <dir>` on the driver's console for every checkpoint Train registers."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None:
            step = metrics[0].get("step") if metrics else None
            print(f"[ckpt] step {step} complete: {checkpoint.path}", flush=True)


def announce_skipped(skipped: list[Path], used: Path | None) -> None:
    """The console line of a resume that passed over incomplete checkpoints."""
    for d in skipped:
        print(f"[ckpt] skipping {d}: incomplete (a save that did not finish, e.g. a kill mid-write)"
              + (f"; resuming from {used.name} instead" if used else ""), flush=True)
