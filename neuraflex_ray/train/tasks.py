"""What the one Train loop needs to know about each model type (torchtitan calls this a train spec).

A task builds the model, turns a Ray Data shard into this rank's micro-batches, computes the loss
and counts the work done (units for throughput, model FLOPs for MFU). The loop (`loop.py`) and the
strategies (`strategy.py`) know nothing of tokens or time series.

Data: every rank iterates the *same* global batches (micro_batch_size x world_size rows, in a
fixed order) and keeps its own slice, so the data position is one number and every rank agrees
on batch-level facts (equal shapes for expert parallelism; the modality set for FSDP, see
`NeuroTask.batches`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from neuraflex_ray.config import JobConfig
from neuraflex_ray.eval.lm import bits_per_byte


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


class LMTask:
    """NeuralFlex-MoE on packed token blocks: next-token cross entropy + router losses."""

    unit = "tokens"
    val_metrics = ("loss", "bits_per_byte")  # what eval_metrics returns (reported as val_<name>)
    primary = "ce"  # the training loss reported as final_loss: cross entropy without router terms

    def __init__(self, cfg: JobConfig, loop_config: dict[str, Any], rank: int = 0):
        from neuraflex_ray.models.moe_lm import flops_per_token

        self.cfg = cfg
        self.bytes_per_token = {"train": loop_config["train_bytes_per_token"], "val": loop_config["val_bytes_per_token"]}
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self._moe_history: list = []  # each micro-batch's per-layer routing stats since the last log line
        self._step_load: list[torch.Tensor] = []  # this step's [layers, E] assignment shares, per micro-batch
        self.ewc: Any = None  # fine-tuning with ewc_lambda > 0: finetune/ewc.py's penalty

    def peak_shape(self) -> tuple[int, int, int]:
        """(m, k, n) of a matmul like the model's FFN on one micro-batch: what the MFU peak is timed on."""
        m = self.cfg.model
        return self.cfg.train.micro_batch_size * self.cfg.data.seq_len, m.dim, max(m.dense_ffn_dim, m.expert_ffn_dim)

    def build_model(self) -> nn.Module:
        from neuraflex_ray.models.moe_lm import MoELM

        if self.cfg.finetune.from_export:  # fine-tuning starts from the export's weights
            from neuraflex_ray.checkpoint import load_exported

            return load_exported(self.cfg.finetune.from_export)[0].train()
        return MoELM(self.cfg.model)

    def adapt(self, model: nn.Module) -> nn.Module:
        """After parallelisation: LoRA adapters of a fine-tune (finetune/)."""
        from neuraflex_ray.finetune.setup import adapt_for_finetune

        return adapt_for_finetune(model, self.cfg)

    def after_setup(self, model: nn.Module) -> None:
        """Once the strategy is set up, before a checkpoint is restored: a fine-tune's EWC penalty,
        anchored at the export's weights. DeepSpeed's engine holds the model as `.module`."""
        from neuraflex_ray.finetune.setup import ewc_for_finetune

        self.ewc = ewc_for_finetune(getattr(model, "module", model), self.cfg)

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0,
                train: bool = False) -> Iterator[torch.Tensor]:
        """This rank's slice of each global batch (token blocks are all alike: training and evaluation
        batch the same way)."""
        from pipelines.text import block_array

        for batch in global_batches(ds, micro_bs, world, skip):
            rows = block_array(batch)[rank * micro_bs:(rank + 1) * micro_bs]
            yield torch.from_numpy(rows.astype(np.int64))

    def fingerprint(self, tokens: torch.Tensor) -> int:
        return int(tokens[0, :8].sum())

    def step(self, model: Callable, tokens: torch.Tensor, step: int, device: torch.device, train: bool = True) -> StepOutput:
        from neuraflex_ray.models.moe_lm import lm_loss

        tokens = tokens.to(device, non_blocking=True)
        logits, stats = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:], stats, self.cfg.model)
        total = loss.total
        if train and self.ewc is not None:
            total = total + self.ewc.penalty()
        if train:
            self._moe_history.append([dataclasses.replace(s, aux_loss=s.aux_loss.detach(), z_loss=s.z_loss.detach())
                                      for s in stats])
            if stats:
                self._step_load.append(torch.stack([s.expert_fraction for s in stats]))
        n = tokens[:, 1:].numel()
        parts = {"ce": loss.ce.detach(), "aux": loss.aux.detach(), "z": loss.z.detach()}
        return StepOutput(total, parts, n, n * self.flops_per_token)

    def after_update(self, model: nn.Module) -> None:
        """After each optimizer step: the aux-free router's bias moves toward balance by the step's
        load, summed over every rank (an all-reduce), so the bias stays identical on every rank."""
        loads, self._step_load = self._step_load, []
        if self.cfg.model.router != "aux_free" or not loads:
            return
        import torch.distributed as dist

        from neuraflex_ray.models.routers import balance_biases, nudge_balance_bias

        load = torch.stack(loads).sum(0)
        if dist.is_initialized():
            dist.all_reduce(load)
        nudge_balance_bias(balance_biases(model), load, self.cfg.model.balance_bias_rate)

    def eval_metrics(self, total: float, parts: dict[str, float]) -> dict[str, float]:
        """The LM's validation loss is the cross entropy alone (what bits per byte and the export report)."""
        return {"loss": parts["ce"], "bits_per_byte": bits_per_byte(parts["ce"], self.bytes_per_token["val"])}

    def log_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        """Routing health over the interval: busiest expert's share (1/E is balanced) and the share of
        assignments dropped for capacity, worst layer of each; per-layer detail to TensorBoard."""
        from neuraflex_ray.models.moe import load_cv_of, mean_stats

        stats = mean_stats(self._moe_history)
        self._moe_history.clear()
        bpb = bits_per_byte(parts["ce"], self.bytes_per_token["train"])
        if not stats:  # the dense baseline
            return {"bits_per_byte": bpb}, f"ce {parts['ce']:.4f} ({bpb:.3f} bpb)"
        max_load = max(float(s.expert_fraction.max()) for s in stats)
        load_cv = max(load_cv_of(s.expert_fraction) for s in stats)
        dropped = max(float(s.dropped_fraction) for s in stats)
        if writer is not None:
            writer.moe_layers(stats, step)
        text = (f"ce {parts['ce']:.4f} ({bpb:.3f} bpb) | aux {parts['aux']:.3f} | max load {max_load:.2f} "
                f"cv {load_cv:.2f} | drop {100 * dropped:.1f}%")
        return {"bits_per_byte": bpb, "expert_max_load": max_load, "expert_load_cv": load_cv,
                "dropped_fraction": dropped}, text


class NeuroTask:
    """NeuroFM on time-series windows: masked reconstruction + forecasting + cross-modal contrastive.

    Training steps apply the `data.augment` augmentations (`pipelines/augment.py`) to each window
    before the loss; evaluation steps never do, so validation numbers do not depend on them.
    """

    unit = "patches"
    val_metrics = ("loss", "recon", "forecast", "contrastive", "variance")
    primary = "loss"  # the weighted sum of the objectives

    def __init__(self, cfg: JobConfig, loop_config: dict[str, Any], rank: int = 0):
        self.cfg = cfg
        self.manifest = loop_config["manifest"]
        self.rank = rank
        self._generator: tuple[int, torch.Generator] | None = None
        self.ewc: Any = None  # fine-tuning with ewc_lambda > 0: finetune/ewc.py's penalty

    def generator(self, step: int) -> torch.Generator:
        """Masks and curriculum draws, seeded by (seed, step, rank): a run resumed at step s draws
        exactly what the uninterrupted run drew, without saving generator state."""
        if self._generator is None or self._generator[0] != step:
            seed = (self.cfg.train.seed * 1_000_003 + step) * 1009 + self.rank
            self._generator = (step, torch.Generator().manual_seed(seed))
        return self._generator[1]

    def adapt(self, model: nn.Module) -> nn.Module:
        """Before sharding: LoRA adapters of a fine-tune (finetune/)."""
        from neuraflex_ray.finetune.setup import adapt_for_finetune

        return adapt_for_finetune(model, self.cfg)

    def after_setup(self, model: nn.Module) -> None:
        """Once FSDP2 has sharded the model, before a checkpoint is restored: a fine-tune's EWC
        penalty on this rank's shards, anchored at the export's weights."""
        from neuraflex_ray.finetune.setup import ewc_for_finetune

        self.ewc = ewc_for_finetune(model, self.cfg)

    def peak_shape(self) -> tuple[int, int, int]:
        """(m, k, n) like the backbone's MLP over a micro-batch's latents (about 1,024 rows)."""
        m = self.cfg.model
        return 1024, m.dim, m.ffn_mult * m.dim

    def build_model(self) -> nn.Module:
        from neuraflex_ray.models.neurofm import NeuroFM

        if self.cfg.finetune.from_export:  # fine-tuning starts from the export's weights
            from neuraflex_ray.checkpoint import load_exported

            return load_exported(self.cfg.finetune.from_export)[0].train()
        return NeuroFM(self.cfg.model)

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0,
                train: bool = False) -> Iterator[dict[str, Any]]:
        """This rank's slice, keeping only modalities present somewhere in the *global* batch.

        FSDP reduce-scatters the gradients of the parameters that got one; every rank must agree on
        that set, so it is decided from the global batch that all ranks see, never from the slice.
        Training batches are regrouped by modality set with `data.batch_by_modality`
        (pipelines/modality_buckets.py); `skip` then counts regrouped batches.
        """
        from pipelines.timeseries import series_batch

        bucket = train and self.cfg.data.batch_by_modality
        # Without regrouping a skipped batch is never converted; with it, `skip` counts regrouped batches.
        stream = (series_batch(b, self.manifest) for b in global_batches(ds, micro_bs, world, 0 if bucket else skip))
        if bucket:
            from pipelines.modality_buckets import bucket_by_modality

            stream = itertools.islice(bucket_by_modality(stream, micro_bs * world), skip, None)
        for arrays in stream:
            yield window_inputs(arrays, slice(rank * micro_bs, (rank + 1) * micro_bs))

    def fingerprint(self, window: dict[str, Any]) -> int:
        first = next(iter(window.values()))
        return int(first.x[0].abs().sum() * 1000)

    def tokens(self, window: dict[str, Any]) -> int:
        """Patch tokens the encoder saw: valid channels of present modalities x context patches."""
        n = self.cfg.model.context_patches
        return int(sum(((w.chan > 0) & w.present[:, None]).sum() for w in window.values())) * n

    def step(self, model: Callable, window: dict[str, Any], step: int, device: torch.device, train: bool = True) -> StepOutput:
        from neuraflex_ray.models.neurofm import neurofm_flops_per_window
        from neuraflex_ray.models.neurofm_objectives import contrastive_views, neurofm_loss

        # Counted on the host copy (no device sync per micro-batch) and before augmentation: a dropped
        # modality's tokens are masked, not removed, so the encoder still does their work.
        tokens = self.tokens(window)
        batch = next(iter(window.values())).x.shape[0]
        window = {m: dataclasses.replace(w, x=w.x.to(device), chan=w.chan.to(device), present=w.present.to(device),
                                         hide=None if w.hide is None else w.hide.to(device))
                  for m, w in window.items()}
        # Evaluation scores the final curriculum stage with the same masks every time, so values
        # compare across evaluations (and across Tune trials).
        stage_step = step if train else self.cfg.train.max_steps
        gen = self.generator(step) if train else torch.Generator().manual_seed(self.cfg.train.seed + 7 + self.rank)
        if train and self.cfg.data.augment.enabled:
            from pipelines.augment import augment_window

            # Drawn from the step's generator, before the loss's masks: a resumed run repeats both.
            window = augment_window(window, self.cfg.data.augment, self.manifest, gen)
        loss = neurofm_loss(model, window, self.cfg.model, stage_step, gen, gather=gather_across_ranks())
        views = contrastive_views(self.cfg.model, stage_step, len(window))
        flops = neurofm_flops_per_window(self.cfg.model, tokens // max(1, batch), contrastive_modalities=views) * batch
        parts = {"recon": loss.recon.detach(), "forecast": loss.forecast.detach(), "contrastive": loss.contrastive.detach(),
                 "variance": loss.variance.detach()}
        total = loss.total + self.ewc.penalty() if train and self.ewc is not None else loss.total
        return StepOutput(total, parts, tokens, flops)

    def after_update(self, model: nn.Module) -> None:
        """Nothing to do after an optimizer step (the LM's aux-free router has something)."""

    def eval_metrics(self, total: float, parts: dict[str, float]) -> dict[str, float]:
        return {"loss": total, **parts}

    def log_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        text = (f"recon {parts['recon']:.4f} | forecast {parts['forecast']:.4f} | contrastive {parts['contrastive']:.4f} "
                f"| variance {parts['variance']:.4f}")
        return {}, text


def window_inputs(arrays: dict[str, Any], rows: slice) -> dict[str, Any]:
    """Rows `rows` of a global batch ({modality: SeriesArrays}) as model inputs: only the modalities
    present somewhere in the batch, and only as many channels as the batch uses."""
    from neuraflex_ray.models.neurofm import SeriesInput

    window = {}
    for m, a in arrays.items():
        if not a.present.any():
            continue
        # Channels are stored padded to the modality's max_channels (64 for EEG); keep only as many
        # as the global batch uses, so a batch of 2-electrode headbands costs 2, not 64.
        used = int(np.flatnonzero((a.chan > 0).any(0)).max()) + 1
        window[m] = SeriesInput(x=torch.from_numpy(a.x[rows, :used]), chan=torch.from_numpy(a.chan[rows, :used]),
                                present=torch.from_numpy(a.present[rows]))
    return window


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
    task = NeuroTask if model_type == "neurofm" else LMTask
    return ["train_loss", *(f"val_{m}" for m in task.val_metrics)]


def build_task(cfg: JobConfig, loop_config: dict[str, Any], rank: int) -> LMTask | NeuroTask:
    return NeuroTask(cfg, loop_config, rank) if cfg.model_type == "neurofm" else LMTask(cfg, loop_config, rank)
