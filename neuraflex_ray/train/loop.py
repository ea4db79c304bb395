"""The Ray Train worker loop, written once against a strategy (see strategy.py).

Data: every rank iterates the *same* global batches (micro_batch_size x world_size sequences, in
a fixed order) and keeps its own slice. That makes the data position a single number per epoch,
so a resumed run continues with exactly the batch it would have seen, and it guarantees the
equal shapes on every rank that expert parallelism needs. Blocks are small (seq_len+1 int32), so
reading the full stream on each rank costs little next to the model.

Ray Train V2 keeps `Result.metrics` only from checkpointed reports and every rank must call
`report` the same number of times, so we report only with checkpoints; per-step curves go to
our own TensorBoard writer (rank 0) and the log.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from neuraflex_ray.baselines import bits_per_byte
from neuraflex_ray.config import JobConfig
from neuraflex_ray.models.moe import mean_stats
from neuraflex_ray.models.moe_lm import MoELM, flops_per_token, lm_loss
from neuraflex_ray.train.metrics import MetricsWriter, format_eta, measure_peak_flops
from neuraflex_ray.train.strategy import build_strategy
from pipelines.text import block_array


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def rank_batches(it: Any, micro_bs: int, rank: int, world: int, skip: int = 0) -> Iterator[torch.Tensor]:
    """This rank's [micro_bs, seq_len+1] slice of each global batch, after skipping `skip` batches."""
    for i, batch in enumerate(it.iter_batches(batch_size=micro_bs * world, drop_last=True, batch_format="numpy")):
        if i < skip:
            continue
        rows = block_array(batch)[rank * micro_bs:(rank + 1) * micro_bs]
        yield torch.from_numpy(rows.astype(np.int64))


def evaluate(strategy: Any, cfg: JobConfig, rank: int, world: int, device: torch.device) -> float:
    """Mean validation cross entropy (nats/token) over eval_batches global batches; all ranks run it."""
    strategy.train(False)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [ce * tokens, tokens]; NCCL reduces only GPU tensors
    val = ray.train.get_dataset_shard("val")
    with torch.no_grad():
        for i, tokens in enumerate(rank_batches(val, cfg.train.micro_batch_size, rank, world)):
            if i >= cfg.train.eval_batches:
                break
            tokens = tokens.to(device)
            logits, stats = strategy.forward(tokens[:, :-1])
            loss = lm_loss(logits, tokens[:, 1:], stats, cfg.model)
            sums[0] += loss.ce.double() * tokens[:, 1:].numel()
            sums[1] += tokens[:, 1:].numel()
    dist.all_reduce(sums)
    strategy.train(True)
    if sums[1] == 0:
        raise RuntimeError("validation split produced no full batch: lower train.micro_batch_size or add data")
    return float(sums[0] / sums[1])


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg = JobConfig.from_dict(config["job"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.cpus_per_worker)
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    strategy = build_strategy(cfg)
    strategy.setup(MoELM(cfg.model))
    device = strategy.device

    step, epoch, batch_in_epoch = 0, 0, 0
    global_batch = t.micro_batch_size * world  # rows per global micro-batch
    restored_from = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint.from_directory(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = strategy.load(d)
        step, epoch = state["step"], state["epoch"]
        # The position is kept in samples so a resume with another micro_batch_size or world
        # size lands on the same data, or refuses when it cannot.
        if state["samples_in_epoch"] % global_batch:
            raise ValueError(f"checkpoint is {state['samples_in_epoch']} samples into epoch {epoch}, not a multiple of "
                             f"train.micro_batch_size x workers = {global_batch}: resume with a batch layout that divides it")
        batch_in_epoch = state["samples_in_epoch"] // global_batch
        restored_from = step
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)

    writer = MetricsWriter(config["tensorboard_dir"]) if rank == 0 else None
    seq_len = cfg.data.seq_len
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * world * seq_len
    peak = measure_peak_flops(device, t.cpus_per_worker)  # per worker, same run, same threads
    model_flops = flops_per_token(cfg.model, seq_len)

    train_ds = ray.train.get_dataset_shard("train")
    batches = rank_batches(train_ds, t.micro_batch_size, rank, world, skip=batch_in_epoch)
    val_loss = float("nan")
    history: list[dict[str, Any]] = []
    first_batch_ids: list[int] = []  # fingerprint of each micro-batch this rank trained on (tests check resume)
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    loss_acc = torch.zeros(4, device=device)  # summed on the device: no host sync per micro-batch
    moe_history: list = []  # each micro-batch's per-layer routing stats since the last log line

    def next_micro() -> torch.Tensor:
        nonlocal batches, epoch, batch_in_epoch
        while True:
            try:
                b = next(batches)
                batch_in_epoch += 1
                return b
            except StopIteration:
                if batch_in_epoch == 0:
                    raise RuntimeError("training split produced no full batch: lower train.micro_batch_size") from None
                epoch, batch_in_epoch = epoch + 1, 0
                batches = rank_batches(train_ds, t.micro_batch_size, rank, world)

    strategy.train(True)
    while step < t.max_steps:
        injected = t.inject_failure_at_step and step == t.inject_failure_at_step
        if injected and restored_from is None and rank == world - 1:
            raise RuntimeError(f"injected failure at step {step} (train.inject_failure_at_step)")
        lr = lr_at(step, cfg)
        for _ in range(t.grad_accum_steps):
            tokens = next_micro()
            first_batch_ids.append(int(tokens[0, :8].sum()))  # on the host, before the copy
            tokens = tokens.to(device, non_blocking=True)
            logits, stats = strategy.forward(tokens[:, :-1])
            loss = lm_loss(logits, tokens[:, 1:], stats, cfg.model)
            strategy.backward(loss.total)
            moe_history.append([dataclasses.replace(s, aux_loss=s.aux_loss.detach(), z_loss=s.z_loss.detach())
                                for s in stats])
            loss_acc += torch.stack([loss.total.detach(), loss.ce.detach(), loss.aux.detach(), loss.z.detach()])
        grad_norm = strategy.step(lr)
        step += 1
        steps_since_log += 1

        if step % t.log_every == 0 or step == t.max_steps:
            now = time.perf_counter()
            dt = now - t_log
            avg = (loss_acc / (steps_since_log * t.grad_accum_steps)).tolist()
            tok_s = tokens_per_step * steps_since_log / dt
            mfu = tok_s / world * model_flops / peak
            eta = (now - t_start) / max(1, step - (restored_from or 0)) * (t.max_steps - step)
            # Routing health over the interval: busiest expert's share (1/E is balanced) and the
            # share of assignments dropped for capacity, worst layer of each.
            stats = mean_stats(moe_history)
            moe_history.clear()
            max_load = max(float(s.expert_fraction.max()) for s in stats) if stats else 0.0
            dropped = max(float(s.dropped_fraction) for s in stats) if stats else 0.0
            rec = {"step": step, "loss": avg[0], "ce": avg[1], "aux": avg[2], "z": avg[3], "lr": lr,
                   "bits_per_byte": bits_per_byte(avg[1], config["train_bytes_per_token"]),
                   "grad_norm": grad_norm, "tokens_per_s": tok_s, "mfu": mfu, "expert_max_load": max_load,
                   "dropped_fraction": dropped}
            history.append(rec)
            if writer is not None:
                print(f"[train] step {step}/{t.max_steps} | loss {avg[0]:.4f} | ce {avg[1]:.4f} "
                      f"({rec['bits_per_byte']:.3f} bpb) | aux {avg[2]:.3f} "
                      f"| max load {max_load:.2f} | drop {100 * dropped:.1f}% "
                      f"| lr {lr:.2e} | gnorm {grad_norm:.3f} | {tok_s:,.0f} tok/s | mfu {100 * mfu:.2f}% "
                      f"| eta {format_eta(eta)}", flush=True)
                writer.scalars("train", rec, step)
                writer.moe_layers(stats, step)
            loss_acc.zero_()
            steps_since_log, t_log = 0, now

        is_last = step == t.max_steps
        t_pause = time.perf_counter()  # eval and checkpoint time stays out of the tokens/s window
        if step % t.eval_every == 0 or is_last:
            val_loss = evaluate(strategy, cfg, rank, world, device)
            bpb = bits_per_byte(val_loss, config["val_bytes_per_token"])
            if writer is not None:
                print(f"[eval] step {step} | val loss {val_loss:.4f} | val bits/byte {bpb:.4f}", flush=True)
                writer.scalars("val", {"loss": val_loss, "bits_per_byte": bpb}, step)
        if step % t.checkpoint_every == 0 or is_last:
            metrics = {"step": step, "val_loss": val_loss, "train_loss": history[-1]["ce"] if history else float("nan")}
            with tempfile.TemporaryDirectory(prefix="nfr-ckpt-") as tmp:
                strategy.save(tmp, {"step": step, "epoch": epoch, "samples_in_epoch": batch_in_epoch * global_batch,
                                    "model_config": dataclasses.asdict(cfg.model)})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        t_log += time.perf_counter() - t_pause

    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - t_start
    trained = step - (restored_from or 0)
    return {
        "steps": step,
        "optimizer_steps": strategy.optimizer_steps,
        "restored_from_step": restored_from,
        "data_position": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
        "batch_fingerprints": first_batch_ids,
        "final_loss": history[-1]["ce"] if history else float("nan"),
        "val_loss": val_loss,
        "tokens_per_s": tokens_per_step * trained / elapsed if trained else 0.0,
        "mfu": (tokens_per_step * trained / elapsed / world * model_flops / peak) if trained else 0.0,
        "peak_flops_per_worker": peak,
        "flops_per_token": model_flops,
        "history": history,
    }
