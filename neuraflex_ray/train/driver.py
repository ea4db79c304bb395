"""Driver side of training: data, Ray Train `TorchTrainer`, checkpoints on disk.

Everything here runs in the process that `ray job submit` (or the CLI) starts. All paths are
made absolute before workers start, because Train V2 workers `chdir` into their own artifacts
directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from neuraflex_ray import console
from neuraflex_ray.checkpoint import is_complete, read_checkpoint_state
from neuraflex_ray.config import ConfigError, JobConfig, TrainConfig, get_family, validate
from neuraflex_ray.local_ray import cluster_to_join, start_local_ray
from neuraflex_ray.train.checkpoint_notices import AnnounceCheckpoints, announce_skipped
from neuraflex_ray.train.loop import train_loop_per_worker

RAY_RUN_NAME = "train"


def ensure_ray(cfg: JobConfig | None = None, min_cpus: float = 0) -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit sets it) or start a local one with at
    least `min_cpus` logical CPUs (a sweep asks for room for all its concurrent trials)."""
    # Our own [data]/[train] lines report progress; Ray Data's bars garble job logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    # Library chatter to <run dir>/logs/library.log from here on (console.py); --verbose keeps it.
    console.install((cfg.run_dir if cfg else Path("runs")) / "logs" / "library.log")
    joining = cluster_to_join()
    if joining:
        ctx = ray.init()
    else:
        workers = cfg.train.num_workers * cfg.train.cpus_per_worker if cfg else 2
        # Logical CPUs above the physical count leave room for Ray Data's read tasks beside the
        # training workers on a small machine; the workers set their own torch thread counts.
        ctx = start_local_ray(num_cpus=max(os.cpu_count() or 1, workers + 2, math.ceil(min_cpus)),
                              include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    console.filter_worker_lines()
    if ctx.dashboard_url:
        print(f"[ray] {'connected to' if joining else 'started'} a Ray cluster; "
              f"dashboard http://{ctx.dashboard_url}", flush=True)


def scaling_config(t: TrainConfig) -> ScalingConfig:
    """Workers, their resources and where they go: all from train.* (see TrainConfig)."""
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.resources_per_worker}
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                         placement_strategy=t.placement_strategy, accelerator_type=t.accelerator_type or None)


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(path: str | Path, announce: bool = False) -> Path | None:
    """The newest complete checkpoint under a run directory (or `path` itself if it is one).
    `announce`: say on the console which newer ones it passed over as incomplete."""
    p = Path(path).resolve()
    if is_complete(p):
        return p
    # Ray names checkpoint directories by time; skip any a crash left incomplete.
    candidates = [d for d in sorted((checkpoints_root(p) / RAY_RUN_NAME).glob("checkpoint_*"), reverse=True)
                  if d.is_dir()]
    found = next((d for d in candidates if is_complete(d)), None)
    if announce:
        announce_skipped(candidates[:candidates.index(found)] if found else candidates, found)
    return found


def remove_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoint directories a killed worker left half-uploaded.

    Each rank uploads its own shards into the checkpoint directory, so a rank that dies mid-upload
    leaves a partial one. Train registers a checkpoint only after every rank reported it, so its
    restarts never load such a directory, and latest_checkpoint() skips them; removing them after
    the run means no half-written checkpoint outlives it.
    """
    removed = []
    for d in sorted((checkpoints_root(run_dir) / RAY_RUN_NAME).glob("checkpoint_*")):
        if d.is_dir() and not is_complete(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            print(f"[train] removed incomplete checkpoint {d} (a worker died while writing it)", flush=True)
    return removed


def prepare_data(cfg: JobConfig) -> tuple[JobConfig, Any, Any, dict[str, Any], dict[str, Any]]:
    """Build (or reuse) the family's dataset: (config with data-derived model fields, train, val,
    manifest, what the worker loop needs from the manifest)."""
    family = get_family(cfg.model_type)
    manifest = family.build_data(cfg.data)
    cfg = dataclasses.replace(cfg, model=family.fit_to_data(cfg, manifest))
    train_ds, val_ds = family.open_data(cfg.data.output_dir)
    return cfg, train_ds, val_ds, manifest, family.loop_data(manifest)


def _hold_in_memory(cfg: JobConfig, train_ds: Any, val_ds: Any, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """Read once, into Ray's object store, what every epoch or evaluation would otherwise re-read.

    Each streaming pass over Parquet spends seconds starting its read tasks. Evaluation only ever
    scores the first eval_batches global batches, so exactly those rows are held; the training
    split is held when it is small (train.materialize_train_mb) and streams otherwise. Rows keep
    their order, so every rank still sees the same sequence.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = cfg.train
    out = Path(cfg.data.output_dir)
    need = t.eval_batches * t.micro_batch_size * t.num_workers
    parts, have = [], 0
    for shard in manifest["val_shards"]:
        for batch in pq.ParquetFile(out / shard).iter_batches(batch_size=max(need, 1)):
            parts.append(batch.slice(0, need - have))
            have += len(parts[-1])
            if have >= need:
                break
        if have >= need:
            break
    val_ds = ray.data.from_arrow(pa.Table.from_batches(parts)) if parts else val_ds
    train_files = [out / s for s in manifest["train_shards"]]
    if sum(f.stat().st_size for f in train_files) < t.materialize_train_mb * 2**20:
        train_ds = ray.data.from_arrow(pa.concat_tables([pq.read_table(f) for f in train_files]))
    return train_ds, val_ds


def _check_resumable(saved: dict[str, Any], cfg: JobConfig, path: Path) -> None:
    """The checkpoint must hold this model: same type, strategy and architecture (data-derived fields included)."""
    for key, want in (("model_type", cfg.model_type), ("strategy", cfg.train.strategy)):
        if saved.get(key, want) != want:
            raise ConfigError(f"train.resume_from: {path} holds a {key}={saved[key]!r} checkpoint, this config has {want!r}")
    now = dataclasses.asdict(cfg.model)
    # A field the checkpoint's config lacks did not exist when it was written: the model it holds
    # behaved as that field's default (a new capability ships switched off).
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cfg.model)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    then = {k: saved["model_config"].get(k, defaults.get(k)) for k in now}
    diff = sorted(k for k in now if k != "flavour" and then[k] != now[k])
    if diff:
        raise ConfigError(f"train.resume_from: {path} was trained with a different model: model.{diff[0]} is "
                          f"{then[diff[0]]!r} there and {now[diff[0]]!r} here (differs: {diff}); "
                          f"resume with the same model config and dataset, or start a new run")


class TrainingDiverged(FloatingPointError):
    """The gradient norm became NaN or infinite; restarting from a checkpoint would diverge again."""


def train(cfg: JobConfig, *, fresh: bool = False, callbacks: list[Any] | None = None,
          tensorboard_dir: str | Path | None = None) -> dict[str, Any]:
    """Build (or reuse) the dataset, run distributed training, return a summary dict.

    `callbacks` are Ray Train `UserCallback`s (a Tune trial forwards reports with one);
    `tensorboard_dir` defaults to <run dir>/tensorboard.
    """
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output_dir=str(Path(cfg.data.output_dir).resolve())))
    validate(cfg)
    run_dir = cfg.run_dir
    ensure_ray(cfg)
    cfg, train_ds, val_ds, manifest, loop_data = prepare_data(cfg)

    train_ds, val_ds = _hold_in_memory(cfg, train_ds, val_ds, manifest)

    resume = None
    if cfg.train.resume_from:
        resume = latest_checkpoint(cfg.train.resume_from, announce=True)
        if resume is None:
            raise ConfigError(f"train.resume_from={cfg.train.resume_from!r} holds no complete checkpoint")
        saved = read_checkpoint_state(resume)
        _check_resumable(saved, cfg, resume)
        done = saved["step"]
        if done >= cfg.train.max_steps:
            raise ConfigError(f"train.resume_from: {resume} is already at step {done} >= train.max_steps="
                              f"{cfg.train.max_steps}; raise train.max_steps to train further")
        print(f"[train] resuming from {resume} (step {done})", flush=True)
    storage = checkpoints_root(run_dir)
    if fresh:  # old checkpoints would be restored, old curves would overlay the new ones
        for old in (storage, run_dir / "tensorboard"):
            shutil.rmtree(old, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.to_dict(),
            "tensorboard_dir": str(Path(tensorboard_dir).resolve() if tensorboard_dir else run_dir / "tensorboard"),
            **loop_data,
            # Train V2 has no resume_from_checkpoint: the loop loads this when Train itself
            # holds no checkpoint of this run yet (a restart after a failure takes the run's own).
            "resume_from": str(resume) if resume else None,
        },
        scaling_config=scaling_config(t),
        datasets={"train": train_ds, "val": val_ds},
        # Unsplit: each rank reads the same global batches and keeps its slice (see loop.py).
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep, checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[AnnounceCheckpoints(), *(callbacks or [])],
        ),
    )
    result = trainer.fit()
    remove_incomplete_checkpoints(run_dir)
    if result.error:
        raise result.error
    out = dict(result.return_value or {})
    if out.get("diverged_at_step") is not None:
        raise TrainingDiverged(f"training diverged: non-finite gradient norm at step {out['diverged_at_step']}; "
                               f"lower train.lr or raise train.warmup_steps")
    out.update({
        "strategy": t.strategy, "workers": t.num_workers, **get_family(cfg.model_type).run_summary(cfg),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "run_dir": str(run_dir), "model_config": dataclasses.asdict(cfg.model), "manifest": manifest,
    })
    return out
