"""Hyperparameter sweeps: Ray Tune over real Ray Train runs.

A sweep YAML (jobs/configs/tune_*.yaml) names a base job config, a search space over its dotted
keys, the metric, the trial budget and the resources of one trial:

    neuraflex-ray tune --config jobs/configs/tune_moe_debug.yaml            # --resume, --fresh

Search is Optuna (TPE, seeded; or its random sampler) through `OptunaSearch`, with the study kept in
Optuna's own storage so `optuna-dashboard <storage>` shows it; the scheduler is ASHA on the
validation metric (or PBT, or none). Each trial is one `train()` call: a Ray Train `TorchTrainer`
started from inside the Tune trial (Train V2's Train-inside-Tune pattern), whose every evaluation is
forwarded to Tune. Everything a sweep writes lives under <output_dir>/<name>:

    tune/          Tune's experiment state (what --resume restores)
    trials/<id>/   each trial's Train runs and checkpoints
    tensorboard/   one run per trial (train/val curves, then the trial's hparams)
    optuna.db      the Optuna study, unless search.storage names another database
    results.csv, results.parquet, best.yaml, summary.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from neuraflex_ray.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    build,
    config_from_raw,
    load_raw,
    set_dotted,
)

POINTER = "train_checkpoint.json"  # a Tune checkpoint is a pointer to the Train checkpoint, not a copy
TRIAL_CPU = 0.01  # the Tune trial actor itself: it only drives a Train run


@dataclass
class ParamSpec:
    """One searched key: uniform / loguniform floats in [low, high], ints in [low, high], or a choice."""

    type: str = ""  # uniform | loguniform | int | choice
    low: float = math.nan
    high: float = math.nan
    log: bool = False  # int: sample on a log scale
    values: list[Any] = field(default_factory=list)  # choice


@dataclass
class SearchConfig:
    algorithm: str = "optuna"  # optuna (TPE) | random (Optuna's random sampler: same storage, no model)
    n_startup_trials: int = 4  # TPE: random trials before its model takes over
    storage: str = ""  # Optuna storage URL (any RDB URL); empty: sqlite:///<sweep dir>/optuna.db
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)  # first trials, {key: value}


@dataclass
class SchedulerConfig:
    type: str = "asha"  # asha (stops trials early) | pbt (population based training) | fifo (none)
    grace_period: int = 0  # asha: steps every trial runs before it can be stopped (0: train.eval_every)
    reduction_factor: float = 2.0  # asha: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 0  # pbt: steps between exploit/explore (0: train.checkpoint_every)
    quantile_fraction: float = 0.25  # pbt: bottom share that clones the top share


@dataclass
class SweepConfig:
    name: str = "sweep"
    output_dir: str = "runs/sweeps"  # sweep directory = output_dir/name
    base: str = ""  # the base job YAML, relative to this file (or absolute)
    # Merged into the base for every trial, e.g. {train: {max_steps: 100}}.
    overrides: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)  # per trial: num_workers, cpus_per_worker, use_gpu
    space: dict[str, ParamSpec] = field(default_factory=dict)  # dotted config key -> range
    metric: str = "val_loss"
    mode: str = "min"
    num_trials: int = 8
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold
    seed: int = 0
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class Sweep:
    """A loaded, checked sweep: its config, the base job as a raw dict and as a JobConfig."""

    cfg: SweepConfig
    base_raw: dict[str, Any]
    base: JobConfig
    dir: Path

    @property
    def storage_url(self) -> str | None:
        """Where the Optuna study lives (None under PBT, which samples with Tune's own generator)."""
        if self.cfg.scheduler.type == "pbt":
            return None
        return self.cfg.search.storage or f"sqlite:///{self.dir / 'optuna.db'}"

    def trial_raw(self, params: dict[str, Any]) -> dict[str, Any]:
        raw = self.base_raw
        for key, value in params.items():
            raw = set_dotted(raw, key, value)
        return raw


# Keys a trial may not change: where results go, what the dataset is (built once per sweep), and the
# trial's resources (the `resources` section sets those for every trial alike).
FIXED_KEYS = ("name", "output_dir", "model_type", "train.resume_from", "train.num_workers", "train.cpus_per_worker",
              "train.use_gpu")
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "use_gpu")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Load a sweep YAML (plus dotted overrides of its own keys) and check everything before any trial."""
    path = Path(path)
    raw = apply_overrides(load_raw(path), overrides or [])
    cfg: SweepConfig = build(SweepConfig, raw, "")
    if not cfg.base:
        raise ConfigError("base: empty; name the job YAML every trial starts from, e.g. base: moe_debug.yaml")
    base_path = Path(cfg.base) if Path(cfg.base).is_absolute() else path.resolve().parent / cfg.base
    bad = sorted(set(cfg.resources) - set(RESOURCE_KEYS))
    if bad:
        raise ConfigError(f"resources.{bad[0]}: unknown; a trial's resources are {list(RESOURCE_KEYS)}")
    base_raw = _deep_merge(load_raw(base_path, "base"), cfg.overrides)
    base_raw = _deep_merge(base_raw, {"train": dict(cfg.resources)})
    try:
        base = config_from_raw(base_raw)
    except ConfigError as e:
        raise ConfigError(f"base {base_path} with overrides/resources: {e}") from None
    base_raw = _absolute_paths(base_raw, base)
    sweep = Sweep(cfg, base_raw, config_from_raw(base_raw), (Path(cfg.output_dir) / cfg.name).resolve())
    check_sweep(sweep)
    return sweep


def _absolute_paths(raw: dict[str, Any], cfg: JobConfig) -> dict[str, Any]:
    """Input and dataset paths made absolute here: Tune trials run with another working directory."""
    from pipelines.text_sources import TEXT_SAMPLES  # named samples are not paths

    def resolve(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    d = cfg.data
    data = {**raw.get("data", {}), "output_dir": resolve(d.output_dir)}
    if getattr(d, "source", "stdlib") not in ("stdlib", "", *TEXT_SAMPLES) and "://" not in d.source:
        data["source"] = resolve(d.source)
    for key in ("tokenizer", "cache_dir"):
        if getattr(d, key, ""):
            data[key] = resolve(getattr(d, key))
    if getattr(d, "recordings", None):
        data["recordings"] = [{**dataclasses.asdict(r), "path": resolve(r.path),
                               "align_to": resolve(r.align_to) if r.align_to else ""} for r in d.recordings]
    return {**raw, "data": data}


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _corners(key: str, spec: ParamSpec) -> list[Any]:
    """Check the range itself; return the values that bound it (each must make a valid config)."""
    where = f"space.{key}"
    if spec.type in ("uniform", "loguniform", "int"):
        _need(math.isfinite(spec.low) and math.isfinite(spec.high),
              f"{where}: type {spec.type} needs numbers low and high, e.g. {{type: {spec.type}, low: 1, high: 10}}")
        _need(spec.low < spec.high, f"{where}: empty range, low={spec.low:g} must be below high={spec.high:g}")
        _need(not spec.values, f"{where}: values belong to type choice; a {spec.type} range takes low and high")
        if spec.type == "loguniform":
            _need(spec.low > 0, f"{where}: loguniform needs low > 0 (got {spec.low:g}); use uniform for ranges through 0")
        if spec.type == "int":
            _need(spec.low == int(spec.low) and spec.high == int(spec.high),
                  f"{where}: type int needs whole low and high (got {spec.low:g}, {spec.high:g})")
            _need(not spec.log or spec.low >= 1, f"{where}: an int range with log: true needs low >= 1")
            return [int(spec.low), int(spec.high)]
        return [spec.low, spec.high]
    if spec.type == "choice":
        _need(bool(spec.values), f"{where}: choice with no values; list them, e.g. values: [1, 2]")
        _need(math.isnan(spec.low) and math.isnan(spec.high), f"{where}: a choice takes values, not low/high")
        return list(spec.values)
    raise ConfigError(f"{where}: type {spec.type!r} is not known; use uniform, loguniform, int or choice")


def _check_value(sweep: Sweep, key: str, value: Any, where: str) -> None:
    try:
        config_from_raw(set_dotted(sweep.base_raw, key, value))
    except ConfigError as e:
        raise ConfigError(f"{where}: {key}={value!r} does not make a valid training config: {e}") from None


def check_sweep(sweep: Sweep) -> None:
    """Every problem a sweep can have before it starts, each naming the key (ConfigError)."""
    from neuraflex_ray.train.tasks import reported_metrics

    cfg, t = sweep.cfg, sweep.base.train
    _need(bool(cfg.space), "space: empty; name at least one dotted config key to search, e.g. train.lr")
    for key, spec in cfg.space.items():
        _need(key not in FIXED_KEYS, f"space.{key}: a trial cannot change {key}" + (
            "; set the resources of every trial in the resources section"
            if key.removeprefix("train.") in RESOURCE_KEYS else ""))
        # Augmentations act on batches in training, not on the dataset: they may be searched.
        _need(not key.startswith("data.") or key.startswith("data.augment."),
              f"space.{key}: the dataset is built once per sweep, so data.* keys (other than data.augment.*) "
              f"cannot be searched; run one sweep per dataset setting")
        for value in _corners(key, spec):
            _check_value(sweep, key, value, f"space.{key}")
    metrics = reported_metrics(sweep.base.model_type)
    _need(cfg.metric in metrics, f"metric: {cfg.metric!r} is not reported by {sweep.base.model_type} training; "
                                 f"choose one of {metrics}")
    _need(cfg.mode in ("min", "max"), f"mode: {cfg.mode!r}; use min or max")
    _need(cfg.num_trials >= 1, f"num_trials must be >= 1 (got {cfg.num_trials})")
    _need(cfg.max_concurrent_trials >= 0, f"max_concurrent_trials must be >= 0 (0: fit the cluster), got "
                                          f"{cfg.max_concurrent_trials}")
    _need(cfg.search.algorithm in ("optuna", "random"), f"search.algorithm: {cfg.search.algorithm!r}; use optuna or random")
    _need(cfg.search.n_startup_trials >= 1, f"search.n_startup_trials must be >= 1 (got {cfg.search.n_startup_trials})")
    for i, point in enumerate(cfg.search.points_to_evaluate):
        unknown = sorted(set(point) - set(cfg.space))
        _need(not unknown, f"search.points_to_evaluate[{i}].{unknown[0] if unknown else ''}: not a key of space; "
                           f"a point sets searched keys only: {sorted(cfg.space)}")
        missing = sorted(set(cfg.space) - set(point))
        _need(not missing, f"search.points_to_evaluate[{i}]: no value for {missing[0] if missing else ''}; "
                           f"Optuna needs every searched key in a point: add {missing}")
        for key, value in point.items():
            _check_value(sweep, key, value, f"search.points_to_evaluate[{i}]")
    # Schedulers decide on reported evaluations; every report must carry a fresh one.
    _need(t.checkpoint_every % t.eval_every == 0,
          f"train.checkpoint_every={t.checkpoint_every} is not a multiple of train.eval_every={t.eval_every}: in a "
          f"sweep every checkpoint must come with an evaluation; make it a multiple")
    s = cfg.scheduler
    _need(s.type in ("asha", "pbt", "fifo"), f"scheduler.type: {s.type!r}; use asha, pbt or fifo")
    if s.type == "asha":
        _need(s.reduction_factor > 1, f"scheduler.reduction_factor must be > 1 (got {s.reduction_factor})")
        _need(0 <= s.grace_period < t.max_steps, f"scheduler.grace_period={s.grace_period} must be in [0, "
                                                 f"train.max_steps={t.max_steps}) (0: train.eval_every)")
    if s.type == "pbt":
        interval = s.perturbation_interval or t.checkpoint_every
        _need(interval % t.checkpoint_every == 0,
              f"scheduler.perturbation_interval={interval} is not a multiple of train.checkpoint_every="
              f"{t.checkpoint_every}: PBT clones checkpoints, so it can only act where one was written")
        _need(0 < s.quantile_fraction <= 0.5, f"scheduler.quantile_fraction must be in (0, 0.5] (got {s.quantile_fraction})")
        _need(cfg.search.algorithm == "random",
              "search.algorithm: Ray Tune refuses a search algorithm beside PBT; with scheduler.type=pbt set "
              "search.algorithm=random (the initial population is sampled at random, and is not an Optuna study)")
        structural = [k for k in cfg.space if not k.startswith("train.")]
        _need(not structural, f"space.{structural[0] if structural else ''}: PBT continues a trial from another "
                              f"trial's checkpoint, so it can only mutate train.* keys (the model must stay the same)")


# --------------------------------------------------------------------------------------------
# One trial: a Train run inside a Tune trial
# --------------------------------------------------------------------------------------------


def _forward_reports_callback(q: Any) -> Any:
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        """Runs in the Train controller: hands rank 0's report, and its checkpoint's path, to the trial.

        Ray's TuneReportCallback forwards metrics only. Forwarding the path as well gives Tune a
        checkpoint per trial (a pointer file, not a copy), which is what --resume and PBT restore from.
        """

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            q.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint.path if checkpoint else None})

    return ForwardReports()


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
    resume = tune.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            target = json.loads((Path(d) / POINTER).read_text())["path"]
        if not Path(target).is_dir():
            raise FileNotFoundError(f"Tune restored trial {trial_id} from Train checkpoint {target}, which its run has "
                                    f"since deleted; raise train.num_to_keep in the sweep's overrides")
        from neuraflex_ray.checkpoint import read_checkpoint_state

        step = read_checkpoint_state(Path(target))["step"]
        # Where each start came from: under PBT a trial continues from another trial's checkpoint, and
        # this file is the trial's lineage (which checkpoint, at which step, with which new params).
        trial_dir.mkdir(parents=True, exist_ok=True)
        with open(trial_dir / "lineage.jsonl", "a") as f:
            f.write(json.dumps({"start": start, "restored_from": target, "step": step, "params": params}) + "\n")
        if step >= sweep.base.train.max_steps:
            # PBT may perturb at the final report and restart the trial from a finished checkpoint:
            # there is nothing left to train, and the trial's last report stands.
            print(f"[tune] trial {trial_id}: {target} is already at train.max_steps; nothing to train", flush=True)
            return
        raw = set_dotted(raw, "train.resume_from", target)
    cfg = config_from_raw(raw)

    reports: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})  # lockstep: Tune stops a trial promptly
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["out"] = train(cfg, callbacks=[_forward_reports_callback(reports)],
                                   tensorboard_dir=sweep.dir / "tensorboard" / trial_id)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"train-{trial_id}", daemon=True)
    worker.start()
    while worker.is_alive() or not reports.empty():
        try:
            item = reports.get(timeout=1.0)
        except Empty:
            continue
        if item["checkpoint"] is None:
            tune.report(item["metrics"])
            continue
        with tempfile.TemporaryDirectory(prefix="nfr-pointer-") as tmp:
            (Path(tmp) / POINTER).write_text(json.dumps({"path": item["checkpoint"]}))
            tune.report(item["metrics"], checkpoint=tune.Checkpoint.from_directory(tmp))
    if "error" in outcome:
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
            # Tune's checkpoints are pointer files: keep them all, since PBT may clone an older one.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
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
    prepare_data(dataclasses.replace(  # build the dataset once here, not in every trial at the same time
        sweep.base, data=dataclasses.replace(sweep.base.data, output_dir=str(Path(sweep.base.data.output_dir).resolve()))))
    c = sweep.cfg
    print(f"[tune] sweep {c.name}: {c.num_trials} trials, {c.search.algorithm} search, {c.scheduler.type} scheduler, "
          f"{c.metric} ({c.mode}); {sweep.dir}", flush=True)
    print(f"[tune] TensorBoard: tensorboard --logdir {sweep.dir / 'tensorboard'}" +
          (f" | Optuna: optuna-dashboard {sweep.storage_url}" if sweep.storage_url else ""), flush=True)
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

    When Tune stops trials because the sweep was interrupted, the placement group of a Train run
    that was starting can outlive its controller and keep its CPUs/GPUs reserved on the cluster
    (seen on Ray 2.60). Once Tune has returned no trial of ours is running, so whatever this job
    still holds after a grace period for Ray's own clean-up is a leak. Placement group ids end
    with the id of the job that created them.
    """
    import time

    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    job = ray.get_runtime_context().get_job_id()

    def ours() -> list[str]:
        return [pg for pg, info in placement_group_table().items()
                if pg.endswith(job) and info["state"] in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED")]

    deadline = time.monotonic() + grace_s
    while ours() and time.monotonic() < deadline:
        time.sleep(1.0)
    leaked = ours()
    for pg in leaked:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
    if leaked:
        print(f"[tune] released {len(leaked)} placement group(s) that stopped trials left behind", flush=True)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
