"""The Ray Train worker loop, written once against a task (task.py) and a strategy (strategy.py).

The task knows the model and its data (tokens or time-series windows); the strategy knows the
engine (DeepSpeed or FSDP2). Every rank iterates the same global batches and keeps its slice, so
the data position is one number per epoch and a resumed run continues with exactly the batch it
would have seen.

Ray Train V2 keeps `Result.metrics` only from checkpointed reports and every rank must call
`report` the same number of times, so we report only with checkpoints; per-step curves go to
our own TensorBoard writer (rank 0) and the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import socket
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from neuraflex_ray.checkpoint import read_train_state
from neuraflex_ray.config import JobConfig
from neuraflex_ray.train.metrics import MetricsWriter, format_eta, measure_peak_flops
from neuraflex_ray.train.prefetch import EpochPrefetcher
from neuraflex_ray.train.strategy import build_strategy
from neuraflex_ray.train.task import build_task


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(task: Any, model: Any, strategy: Any, batches: list[Any], step: int,
             device: torch.device) -> tuple[float, dict[str, float]]:
    """Validation loss (and its parts) over this rank's share of the eval batches, weighted by units
    and reduced over ranks; all ranks run it."""
    if not batches:
        raise RuntimeError("validation split produced no full batch: lower train.micro_batch_size or add data")
    strategy.train(False)
    names: list[str] = []
    sums = None  # [loss * units, part * units..., units]; NCCL reduces only device tensors
    rows: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            out = task.step(model, batch, step, device, train=False)
            names = list(out.parts)
            vals = torch.stack([out.loss.detach().double(), *(p.double() for p in out.parts.values())]) * out.units
            row = torch.cat([vals, torch.tensor([float(out.units)], dtype=torch.float64, device=device)])
            sums = row if sums is None else sums + row
            for key, value in out.rows.items():
                rows.setdefault(key, []).append(value.detach().float().cpu())
    dist.all_reduce(sums)
    strategy.train(True)
    mean = (sums[:-1] / sums[-1]).tolist()
    parts = dict(zip(names, mean[1:], strict=True))
    if rows:
        parts.update(task.eval_set_metrics(gather_rows({k: torch.cat(v).numpy() for k, v in rows.items()})))
    return mean[0], parts


def gather_rows(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's arrays, concatenated in rank order (each rank gets all of them)."""
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {k: np.concatenate([part[k] for part in every]) for k in mine}


def log(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver and `ray job logs`.

    Not print(): Train V2 reroutes print() on its workers through the logging module, and the
    line then reaches the driver twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One rank's training run: set up (data position, prefetcher, model, peak, weights), then steps,
    each followed by its progress line and evaluation/report when they are due."""
    run = WorkerRun(config)
    run.read_position()
    run.start_feed()
    run.build_model()
    run.load_weights()
    while run.step < run.t.max_steps:
        if not run.train_step():
            break
        run.log_progress()
        run.evaluate_and_report()
    return run.finish()


@dataclasses.dataclass
class Interval:
    """What the loop counts between progress lines (this rank's; summed over ranks when logged)."""

    steps: int = 0
    units: float = 0.0  # tokens / patches processed
    flops: float = 0.0  # model FLOPs spent
    wait: float = 0.0  # seconds waiting for the next batch
    # Seconds in forward+backward and in the optimizer step (gradient reduction included: ZeRO and
    # FSDP overlap it with both, so it is not a separate figure).
    phase: dict[str, float] = dataclasses.field(default_factory=lambda: {"fwd_bwd": 0.0, "optimizer": 0.0})
    loss: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # summed on the device: no host sync


class WorkerRun:
    """The state of one rank's run, and the named steps of `train_loop_per_worker`."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.cfg = JobConfig.from_dict(config["job"])
        self.t = t = self.cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(t.cpus_per_worker)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.task = build_task(self.cfg, config, self.rank)
        self.strategy = build_strategy(self.cfg)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.global_batch = t.micro_batch_size * self.world  # rows per global micro-batch
        self.restored_from: int | None = None
        self.diverged_at: int | None = None
        self.val_batches: list[Any] | None = None
        self.val: dict[str, float] = {"loss": float("nan")}  # the latest evaluation, and the step it ran at
        self.val_step = 0
        self.history: list[dict[str, Any]] = []
        self.batch_ids: list[int] = []  # fingerprint of each micro-batch this rank trained on (tests check resume)
        self.interval = Interval()
        self.totals = {"units": 0.0, "flops": 0.0, "wait": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0}
        self.pause = 0.0  # eval and checkpoint time, kept out of throughput
        self.t_start = self.t_log = 0.0  # set when training starts (load_weights): set-up is not timed
        self.grad_norm = self.lr = 0.0
        self.ckpt: Any = None
        self.ckpt_dir = ""
        # One local copy of the checkpoint, held from read_position until load_weights: the data
        # position is read before the model is built, the weights after (a cloud checkpoint downloads once).
        self.restore = contextlib.ExitStack()

    # ---- set-up -----------------------------------------------------------------------------
    def read_position(self) -> None:
        """Where the data resumes, from the checkpoint (Train's own after a failure, else resume_from)."""
        self.ckpt = ray.train.get_checkpoint()
        if self.ckpt is None and self.config.get("resume_from"):
            self.ckpt = ray.train.Checkpoint.from_directory(self.config["resume_from"])
        if self.ckpt is None:
            return
        self.ckpt_dir = self.restore.enter_context(self.ckpt.as_directory())
        state = read_train_state(self.ckpt_dir)
        self.step, self.epoch = state["step"], state["epoch"]
        # The position is kept in samples so a resume with another micro_batch_size or world
        # size lands on the same data, or refuses when it cannot.
        if state["samples_in_epoch"] % self.global_batch:
            raise ValueError(f"checkpoint is {state['samples_in_epoch']} samples into epoch {self.epoch}, not a multiple "
                             f"of train.micro_batch_size x workers = {self.global_batch}: resume with a batch layout "
                             f"that divides it")
        self.batch_in_epoch = state["samples_in_epoch"] // self.global_batch

    def start_feed(self) -> None:
        """Read ahead on a background thread, across epoch boundaries (train/prefetch.py), started before
        the model is built so the pipeline's first read (seconds) overlaps the set-up, not step 1."""
        t, train_ds = self.t, ray.train.get_dataset_shard("train")
        self.feed = EpochPrefetcher(
            lambda skip: self.task.batches(train_ds, t.micro_batch_size, self.rank, self.world, skip=skip, train=True),
            self.epoch, skip=self.batch_in_epoch)

    def build_model(self) -> None:
        """The model in the strategy's hands, the MFU peak, and where this rank landed."""
        self.model = self.strategy.setup(self.task.build_model(), adapt=self.task.adapt)
        self.task.after_setup(self.model)  # before any restore: a fine-tune's EWC anchors at the export's weights
        self.device = device = self.strategy.device
        # The first read's remainder is waited out here, in set-up, so the peak below is timed with the
        # prefetcher idle (it then only tops up its queue); the wait is logged, not hidden.
        first_read_wait = self.feed.wait_ready()
        # The MFU denominator: per worker, in this run, at its thread count, on matrices shaped like the model's.
        self.peak = measure_peak_flops(device, self.t.cpus_per_worker, shape=self.task.peak_shape())
        # Where each rank landed (placement across nodes is a config choice: train.placement_strategy).
        node = ray.get_runtime_context().get_node_id()
        log(f"[train] rank {self.rank}/{self.world} on node {node} ({socket.gethostname()}), device {device}, first "
            f"batch {first_read_wait:.1f} s after the model was built")
        # Reported with every evaluation: a sweep releases an ended trial's group by this id (tune/).
        pg = ray.util.get_current_placement_group()
        self.placement_group = pg.id.hex() if pg is not None else ""
        self.writer = MetricsWriter(self.config["tensorboard_dir"]) if self.rank == 0 else None

    def load_weights(self) -> None:
        """The checkpoint's weights and optimizer state, if the run resumes; then the model trains and the
        run's clock starts (throughput, MFU and the ETA leave set-up out)."""
        if self.ckpt is not None:
            with self.restore:
                self.strategy.load(self.ckpt_dir)
            self.restored_from = self.step
            if self.rank == 0:
                log(f"[train] resumed from checkpoint at step {self.step} (epoch {self.epoch}, batch "
                    f"{self.batch_in_epoch})")
        self.strategy.train(True)
        self.t_start = self.t_log = time.perf_counter()

    # ---- one step ---------------------------------------------------------------------------
    def _clock(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _next_micro(self) -> Any:
        e, batch = self.feed.next()
        if e != self.epoch:
            self.epoch, self.batch_in_epoch = e, 0
        self.batch_in_epoch += 1
        return batch

    def train_step(self) -> bool:
        """grad_accum_steps micro-batches, then the optimizer step; False when the gradient norm is not finite."""
        t, it = self.t, self.interval
        injected = t.inject_failure_at_step and self.step == t.inject_failure_at_step
        if injected and self.restored_from is None and self.rank == self.world - 1:
            raise RuntimeError(f"injected failure at step {self.step} (train.inject_failure_at_step)")
        self.lr = lr_at(self.step, self.cfg)
        for _ in range(t.grad_accum_steps):
            t_wait = time.perf_counter()
            batch = self._next_micro()
            it.wait += time.perf_counter() - t_wait
            self.batch_ids.append(self.task.fingerprint(batch))
            t_fb = self._clock()
            out = self.task.step(self.model, batch, self.step, self.device)
            self.strategy.backward(out.loss)
            it.phase["fwd_bwd"] += self._clock() - t_fb
            for k, v in {"loss": out.loss.detach(), **out.parts}.items():
                it.loss[k] = it.loss[k] + v if k in it.loss else v.clone()
            it.units += out.units
            it.flops += out.flops
        t_opt = self._clock()
        self.grad_norm = self.strategy.step(self.lr)
        it.phase["optimizer"] += self._clock() - t_opt
        if not math.isfinite(self.grad_norm):
            # The norm is global, so every rank stops here together. Returning (instead of raising)
            # keeps Ray Train from restarting a run that would diverge again from its last checkpoint;
            # the driver turns this into an error (a Tune trial is then marked failed).
            self.diverged_at = self.step
            if self.rank == 0:
                log(f"[train] non-finite gradient norm at step {self.step}: stopping")
            return False
        self.task.after_update(self.model)
        self.step += 1
        it.steps += 1
        return True

    # ---- progress ---------------------------------------------------------------------------
    def log_progress(self) -> None:
        """Every log_every steps (and at the last): the interval's loss, throughput, MFU, data wait, ETA."""
        t, it, device = self.t, self.interval, self.device
        if not (self.step % t.log_every == 0 or self.step == t.max_steps):
            return
        now = time.perf_counter()
        dt = now - self.t_log
        # Throughput and FLOPs summed over every rank (ranks see different modalities and channels).
        sums = torch.tensor([it.units, it.flops], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        avg = {k: float(v) / (it.steps * t.grad_accum_steps) for k, v in it.loss.items()}
        rate = float(sums[0]) / dt
        mfu = float(sums[1]) / dt / self.world / self.peak
        # The slowest rank's wait is what holds a synchronous step back.
        slowest = torch.tensor([it.wait], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        data_wait = min(1.0, float(slowest) / dt)
        shares = {k: min(1.0, v / dt) for k, v in it.phase.items()}  # rank 0's, of the interval's wall time
        for key, value in (("units", float(sums[0])), ("flops", float(sums[1])), ("wait", float(slowest)), *it.phase.items()):
            self.totals[key] += value
        eta = (now - self.t_start - self.pause) / max(1, self.step - (self.restored_from or 0)) * (t.max_steps - self.step)
        extras, text = self.task.log_extras(avg, self.writer, self.step)
        unit = self.task.unit
        rec = {"step": self.step, **avg, "lr": self.lr, "grad_norm": self.grad_norm, f"{unit}_per_s": rate, "mfu": mfu,
               "data_wait": data_wait, **shares, **extras}
        self.history.append(rec)
        if self.writer is not None:
            log(f"[train] step {self.step}/{t.max_steps} | loss {avg['loss']:.4f} | {text} | lr {self.lr:.2e} "
                f"| gnorm {self.grad_norm:.3f} | {rate:,.0f} {unit}/s | mfu {100 * mfu:.2f}% "
                f"| data wait {100 * data_wait:.1f}% | fwd/bwd {100 * shares['fwd_bwd']:.0f}% "
                f"| optim {100 * shares['optimizer']:.0f}% | eta {format_eta(eta)}")
            self.writer.scalars("train", rec, self.step)
        self.interval = Interval()
        self.t_log = now

    # ---- evaluation, reports, checkpoints ---------------------------------------------------
    def evaluate_and_report(self) -> None:
        """Every evaluation is reported (Tune's schedulers decide on these); checkpoints ride along.
        `report` is a barrier, and every rank reaches it at the same steps. Kept out of throughput."""
        t, step = self.t, self.step
        is_last = step == t.max_steps
        t_pause = time.perf_counter()
        evaluated = step % t.eval_every == 0 or is_last
        if evaluated:
            self._evaluate()
        if evaluated or step % t.checkpoint_every == 0:
            metrics = {"step": step, "val_step": self.val_step, **{f"val_{k}": v for k, v in self.val.items()},
                       "train_loss": self.history[-1][self.task.primary] if self.history else float("nan"),
                       "placement_group": self.placement_group}
            if step % t.checkpoint_every == 0 or is_last:
                self._report_with_checkpoint(metrics)
            else:
                ray.train.report(metrics)
        dt_pause = time.perf_counter() - t_pause
        self.t_log += dt_pause
        self.pause += dt_pause

    def _evaluate(self) -> None:
        t = self.t
        if self.val_batches is None:
            # Every evaluation scores the same first eval_batches global batches: read them once
            # (a fresh pass over the validation dataset costs seconds of pipeline start-up).
            self.val_batches = list(itertools.islice(
                self.task.batches(ray.train.get_dataset_shard("val"), t.micro_batch_size, self.rank, self.world),
                t.eval_batches))
        total, parts = evaluate(self.task, self.model, self.strategy, self.val_batches, self.step, self.device)
        self.val, self.val_step = self.task.eval_metrics(total, parts), self.step
        if self.writer is not None:
            log(f"[eval] step {self.step} | " + " | ".join(f"val {k} {v:.4f}" for k, v in self.val.items()))
            self.writer.scalars("val", self.val, self.step)

    def _report_with_checkpoint(self, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="nfr-ckpt-") as tmp:
            self.strategy.save(tmp, {"step": self.step, "epoch": self.epoch,
                                     "samples_in_epoch": self.batch_in_epoch * self.global_batch,
                                     "model_type": self.cfg.model_type, "strategy": self.strategy.name,
                                     "world_size": self.world, "model_config": dataclasses.asdict(self.cfg.model)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # ---- the end ----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """What rank 0's loop returns to the driver (`Result.return_value`)."""
        self.feed.close()
        if self.writer is not None:
            self.writer.close()
        elapsed = time.perf_counter() - self.t_start - self.pause

        def per_s(x: float) -> float:
            return x / elapsed if elapsed > 0 else 0.0

        return {
            "steps": self.step,
            "diverged_at_step": self.diverged_at,
            "optimizer_steps": self.strategy.optimizer_steps,
            "restored_from_step": self.restored_from,
            "data_position": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "batch_fingerprints": self.batch_ids,
            "final_loss": self.history[-1][self.task.primary] if self.history else float("nan"),
            **{f"val_{k}": v for k, v in self.val.items()},  # the last evaluation, every metric of it
            f"{self.task.unit}_per_s": per_s(self.totals["units"]),
            "mfu": per_s(self.totals["flops"]) / self.world / self.peak,
            "peak_flops_per_worker": self.peak,
            "data_wait_frac": min(1.0, per_s(self.totals["wait"])),
            **{f"{k}_frac": min(1.0, per_s(self.totals[k])) for k in ("fwd_bwd", "optimizer")},
            "history": self.history,
        }
