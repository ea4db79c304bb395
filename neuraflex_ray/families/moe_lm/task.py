"""NeuralFlex-MoE's Train task: packed token blocks in, next-token cross entropy + router losses out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from neuraflex_ray.config import JobConfig
from neuraflex_ray.eval.lm import bits_per_byte
from neuraflex_ray.finetune.hooks import FinetuneHooks
from neuraflex_ray.models.moe import load_cv_of, mean_stats
from neuraflex_ray.models.moe_lm import flops_per_token, lm_loss
from neuraflex_ray.models.routers import balance_biases, nudge_balance_bias
from neuraflex_ray.train.task import StepOutput, Task, global_batches
from pipelines.text import block_array


class RoutingBook:
    """The routing bookkeeping of a task whose model has NeuralFlex-MoE blocks (the LM; the BLT's global
    transformer): per-interval routing health for the log, and the aux-free router's bias update.

    `routed_config` is the ModelConfig of those blocks."""

    routed_config: Any

    def start_routing_book(self, routed_config: Any) -> None:
        self.routed_config = routed_config
        self._moe_history: list = []  # each micro-batch's per-layer routing stats since the last log line
        self._step_load: list[torch.Tensor] = []  # this step's [layers, E] assignment shares, per micro-batch

    def record_routing(self, stats: list[Any]) -> None:
        """One training micro-batch's routing statistics (detached)."""
        self._moe_history.append([dataclasses.replace(s, aux_loss=s.aux_loss.detach(), z_loss=s.z_loss.detach())
                                  for s in stats])
        if stats:
            self._step_load.append(torch.stack([s.expert_fraction for s in stats]))

    def after_update(self, model: nn.Module) -> None:
        """After each optimizer step: the aux-free router's bias moves toward balance by the step's
        load, summed over every rank (an all-reduce), so the bias stays identical on every rank."""
        loads, self._step_load = self._step_load, []
        if self.routed_config.router != "aux_free" or not loads:
            return
        load = torch.stack(loads).sum(0)
        if dist.is_initialized():
            dist.all_reduce(load)
        nudge_balance_bias(balance_biases(model), load, self.routed_config.balance_bias_rate)

    def routing_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        """Routing health over the interval: busiest expert's share (1/E is balanced) and the share of
        assignments dropped for capacity, worst layer of each; per-layer detail to TensorBoard."""
        stats = mean_stats(self._moe_history)
        self._moe_history.clear()
        if not stats:  # a dense model
            return {}, ""
        max_load = max(float(s.expert_fraction.max()) for s in stats)
        load_cv = max(load_cv_of(s.expert_fraction) for s in stats)
        dropped = max(float(s.dropped_fraction) for s in stats)
        if writer is not None:
            writer.moe_layers(stats, step)
        text = (f" | aux {parts['aux']:.3f} | max load {max_load:.2f} cv {load_cv:.2f} | drop {100 * dropped:.1f}%")
        return {"expert_max_load": max_load, "expert_load_cv": load_cv, "dropped_fraction": dropped}, text


class LMTask(RoutingBook, FinetuneHooks, Task):
    """NeuralFlex-MoE on packed token blocks: next-token cross entropy + router losses."""

    unit = "tokens"
    val_metrics = ("loss", "bits_per_byte")  # what eval_metrics returns (reported as val_<name>)
    primary = "ce"  # the training loss reported as final_loss: cross entropy without router terms

    def __init__(self, cfg: JobConfig, loop_data: dict[str, Any], rank: int = 0):
        super().__init__(cfg, loop_data, rank)
        self.bytes_per_token = {"train": loop_data["train_bytes_per_token"], "val": loop_data["val_bytes_per_token"]}
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.start_routing_book(cfg.model)

    def peak_shape(self) -> tuple[int, int, int]:
        """(m, k, n) of a matmul like the model's FFN on one micro-batch: what the MFU peak is timed on."""
        m = self.cfg.model
        return self.cfg.train.micro_batch_size * self.cfg.data.seq_len, m.dim, max(m.dense_ffn_dim, m.expert_ffn_dim)

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0,
                train: bool = False) -> Iterator[torch.Tensor]:
        """This rank's slice of each global batch (token blocks are all alike: training and evaluation
        batch the same way)."""
        for batch in global_batches(ds, micro_bs, world, skip):
            rows = block_array(batch)[rank * micro_bs:(rank + 1) * micro_bs]
            yield torch.from_numpy(rows.astype(np.int64))

    def fingerprint(self, tokens: torch.Tensor) -> int:
        return int(tokens[0, :8].sum())

    def step(self, model: Callable, tokens: torch.Tensor, step: int, device: torch.device, train: bool = True) -> StepOutput:
        tokens = tokens.to(device, non_blocking=True)
        logits, stats = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:], stats, self.cfg.model)
        total = self.with_penalty(loss.total, train)
        if train:
            self.record_routing(stats)
        n = tokens[:, 1:].numel()
        parts = {"ce": loss.ce.detach(), "aux": loss.aux.detach(), "z": loss.z.detach()}
        return StepOutput(total, parts, n, n * self.flops_per_token)

    def eval_metrics(self, total: float, parts: dict[str, float]) -> dict[str, float]:
        """The LM's validation loss is the cross entropy alone (what bits per byte and the export report)."""
        return {"loss": parts["ce"], "bits_per_byte": bits_per_byte(parts["ce"], self.bytes_per_token["val"])}

    def log_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        bpb = bits_per_byte(parts["ce"], self.bytes_per_token["train"])
        routing, text = self.routing_extras(parts, writer, step)
        return {"bits_per_byte": bpb, **routing}, f"ce {parts['ce']:.4f} ({bpb:.3f} bpb){text}"
