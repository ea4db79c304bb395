"""What the one Train loop needs to know about a model family's training (torchtitan calls it a train spec).

A task builds the model, turns a Ray Data shard into this rank's micro-batches, computes the loss
and counts the work done (units for throughput, model FLOPs for MFU). Each family has its task
(`Family.task_class`, in its folder under `neuraflex_ray/families/`); the loop (`loop.py`) and the
strategies (`strategy.py`) know nothing of tokens or time series.

Data: every rank iterates the *same* global batches (micro_batch_size x world_size rows, in a
fixed order) and keeps its own slice, so the data position is one number and every rank agrees
on batch-level facts (equal shapes for expert parallelism; the modality set for FSDP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from neuraflex_ray.config import JobConfig, get_family


def global_batches(ds: Any, micro_bs: int, world: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Global numpy batches of micro_bs * world rows (ragged tail dropped), after skipping `skip`."""
    for i, batch in enumerate(ds.iter_batches(batch_size=micro_bs * world, drop_last=True, batch_format="numpy")):
        if i >= skip:
            yield batch


@dataclasses.dataclass
class StepOutput:
    loss: torch.Tensor  # what backward runs on
    parts: dict[str, torch.Tensor]  # detached components for the log (summed over micro-batches)
    units: int  # tokens / patches this rank processed (throughput)
    flops: float  # model training FLOPs this rank spent (MFU)
    # Evaluation only: per-sample rows (name -> [B, ...]) that the loop gathers from every batch and
    # rank and hands to Task.eval_set_metrics, for measures of a whole set (an embedding's spread).
    rows: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class Task:
    """The interface the loop is written against; a family's task overrides what it needs.

    Required: `batches`, `step`, `peak_shape` (`build_model` defaults to the family's). The hooks `adapt` (after the strategy
    wrapped the model, before the optimizer sees which parameters train) and `after_setup` (once the
    parameters are placed, before a checkpoint is restored) are where fine-tuning plugs in
    (finetune/hooks.py); `after_update` runs after every optimizer step.
    """

    unit = "samples"  # what `units` counts, for throughput (tokens/s, patches/s)
    val_metrics: tuple[str, ...] = ("loss",)  # what eval_metrics returns (reported as val_<name>)
    primary = "loss"  # the training loss reported as final_loss

    def __init__(self, cfg: JobConfig, loop_data: dict[str, Any], rank: int = 0):
        self.cfg = cfg
        self.loop_data = loop_data
        self.rank = rank

    def peak_shape(self) -> tuple[int, int, int]:
        """(m, k, n) of a matmul like the model's main one on a micro-batch: what the MFU peak is timed on."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        return get_family(self.cfg.model_type).build_model(self.cfg.model)

    def adapt(self, model: nn.Module) -> nn.Module:
        return model

    def after_setup(self, model: nn.Module) -> None:
        """Once the strategy has placed the parameters, before any checkpoint is restored."""

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0, train: bool = False) -> Iterator[Any]:
        raise NotImplementedError

    def fingerprint(self, batch: Any) -> int:
        """A number that identifies a micro-batch (tests check that a resumed run sees the same data)."""
        return 0

    def step(self, model: Callable, batch: Any, step: int, device: torch.device, train: bool = True) -> StepOutput:
        raise NotImplementedError

    def after_update(self, model: nn.Module) -> None:
        """After each optimizer step."""

    def eval_metrics(self, total: float, parts: dict[str, float]) -> dict[str, float]:
        return {"loss": total, **parts}

    def eval_set_metrics(self, rows: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics of the whole evaluation set from the `rows` its steps returned, every rank's
        concatenated in rank order (called on every rank); merged into the validation metrics."""
        return {}

    def log_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        """Extra metrics for the progress record, and the text they add to the progress line."""
        return {}, " | ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "loss")  # the line shows loss first


def gather_across_ranks() -> Callable[[torch.Tensor], tuple[list[torch.Tensor], int]] | None:
    """Every rank's copy of a tensor (no gradient) and this rank's index; None without a process group
    or with one rank. The contrastive term contrasts each rank's windows with all ranks' windows: one
    micro-batch holds only a few windows with two modalities. Every rank runs the same steps and the
    same contrastive pairs, so every rank calls it equally often."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None

    def gather(t: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return parts, dist.get_rank()

    return gather


def reported_metrics(model_type: str) -> list[str]:
    """The metric names each evaluation reports to Ray Train (and so to Tune) for a model type."""
    return ["train_loss", *(f"val_{m}" for m in get_family(model_type).task_class.val_metrics)]


def build_task(cfg: JobConfig, loop_data: dict[str, Any], rank: int) -> Task:
    return get_family(cfg.model_type).task(cfg, loop_data, rank)
