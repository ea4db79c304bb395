"""The Ray Train worker loop, written once against a task (tasks.py) and a strategy (strategy.py).

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

import ray.train
import torch
import torch.distributed as dist

from neuraflex_ray.config import JobConfig
from neuraflex_ray.train.metrics import MetricsWriter, format_eta, measure_peak_flops
from neuraflex_ray.train.prefetch import EpochPrefetcher
from neuraflex_ray.train.strategy import build_strategy, read_train_state
from neuraflex_ray.train.tasks import build_task


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
    with torch.no_grad():
        for batch in batches:
            out = task.step(model, batch, step, device, train=False)
            names = list(out.parts)
            vals = torch.stack([out.loss.detach().double(), *(p.double() for p in out.parts.values())]) * out.units
            row = torch.cat([vals, torch.tensor([float(out.units)], dtype=torch.float64, device=device)])
            sums = row if sums is None else sums + row
    dist.all_reduce(sums)
    strategy.train(True)
    mean = (sums[:-1] / sums[-1]).tolist()
    return mean[0], dict(zip(names, mean[1:], strict=True))


def log(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver and `ray job logs`.

    Not print(): Train V2 reroutes print() on its workers through the logging module, and the
    line then reaches the driver twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg = JobConfig.from_dict(config["job"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.cpus_per_worker)
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    task = build_task(cfg, config, rank)
    strategy = build_strategy(cfg)
    step, epoch, batch_in_epoch = 0, 0, 0
    global_batch = t.micro_batch_size * world  # rows per global micro-batch
    restored_from = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint.from_directory(config["resume_from"])
    # One local copy of the checkpoint, held from here until the strategy has loaded it: the data
    # position is read before the model is built, the weights after (a cloud checkpoint downloads once).
    restore = contextlib.ExitStack()
    if ckpt is not None:  # where the data resumes is known before the model is built
        ckpt_dir = restore.enter_context(ckpt.as_directory())
        state = read_train_state(ckpt_dir)
        step, epoch = state["step"], state["epoch"]
        # The position is kept in samples so a resume with another micro_batch_size or world
        # size lands on the same data, or refuses when it cannot.
        if state["samples_in_epoch"] % global_batch:
            raise ValueError(f"checkpoint is {state['samples_in_epoch']} samples into epoch {epoch}, not a multiple of "
                             f"train.micro_batch_size x workers = {global_batch}: resume with a batch layout that divides it")
        batch_in_epoch = state["samples_in_epoch"] // global_batch
    train_ds = ray.train.get_dataset_shard("train")
    # Read ahead on a background thread, across epoch boundaries (train/prefetch.py), started before
    # the model is built so the pipeline's first read (seconds) overlaps the set-up, not step 1.
    feed = EpochPrefetcher(
        lambda skip: task.batches(train_ds, t.micro_batch_size, rank, world, skip=skip, train=True),
        epoch, skip=batch_in_epoch)

    model = strategy.setup(task.build_model(), adapt=task.adapt)
    task.after_setup(model)  # before any restore: a fine-tune's EWC anchors at the export's weights
    device = strategy.device
    # The first read's remainder is waited out here, in set-up, so the peak below is timed with the
    # prefetcher idle (it then only tops up its queue); the wait is logged, not hidden.
    first_read_wait = feed.wait_ready()
    # The MFU denominator: per worker, in this run, at its thread count, on matrices shaped like the model's.
    peak = measure_peak_flops(device, t.cpus_per_worker, shape=task.peak_shape())
    # Where each rank landed (placement across nodes is a config choice: train.placement_strategy).
    node = ray.get_runtime_context().get_node_id()
    log(f"[train] rank {rank}/{world} on node {node} ({socket.gethostname()}), device {device}, first batch "
        f"{first_read_wait:.1f} s after the model was built")
    # Reported with every evaluation: a sweep releases an ended trial's group by this id (sweep.py).
    pg = ray.util.get_current_placement_group()
    placement_group = pg.id.hex() if pg is not None else ""

    if ckpt is not None:
        with restore:
            strategy.load(ckpt_dir)
        restored_from = step
        if rank == 0:
            log(f"[train] resumed from checkpoint at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    writer = MetricsWriter(config["tensorboard_dir"]) if rank == 0 else None

    val_loss = float("nan")
    val: dict[str, float] = {"loss": val_loss}  # the latest evaluation, and the step it ran at
    val_step = 0
    diverged_at = None
    val_batches: list[Any] | None = None
    history: list[dict[str, Any]] = []
    first_batch_ids: list[int] = []  # fingerprint of each micro-batch this rank trained on (tests check resume)
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    loss_acc: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per micro-batch
    units = flops = 0.0  # since the last log line, this rank
    total_units = total_flops = 0.0
    pause = 0.0  # eval and checkpoint time, kept out of throughput
    wait = total_wait = 0.0  # seconds spent waiting for the next batch, since the last log line / in all
    # Seconds in forward+backward and in the optimizer step (gradient reduction included: ZeRO and
    # FSDP overlap it with both, so it is not a separate figure), since the last log line / in all.
    phase = {"fwd_bwd": 0.0, "optimizer": 0.0}
    phase_total = dict(phase)

    def clock() -> float:
        if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def next_micro() -> Any:
        nonlocal epoch, batch_in_epoch
        e, batch = feed.next()
        if e != epoch:
            epoch, batch_in_epoch = e, 0
        batch_in_epoch += 1
        return batch

    strategy.train(True)
    while step < t.max_steps:
        injected = t.inject_failure_at_step and step == t.inject_failure_at_step
        if injected and restored_from is None and rank == world - 1:
            raise RuntimeError(f"injected failure at step {step} (train.inject_failure_at_step)")
        lr = lr_at(step, cfg)
        for _ in range(t.grad_accum_steps):
            t_wait = time.perf_counter()
            batch = next_micro()
            wait += time.perf_counter() - t_wait
            first_batch_ids.append(task.fingerprint(batch))
            t_fb = clock()
            out = task.step(model, batch, step, device)
            strategy.backward(out.loss)
            phase["fwd_bwd"] += clock() - t_fb
            for k, v in {"loss": out.loss.detach(), **out.parts}.items():
                loss_acc[k] = loss_acc[k] + v if k in loss_acc else v.clone()
            units += out.units
            flops += out.flops
        t_opt = clock()
        grad_norm = strategy.step(lr)
        phase["optimizer"] += clock() - t_opt
        if not math.isfinite(grad_norm):
            # The norm is global, so every rank stops here together. Returning (instead of raising)
            # keeps Ray Train from restarting a run that would diverge again from its last checkpoint;
            # the driver turns this into an error (a Tune trial is then marked failed).
            diverged_at = step
            if rank == 0:
                log(f"[train] non-finite gradient norm at step {step}: stopping")
            break
        task.after_update(model)
        step += 1
        steps_since_log += 1

        if step % t.log_every == 0 or step == t.max_steps:
            now = time.perf_counter()
            dt = now - t_log
            # Throughput and FLOPs summed over every rank (ranks see different modalities and channels).
            totals = torch.tensor([units, flops], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            avg = {k: float(v) / (steps_since_log * t.grad_accum_steps) for k, v in loss_acc.items()}
            rate = float(totals[0]) / dt
            mfu = float(totals[1]) / dt / world / peak
            # The slowest rank's wait is what holds a synchronous step back.
            slowest = torch.tensor([wait], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            data_wait = min(1.0, float(slowest) / dt)
            total_wait, wait = total_wait + float(slowest), 0.0
            total_units, total_flops = total_units + float(totals[0]), total_flops + float(totals[1])
            shares = {k: min(1.0, v / dt) for k, v in phase.items()}  # rank 0's, of the interval's wall time
            for k in phase:
                phase_total[k], phase[k] = phase_total[k] + phase[k], 0.0
            eta = (now - t_start - pause) / max(1, step - (restored_from or 0)) * (t.max_steps - step)
            extras, text = task.log_extras(avg, writer, step)
            rec = {"step": step, **avg, "lr": lr, "grad_norm": grad_norm, f"{task.unit}_per_s": rate, "mfu": mfu,
                   "data_wait": data_wait, **shares, **extras}
            history.append(rec)
            if writer is not None:
                log(f"[train] step {step}/{t.max_steps} | loss {avg['loss']:.4f} | {text} | lr {lr:.2e} "
                    f"| gnorm {grad_norm:.3f} | {rate:,.0f} {task.unit}/s | mfu {100 * mfu:.2f}% "
                    f"| data wait {100 * data_wait:.1f}% | fwd/bwd {100 * shares['fwd_bwd']:.0f}% "
                    f"| optim {100 * shares['optimizer']:.0f}% | eta {format_eta(eta)}")
                writer.scalars("train", rec, step)
            loss_acc.clear()
            units = flops = 0.0
            steps_since_log, t_log = 0, now

        is_last = step == t.max_steps
        t_pause = time.perf_counter()
        evaluated = step % t.eval_every == 0 or is_last
        if evaluated:
            if val_batches is None:
                # Every evaluation scores the same first eval_batches global batches: read them once
                # (a fresh pass over the validation dataset costs seconds of pipeline start-up).
                val_batches = list(itertools.islice(
                    task.batches(ray.train.get_dataset_shard("val"), t.micro_batch_size, rank, world), t.eval_batches))
            total, parts = evaluate(task, model, strategy, val_batches, step, device)
            val = task.eval_metrics(total, parts)
            val_loss, val_step = val["loss"], step
            if writer is not None:
                log(f"[eval] step {step} | " + " | ".join(f"val {k} {v:.4f}" for k, v in val.items()))
                writer.scalars("val", val, step)
        # Every evaluation is reported (Tune's schedulers decide on these); checkpoints ride along.
        # `report` is a barrier, and every rank reaches it at the same steps.
        if evaluated or step % t.checkpoint_every == 0:
            metrics = {"step": step, "val_step": val_step, **{f"val_{k}": v for k, v in val.items()},
                       "train_loss": history[-1][task.primary] if history else float("nan"),
                       "placement_group": placement_group}
            if step % t.checkpoint_every == 0 or is_last:
                with tempfile.TemporaryDirectory(prefix="nfr-ckpt-") as tmp:
                    strategy.save(tmp, {"step": step, "epoch": epoch, "samples_in_epoch": batch_in_epoch * global_batch,
                                        "model_type": cfg.model_type, "strategy": strategy.name, "world_size": world,
                                        "model_config": dataclasses.asdict(cfg.model)})
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
        dt_pause = time.perf_counter() - t_pause
        t_log += dt_pause
        pause += dt_pause

    feed.close()
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - t_start - pause
    return {
        "steps": step,
        "diverged_at_step": diverged_at,
        "optimizer_steps": strategy.optimizer_steps,
        "restored_from_step": restored_from,
        "data_position": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
        "batch_fingerprints": first_batch_ids,
        "final_loss": history[-1][task.primary] if history else float("nan"),
        "val_loss": val_loss,
        f"{task.unit}_per_s": total_units / elapsed if elapsed > 0 else 0.0,
        "mfu": total_flops / elapsed / world / peak if elapsed > 0 else 0.0,
        "peak_flops_per_worker": peak,
        "data_wait_frac": min(1.0, total_wait / elapsed) if elapsed > 0 else 0.0,
        **{f"{k}_frac": min(1.0, v / elapsed) if elapsed > 0 else 0.0 for k, v in phase_total.items()},
        "history": history,
    }
