"""Training a TopK SAE on the generic Train loop (FSDP2 on 2 CPU workers): the loss is FVU + AuxK; after
every optimiser step the decoder rows go back to unit norm and the latents that fired anywhere (all
ranks) are marked alive."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from neuraflex_ray.train.task import StepOutput, Task, global_batches
from pipelines.shards import column


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter's own shard (FSDP2 holds parameters as DTensors between steps)."""
    return t.to_local() if hasattr(t, "to_local") else t


class SAETask(Task):
    unit = "rows"
    val_metrics = ("loss", "fvu", "aux")

    def __init__(self, cfg: Any, loop_data: dict[str, Any], rank: int = 0):
        super().__init__(cfg, loop_data, rank)
        self._fired: torch.Tensor | None = None

    def peak_shape(self) -> tuple[int, int, int]:
        m = self.cfg.model
        return self.cfg.train.micro_batch_size, m.d_in, m.n_latents

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0, train: bool = False) -> Iterator[Any]:
        for batch in global_batches(ds, micro_bs, world, skip):
            rows = column(batch, "activation")[rank * micro_bs:(rank + 1) * micro_bs]
            yield torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def fingerprint(self, batch: torch.Tensor) -> int:
        return int(batch[0].abs().sum() * 1e4)

    def step(self, model: Any, batch: torch.Tensor, step: int, device: torch.device, train: bool = True) -> StepOutput:
        x = batch.to(device)
        out = model(x)
        if train:
            fired = torch.zeros(self.cfg.model.n_latents, dtype=torch.bool, device=device)
            fired[out.indices[out.values > 0]] = True
            self._fired = fired if self._fired is None else self._fired | fired
        m = self.cfg.model
        flops = 6.0 * x.shape[0] * m.d_in * (m.n_latents + m.k)  # dense encoder, k decoder rows, fwd + bwd
        return StepOutput(out.loss, {"fvu": out.fvu.detach(), "aux": out.aux.detach()}, x.shape[0], flops)

    @torch.no_grad()
    def after_update(self, model: Any) -> None:
        w = _local(model.W_dec.data)
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if self._fired is None:
            return
        fired = self._fired.to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)  # a latent alive on any rank is alive
        model.steps_since_fired.add_(1).masked_fill_(fired.bool(), 0)
        self._fired = None
