"""Hyperparameter sweeps: Ray Tune over real Ray Train runs.

A sweep YAML (jobs/configs/tune_*.yaml) names a base job config, a search space over its dotted
keys, the metric, the trial budget and the resources of one trial (loaded and checked by
`neuraflex_ray/sweep_config.py`):

    neuraflex-ray tune --config jobs/configs/tune_moe_debug.yaml            # --resume, --fresh

Search is Optuna (TPE, seeded; or its random sampler) through `OptunaSearch`, with the study kept in
Optuna's own storage so `neuraflex-ray dashboard` shows it (dashboard.py); the scheduler is ASHA on the
validation metric (or PBT, or none). Each trial is one `train()` call: a Ray Train `TorchTrainer`
started from inside the Tune trial (Train V2's Train-inside-Tune pattern), whose every evaluation is
forwarded to Tune. Everything a sweep writes lives under <output_dir>/<name>:

    tune/          Tune's experiment state and its copy of every reported checkpoint (what --resume
                   and PBT restart from)
    trials/<id>/   each trial's Train runs and checkpoints
    tensorboard/   one run per trial (train/val curves, then the trial's hparams)
    optuna.db      the Optuna study, unless search.storage names another database
    results.csv, results.parquet, best.yaml, summary.json
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback

from neuraflex_ray.config import ConfigError, config_from_raw, set_dotted
from neuraflex_ray.sweep_config import ParamSpec, Sweep, load_sweep  # noqa: F401 - load_sweep: the entry point

# Sweeps started before Tune held copies reported a pointer file to the Train checkpoint instead;
# `--resume` of such a sweep still follows it.
POINTER = "train_checkpoint.json"
TRIAL_CPU = 0.01  # the Tune trial actor itself: it only drives a Train run


# --------------------------------------------------------------------------------------------
# One trial: a Train run inside a Tune trial
# --------------------------------------------------------------------------------------------
#
# Where a restart reads from. A trial restarts from a checkpoint after --resume, after PBT paused it,
# and after PBT told it to continue from another trial's (the donor's) checkpoint. The donor keeps
# training meanwhile, and its Train run keeps only `train.num_to_keep` checkpoints: a path into the
# donor's Train run can be deleted between the exploit and the moment the restarted trial's workers
# open it (that race lost trials at random). So every checkpoint a trial reports to Tune is Tune's own
# copy, under <sweep>/tune/<trial>/checkpoint_*, and restarts read only that copy:
#   - Tune copies the Train checkpoint while Train's retention is held back: the Train controller's
#     report callback (below) waits until Tune has persisted the checkpoint, and Train deletes old
#     checkpoints only when it registers the next one, in the same controller, after that callback.
#   - Tune deletes its copies only by its own CheckpointConfig (`_tuner`): PBT keeps them all, since
#     the donor's copy it hands out may be several reports old; the other schedulers keep the latest,
#     the only one a trial's own restart reads.
# The price is one more copy of each reported checkpoint (Tune's), not a pointer file.


class RestoreError(RuntimeError):
    """A trial could not continue from the checkpoint Tune handed it; one line names donor, path, cause."""


def error_line(err: BaseException) -> str:
    """One line for a table: the innermost cause's type and the last line of its message."""
    cause = getattr(err, "cause", None) or err
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


@dataclasses.dataclass
class RestorePoint:
    """The checkpoint a trial's start continues from, and whose it is."""

    path: str  # a Train checkpoint directory (Tune's copy of it)
    donor: str  # the trial that reported it (this trial's own id unless PBT exploited another)
    step: int

    def describe(self, trial_id: str) -> str:
        whose = "its own checkpoint" if self.donor == trial_id else f"trial {self.donor}'s checkpoint"
        return f"trial {trial_id} continuing from {whose} {self.path} (step {self.step})"


def restore_point(trial_id: str, checkpoint: Any) -> RestorePoint:
    """Where Tune's checkpoint `checkpoint` (`tune.get_checkpoint()`) restarts trial `trial_id` from.

    Tune's copies live in <sweep>/tune/<donor trial>/checkpoint_*, so the donor is the parent folder.
    Raises RestoreError, one line naming the donor, the path and the cause, when it cannot be read.
    """
    from neuraflex_ray.checkpoint import read_checkpoint_state

    path = Path(checkpoint.path)
    point = RestorePoint(path=str(path), donor=path.parent.name, step=-1)
    try:
        if (path / POINTER).is_file():  # a sweep started by older code: the Train checkpoint it named
            point.path = json.loads((path / POINTER).read_text())["path"]
        point.step = int(read_checkpoint_state(point.path)["step"])
    except Exception as e:  # noqa: BLE001 - every cause is reported, in one line, as the trial's error
        raise RestoreError(f"{point.describe(trial_id)}: {error_line(e)}") from e
    return point


def _forward_reports_callback(reports: Any, persisted: Any) -> Any:
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        """Runs in the Train controller: hands rank 0's report, and its checkpoint, to the trial.

        Ray's TuneReportCallback forwards metrics only. Forwarding the checkpoint as well gives Tune a
        copy per report, which is what --resume and PBT restore from. With a checkpoint, this waits
        until the trial says Tune has persisted its copy: Train's retention deletes old checkpoints when
        the controller registers the next report, which cannot happen while this callback runs.
        """

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            reports.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint.path if checkpoint else None})
            if checkpoint is not None:
                persisted.get()

    return ForwardReports()


def _lineage(trial_dir: Path, start: int, point: RestorePoint, params: dict[str, Any]) -> None:
    """Where each start came from: under PBT a trial continues from another trial's checkpoint, and this
    file is the trial's lineage (which checkpoint, whose, at which step, with which new params)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "lineage.jsonl", "a") as f:
        f.write(json.dumps({"start": start, "restored_from": point.path, "donor": point.donor, "step": point.step,
                            "params": params}) + "\n")


def run_trial(params: dict[str, Any], sweep: Sweep) -> None:
    """Tune's trainable: build this trial's config, train it, forward each evaluation to Tune."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from neuraflex_ray.train.driver import train

    trial_id = tune.get_context().get_trial_id()
    trial_dir = sweep.dir / "trials" / trial_id
    # Each start of a trial (first, after --resume, after a PBT exploit) is its own Train run, so Train
    # never restores a stale run of its own over the checkpoint Tune hands us.
    start = len(list(trial_dir.glob("start-*"))) if trial_dir.is_dir() else 0
    raw = sweep.trial_raw(params)
    raw = {**raw, "name": f"start-{start}", "output_dir": str(trial_dir)}
    point = None
    if tune.get_checkpoint() is not None:
        point = restore_point(trial_id, tune.get_checkpoint())
        _lineage(trial_dir, start, point, params)
        if point.step >= sweep.base.train.max_steps:
            # PBT may perturb at the final report and restart the trial from a finished checkpoint:
            # there is nothing left to train, and the trial's last report stands.
            print(f"[tune] trial {trial_id}: {point.path} is already at train.max_steps; nothing to train", flush=True)
            return
        raw = set_dotted(raw, "train.resume_from", point.path)
    cfg = config_from_raw(raw)
    if cfg.finetune.from_export:  # a fine-tuning sweep: the model is the export's (finetune/setup.py)
        from neuraflex_ray.finetune.setup import finetune_config

        cfg = finetune_config(cfg)

    # Lockstep: one report in flight, so Tune stops a trial promptly; `persisted` answers each checkpoint.
    reports: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
    persisted: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["out"] = train(cfg, callbacks=[_forward_reports_callback(reports, persisted)],
                                   tensorboard_dir=sweep.dir / "tensorboard" / trial_id)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"train-{trial_id}", daemon=True)
    worker.start()
    reported = 0
    while worker.is_alive() or not reports.empty():
        try:
            item = reports.get(timeout=1.0)
        except Empty:
            continue
        if item["checkpoint"] is None:
            tune.report(item["metrics"])
        else:  # Tune copies the directory into its own storage before report returns
            tune.report(item["metrics"], checkpoint=tune.Checkpoint.from_directory(item["checkpoint"]))
            persisted.put(True)
        reported += 1
    if "error" in outcome:
        if point is not None and reported == 0:  # the table names where this start came from
            raise RestoreError(f"{point.describe(trial_id)} failed before its first report: "
                               f"{error_line(outcome['error'])}") from outcome["error"]
        raise outcome["error"]


# --------------------------------------------------------------------------------------------
# Search, scheduler, Tuner
# --------------------------------------------------------------------------------------------


def _optuna_distributions(space: dict[str, ParamSpec]) -> dict[str, Any]:
    from optuna import distributions as d

    out: dict[str, Any] = {}
    for key, s in space.items():
        if s.type == "uniform":
            out[key] = d.FloatDistribution(s.low, s.high)
        elif s.type == "loguniform":
            out[key] = d.FloatDistribution(s.low, s.high, log=True)
        elif s.type == "int":
            out[key] = d.IntDistribution(int(s.low), int(s.high), log=s.log)
        else:
            out[key] = d.CategoricalDistribution(s.values)
    return out


def _tune_domains(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The same space as Tune domains: what PBT samples its mutations from."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, s in space.items():
        if s.type == "uniform":
            out[key] = tune.uniform(s.low, s.high)
        elif s.type == "loguniform":
            out[key] = tune.loguniform(s.low, s.high)
        elif s.type == "int":
            out[key] = (tune.lograndint if s.log else tune.randint)(int(s.low), int(s.high) + 1)
        else:
            out[key] = tune.choice(s.values)
    return out


def _search(sweep: Sweep) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    max_steps = sweep.base.train.max_steps

    class Search(OptunaSearch):
        """Upstream records a trial COMPLETE once it reported anything. Here an errored trial is FAIL
        and a trial the scheduler stopped before max_steps is PRUNED, as the Optuna dashboard expects."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            stopped = result is not None and result.get("step", max_steps) < max_steps
            super().on_trial_complete(trial_id, None if error or stopped else result, error)

    c = sweep.cfg
    sampler = (optuna.samplers.TPESampler(seed=c.seed, n_startup_trials=c.search.n_startup_trials)
               if c.search.algorithm == "optuna" else optuna.samplers.RandomSampler(seed=c.seed))
    storage = optuna.storages.RDBStorage(sweep.storage_url)
    return Search(space=_optuna_distributions(c.space), metric=c.metric, mode=c.mode, sampler=sampler,
                  study_name=c.name, storage=storage, points_to_evaluate=c.search.points_to_evaluate or None)


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s, t = sweep.cfg.scheduler, sweep.base.train
    if s.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=t.max_steps, grace_period=s.grace_period or t.eval_every,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval or t.checkpoint_every,
                                       hyperparam_mutations=_tune_domains(sweep.cfg.space),
                                       quantile_fraction=s.quantile_fraction, synch=False)
    return FIFOScheduler()


def _max_concurrent(sweep: Sweep) -> int:
    """Train's worker placement groups sit outside Tune's accounting: bound the trials that run at once."""
    if sweep.cfg.max_concurrent_trials:
        return sweep.cfg.max_concurrent_trials
    t = sweep.base.train
    total = ray.cluster_resources()
    if t.use_gpu:
        return max(1, int(total.get("GPU", 0) // t.num_workers))
    # One whole CPU stays free for Ray Data's reads beside the trials (workers + trial actor).
    return max(1, int((total.get("CPU", 1) - 1) // (t.num_workers * t.cpus_per_worker + TRIAL_CPU)))


class _ReleaseEndedTrialGroups(Callback):
    """A Tune callback in the driver: when a trial ends, make sure its Train run's placement group goes.

    Stopping a trial (ASHA, PBT's pause, the end of the sweep) terminates the trial actor, and with it
    the Train controller it owns. Train's own cleaner is meant to remove the controller's placement
    group then, but on a busy 2-core machine one stayed reserved and the next trial could never place
    its workers (benchmarks/RESULTS.md, the router sweep). Every evaluation a worker reports names its
    group; a group still alive `grace_s` after its trial ended is removed here.
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.groups: dict[str, set[str]] = {}

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        if result.get("placement_group"):
            self.groups.setdefault(trial.trial_id, set()).add(result["placement_group"])

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)  # a trial restarted after a pause: groups seen so far belong to its old run

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)

    def _release(self, trial: Any) -> None:
        groups = self.groups.pop(trial.trial_id, set())
        if groups:  # off Tune's event loop: the grace period must not hold up the next trial's start
            threading.Thread(target=self._release_now, args=(groups, trial.trial_id), daemon=True).start()

    def _release_now(self, groups: set[str], trial_id: str) -> None:
        if release_groups(groups, self.grace_s):
            print(f"[tune] trial {trial_id}: released the placement group its Train run left reserved", flush=True)


def release_groups(groups: set[str], grace_s: float) -> list[str]:
    """Remove those of `groups` (hex ids) that are still alive after `grace_s`; return the ones removed."""
    import time

    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    def alive() -> list[str]:
        table = placement_group_table()
        return [g for g in groups if table.get(g, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED")]

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive()
    for g in left:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(g))))
    return left


def _trainable(sweep: Sweep) -> Any:
    from ray import tune

    # The trial itself only waits on its Train run, whose workers hold the CPUs/GPUs; Tune refuses an
    # empty request, so it asks for a sliver of a CPU.
    return tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": TRIAL_CPU})


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _tuner(sweep: Sweep, resume: bool) -> Any:
    from ray import tune

    path = sweep.dir / "tune"
    if resume:
        # Finished trials stay finished; interrupted ones continue from their last checkpoint.
        return tune.Tuner.restore(str(path), trainable=_trainable(sweep), resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    c = sweep.cfg
    if c.scheduler.type == "pbt":  # PBT mutates configs itself and accepts only Tune's own sampler
        search, space = BasicVariantGenerator(random_state=c.seed), _tune_domains(c.space)
    else:
        search, space = _search(sweep), {}
    return tune.Tuner(
        _trainable(sweep),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=c.metric, mode=c.mode, num_samples=c.num_trials, max_concurrent_trials=_max_concurrent(sweep),
            search_alg=search, scheduler=_scheduler(sweep), trial_name_creator=_trial_dirname,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sweep.dir),
            # A failed trial is recorded and the sweep goes on; Train already restarts failed workers.
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[_ReleaseEndedTrialGroups()],
            # Tune's copies are what restarts read (see "Where a restart reads from" above): PBT may
            # hand out a donor's copy several reports old, so it keeps them all; a trial's own
            # restart reads only its latest.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if c.scheduler.type == "pbt" else 1)),
    )


def _prepare(sweep: Sweep, resume: bool, fresh: bool) -> None:
    import optuna

    state = sweep.dir / "tune"
    if fresh:
        shutil.rmtree(sweep.dir, ignore_errors=True)
        if sweep.cfg.search.storage and sweep.storage_url:  # the study lives outside the sweep directory
            try:
                optuna.delete_study(study_name=sweep.cfg.name, storage=sweep.storage_url)
            except KeyError:
                pass
    elif resume:
        from ray import tune

        if not tune.Tuner.can_restore(str(state)):
            raise ConfigError(f"--resume: no sweep state in {state}; start the sweep without --resume")
    elif state.exists():
        raise ConfigError(f"sweep {sweep.cfg.name!r} already ran in {sweep.dir}: pass --resume to continue it or "
                          f"--fresh to start over (or change name)")
    sweep.dir.mkdir(parents=True, exist_ok=True)


def run_sweep(sweep: Sweep, *, resume: bool = False, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) a sweep to the end; write the results table, best.yaml and summary.json."""
    from neuraflex_ray.train.driver import ensure_ray, prepare_data

    _prepare(sweep, resume, fresh)
    t = sweep.base.train
    # A local Ray needs room for every concurrent trial's workers (and its 0.01-CPU trial actor) plus a
    # whole CPU for Ray Data's reads, which run outside the trials' placement groups: with exactly
    # 2 x 1.01 of 3 reserved, the reads waited forever for a free CPU.
    ensure_ray(sweep.base, min_cpus=(sweep.cfg.max_concurrent_trials or 1) * (t.num_workers * t.cpus_per_worker
                                                                               + TRIAL_CPU) + 1)
    base = sweep.base
    if base.finetune.from_export:  # the export's tokenizer, and its Fisher computed once for every trial
        from neuraflex_ray.finetune.setup import finetune_config

        base = finetune_config(base)
    prepare_data(dataclasses.replace(  # build the dataset once here, not in every trial at the same time
        base, data=dataclasses.replace(base.data, output_dir=str(Path(base.data.output_dir).resolve()))))
    c = sweep.cfg
    print(f"[tune] sweep {c.name}: {c.num_trials} trials, {c.search.algorithm} search, {c.scheduler.type} scheduler, "
          f"{c.metric} ({c.mode}); {sweep.dir}", flush=True)
    print(f"[tune] dashboards: neuraflex-ray dashboard {sweep.dir} (TensorBoard: {sweep.dir / 'tensorboard'}" +
          (f", Optuna: {sweep.storage_url})" if sweep.storage_url else ")"), flush=True)
    grid = _tuner(sweep, resume).fit()
    _release_leaked_placement_groups()
    finished = grid.num_terminated + grid.num_errors
    if finished < c.num_trials:  # Ctrl-C / SIGTERM: Tune saved its state and returned early
        print(f"[tune] interrupted with {finished} of {c.num_trials} trials finished; continue with --resume "
              f"(finished trials are kept)", flush=True)
        return {"sweep": c.name, "dir": str(sweep.dir), "interrupted": True, "finished_trials": finished}
    from neuraflex_ray.sweep_results import summarize

    return summarize(sweep, grid)


def _release_leaked_placement_groups(grace_s: float = 15.0) -> None:
    """Remove the worker placement groups this sweep's Train runs left behind.

    Once Tune has returned no trial of ours is running, so whatever this job still holds after a
    grace period for Ray's own clean-up is a leak: a group of a Train run that was still starting when
    its trial stopped, before any report could name it. Placement group ids end with the id of the
    job that created them.
    """
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    ours = {pg for pg in placement_group_table() if pg.endswith(job)}
    leaked = release_groups(ours, grace_s)
    if leaked:
        print(f"[tune] released {len(leaked)} placement group(s) that stopped trials left behind", flush=True)
