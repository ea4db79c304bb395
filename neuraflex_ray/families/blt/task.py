"""The BLT's Train task: byte blocks (and their entropies) in, next-byte cross entropy + router losses out.

Patches are decided here, as batches are read: the block's bytes (and, for entropy patching, the
entropies the data pipeline wrote beside them) go through the model section's patching rule
(`models/blt_patching.patch_starts`), so a sweep over the threshold or the mode rebuilds nothing.
Every block gets the same number of patch slots (`patch_slots`: the most its rule allows), the rest
padding under a mask, so every rank passes the same number of patches to the expert-parallel layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from neuraflex_ray.config import JobConfig
from neuraflex_ray.eval.lm import bits_per_byte
from neuraflex_ray.families.moe_lm.task import RoutingBook
from neuraflex_ray.models.blt import blt_loss, patch_slots, starts_of, train_flops_per_block
from neuraflex_ray.train.task import StepOutput, Task, global_batches
from pipelines.shards import column


class BLTTask(RoutingBook, Task):
    """Byte blocks of block_bytes + 1: the model reads bytes 0..T-1 and every start flag 0..T."""

    unit = "bytes"
    val_metrics = ("loss", "bits_per_byte", "mean_patch_bytes")  # a threshold sweep plots the first two against the last
    primary = "ce"

    def __init__(self, cfg: JobConfig, loop_data: dict[str, Any], rank: int = 0):
        super().__init__(cfg, loop_data, rank)
        m, n = cfg.model, cfg.data.block_bytes
        self.slots = patch_slots(m, n)
        self.flops_per_block = train_flops_per_block(m, n)
        self.bytes_per_id = {"train": loop_data["train_bytes_per_token"], "val": loop_data["val_bytes_per_token"]}
        self.start_routing_book(m.global_model)

    def peak_shape(self) -> tuple[int, int, int]:
        """The global transformer's FFN on one micro-batch's patch slots: where most FLOPs go."""
        g = self.cfg.model.global_model
        return self.cfg.train.micro_batch_size * self.slots, g.dim, max(g.dense_ffn_dim, g.expert_ffn_dim)

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0,
                train: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        entropy = self.cfg.model.patching == "entropy"
        for batch in global_batches(ds, micro_bs, world, skip):
            mine = slice(rank * micro_bs, (rank + 1) * micro_bs)
            blocks = column(batch, "bytes")[mine]
            starts = starts_of(self.cfg.model, blocks, column(batch, "entropy")[mine] if entropy else None)
            yield torch.from_numpy(blocks.astype(np.int64)), starts

    def fingerprint(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int(batch[0][0, :8].sum())

    def step(self, model: Callable, batch: tuple[torch.Tensor, torch.Tensor], step: int, device: torch.device,
             train: bool = True) -> StepOutput:
        blocks, starts = (b.to(device, non_blocking=True) for b in batch)
        logits, stats = model(blocks[:, :-1], starts, self.slots)
        loss = blt_loss(logits, blocks[:, 1:], stats, self.cfg.model)
        if train:
            self.record_routing(stats)
        n = blocks[:, 1:].numel()
        # Patches per byte of these blocks: averaged over bytes like every part, its inverse is the mean patch size.
        parts = {"ce": loss["ce"].detach(), "aux": loss["aux"].detach(), "z": loss["z"].detach(),
                 "patches_per_byte": starts[:, :-1].float().mean()}
        return StepOutput(loss["total"], parts, n, blocks.shape[0] * self.flops_per_block)

    def eval_metrics(self, total: float, parts: dict[str, float]) -> dict[str, float]:
        return {"loss": parts["ce"], "bits_per_byte": bits_per_byte(parts["ce"], self.bytes_per_id["val"]),
                "mean_patch_bytes": 1 / max(parts["patches_per_byte"], 1e-9)}

    def log_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        bpb = bits_per_byte(parts["ce"], self.bytes_per_id["train"])
        patch = 1 / max(parts["patches_per_byte"], 1e-9)
        routing, text = self.routing_extras(parts, writer, step)
        return ({"bits_per_byte": bpb, "mean_patch_bytes": patch, **routing},
                f"ce {parts['ce']:.4f} ({bpb:.3f} bpb) | {patch:.2f} B/patch{text}")
