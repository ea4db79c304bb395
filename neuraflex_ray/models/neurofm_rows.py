"""A batch's real channels as rows: what NeuroFM's token-level work runs on.

Inputs arrive as one dense grid per modality, [B, C_m, ...], padded twice: to the widest channel
count of the batch, and over every window where the modality is absent. In a mixed batch of the
sample data (1-channel EEG beside 31-channel fMRI beside ECG + EDA + respiration) about 12 % of
the grid's (window, channel) cells are real. Everything NeuroFM does per patch token (the patch
embedding, the decoder's queries, the local read, the heads) is row-wise in channels, so it runs
on the real channels only, one row each:

    rows:    [R, ...]            one per (window, channel) of a present modality, modality by
                                 modality in the model's order, then window, then channel
    windows: [B, W, ...]         the same rows regrouped per window, W = most rows of any window,
                                 for what mixes channels of one window (the encoder's
                                 cross-attention, the local read's spatial step)

Nothing changes what the model computes: padded and absent cells were never keys, and their
outputs were never scored. The outputs are scattered back onto the dense grids (zeros elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rows:
    window: torch.Tensor  # [R] int64: the row's window
    slot: torch.Tensor  # [R] int64: its place among its window's rows (0 .. width - 1)
    width: int  # most rows of any window
    batch: int  # B
    parts: list[tuple[torch.Tensor, torch.Tensor]]  # per modality, in the order given: (window, channel) of its rows
    valid: list[torch.Tensor]  # per modality, the [B, C_j] grid of real cells the rows were found from

    @property
    def sizes(self) -> list[int]:
        """Rows per modality: rows of modality j are the j-th block of this length."""
        return [b.numel() for b, _ in self.parts]

    def modality(self) -> torch.Tensor:
        """[R] int64: each row's modality, as an index into the order given to find_rows."""
        sizes = torch.tensor(self.sizes, device=self.window.device)
        return torch.repeat_interleave(torch.arange(len(self.parts), device=self.window.device), sizes)

    def to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """[R, ...] -> [B, W, ...], zeros where a window has fewer rows."""
        out = x.new_zeros((self.batch, self.width, *x.shape[1:]))
        return out.index_put((self.window, self.slot), x)

    def from_windows(self, y: torch.Tensor) -> torch.Tensor:
        """[B, W, ...] -> [R, ...]."""
        return y[self.window, self.slot]

    def occupied(self) -> torch.Tensor:
        """[B, W] bool: which window slots hold a row."""
        return self.to_windows(torch.ones_like(self.window, dtype=torch.bool))


def find_rows(valid: list[torch.Tensor]) -> Rows:
    """valid[j]: [B, C_j] bool, True = a real channel of a present modality j -> the rows."""
    grid = torch.cat(valid, 1)  # [B, sum C_j]
    slots = grid.long().cumsum(1) - 1  # a real cell's rank in its window's row
    parts = [v.nonzero(as_tuple=True) for v in valid]
    offsets = torch.tensor([0, *[v.shape[1] for v in valid]], device=grid.device).cumsum(0)
    window = torch.cat([b for b, _ in parts])
    column = torch.cat([c + offsets[j] for j, (_, c) in enumerate(parts)])  # in the grids side by side
    # At least one slot, so that a batch without a real channel still has a (fully masked) window grid.
    width = max(1, int(grid.sum(1).max())) if grid.numel() else 1
    return Rows(window=window, slot=slots[window, column], width=width, batch=grid.shape[0],
                parts=list(parts), valid=list(valid))
