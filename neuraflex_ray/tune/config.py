"""What a sweep YAML says, loaded and checked before any trial starts.

A sweep (jobs/configs/tune_*.yaml) names a base job config, a search space over its dotted keys, the
metric, the trial budget and each trial's resources. `load_sweep` merges the base with the sweep's
overrides and resources and `check_sweep` refuses, naming the key, every problem it can see up front:
an empty or inverted range, a corner of the space that makes an invalid training config, a searched
key a trial may not change, a metric training does not report. `run.py` runs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuraflex_ray.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    build,
    config_from_raw,
    load_raw,
    set_dotted,
)
from neuraflex_ray.config.validate import need


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
    algorithm: str = "optuna"  # optuna (TPE) | random (Optuna's random sampler) | grid (every choice combination)
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
              "train.use_gpu", "finetune.from_export")
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
    for key in ("tokenizer", "cache_dir", "activations"):  # activations: the SAE's input directory
        if getattr(d, key, ""):
            data[key] = resolve(getattr(d, key))
    if getattr(d, "entropy_model", "") not in ("", "train"):  # the BLT's: an export path, or a stage
        data["entropy_model"] = resolve(d.entropy_model)
    if getattr(d, "recordings", None):
        data["recordings"] = [{**dataclasses.asdict(r), "path": resolve(r.path),
                               "align_to": resolve(r.align_to) if r.align_to else ""} for r in d.recordings]
    out = {**raw, "data": data}
    if cfg.finetune.from_export:
        out["finetune"] = {**raw.get("finetune", {}), "from_export": resolve(cfg.finetune.from_export)}
    return out


def _corners(key: str, spec: ParamSpec) -> list[Any]:
    """Check the range itself; return the values that bound it (each must make a valid config)."""
    where = f"space.{key}"
    if spec.type in ("uniform", "loguniform", "int"):
        need(math.isfinite(spec.low) and math.isfinite(spec.high),
              f"{where}: type {spec.type} needs numbers low and high, e.g. {{type: {spec.type}, low: 1, high: 10}}")
        need(spec.low < spec.high, f"{where}: empty range, low={spec.low:g} must be below high={spec.high:g}")
        need(not spec.values, f"{where}: values belong to type choice; a {spec.type} range takes low and high")
        if spec.type == "loguniform":
            need(spec.low > 0, f"{where}: loguniform needs low > 0 (got {spec.low:g}); use uniform for ranges through 0")
        if spec.type == "int":
            need(spec.low == int(spec.low) and spec.high == int(spec.high),
                  f"{where}: type int needs whole low and high (got {spec.low:g}, {spec.high:g})")
            need(not spec.log or spec.low >= 1, f"{where}: an int range with log: true needs low >= 1")
            return [int(spec.low), int(spec.high)]
        return [spec.low, spec.high]
    if spec.type == "choice":
        need(bool(spec.values), f"{where}: choice with no values; list them, e.g. values: [1, 2]")
        need(math.isnan(spec.low) and math.isnan(spec.high), f"{where}: a choice takes values, not low/high")
        return list(spec.values)
    raise ConfigError(f"{where}: type {spec.type!r} is not known; use uniform, loguniform, int or choice")


def _check_value(sweep: Sweep, key: str, value: Any, where: str) -> None:
    try:
        config_from_raw(set_dotted(sweep.base_raw, key, value))
    except ConfigError as e:
        raise ConfigError(f"{where}: {key}={value!r} does not make a valid training config: {e}") from None


def check_sweep(sweep: Sweep) -> None:
    """Every problem a sweep can have before it starts, each naming the key (ConfigError)."""
    from neuraflex_ray.train.task import reported_metrics

    cfg, t = sweep.cfg, sweep.base.train
    need(bool(cfg.space), "space: empty; name at least one dotted config key to search, e.g. train.lr")
    for key, spec in cfg.space.items():
        need(key not in FIXED_KEYS, f"space.{key}: a trial cannot change {key}" + (
            "; set the resources of every trial in the resources section"
            if key.removeprefix("train.") in RESOURCE_KEYS else ""))
        # Augmentations act on batches in training, not on the dataset: they may be searched.
        need(not key.startswith("data.") or key.startswith("data.augment."),
              f"space.{key}: the dataset is built once per sweep, so data.* keys (other than data.augment.*) "
              f"cannot be searched; run one sweep per dataset setting")
        need(not (key.startswith("model.") and sweep.base.finetune.from_export),
              f"space.{key}: a fine-tuning sweep trains the model of finetune.from_export as it is; search "
              f"finetune.* and train.* keys")
        for value in _corners(key, spec):
            _check_value(sweep, key, value, f"space.{key}")
    metrics = reported_metrics(sweep.base.model_type)
    need(cfg.metric in metrics, f"metric: {cfg.metric!r} is not reported by {sweep.base.model_type} training; "
                                 f"choose one of {metrics}")
    need(cfg.mode in ("min", "max"), f"mode: {cfg.mode!r}; use min or max")
    need(cfg.num_trials >= 1, f"num_trials must be >= 1 (got {cfg.num_trials})")
    need(cfg.max_concurrent_trials >= 0, f"max_concurrent_trials must be >= 0 (0: fit the cluster), got "
                                          f"{cfg.max_concurrent_trials}")
    need(cfg.search.algorithm in ("optuna", "random", "grid"),
         f"search.algorithm: {cfg.search.algorithm!r}; use optuna, random or grid")
    if cfg.search.algorithm == "grid":
        ranged = sorted(k for k, s in cfg.space.items() if s.type != "choice")
        need(not ranged, f"space.{ranged[0] if ranged else ''}: search.algorithm=grid takes choice parameters only")
        points = math.prod(len(s.values) for s in cfg.space.values())
        need(cfg.num_trials == points, f"num_trials={cfg.num_trials}: the grid has {points} points; set num_trials={points}")
    need(cfg.search.n_startup_trials >= 1, f"search.n_startup_trials must be >= 1 (got {cfg.search.n_startup_trials})")
    for i, point in enumerate(cfg.search.points_to_evaluate):
        unknown = sorted(set(point) - set(cfg.space))
        need(not unknown, f"search.points_to_evaluate[{i}].{unknown[0] if unknown else ''}: not a key of space; "
                           f"a point sets searched keys only: {sorted(cfg.space)}")
        missing = sorted(set(cfg.space) - set(point))
        need(not missing, f"search.points_to_evaluate[{i}]: no value for {missing[0] if missing else ''}; "
                           f"Optuna needs every searched key in a point: add {missing}")
        for key, value in point.items():
            _check_value(sweep, key, value, f"search.points_to_evaluate[{i}]")
    # Schedulers decide on reported evaluations; every report must carry a fresh one.
    need(t.checkpoint_every % t.eval_every == 0,
          f"train.checkpoint_every={t.checkpoint_every} is not a multiple of train.eval_every={t.eval_every}: in a "
          f"sweep every checkpoint must come with an evaluation; make it a multiple")
    s = cfg.scheduler
    need(s.type in ("asha", "pbt", "fifo"), f"scheduler.type: {s.type!r}; use asha, pbt or fifo")
    if s.type == "asha":
        need(s.reduction_factor > 1, f"scheduler.reduction_factor must be > 1 (got {s.reduction_factor})")
        need(0 <= s.grace_period < t.max_steps, f"scheduler.grace_period={s.grace_period} must be in [0, "
                                                 f"train.max_steps={t.max_steps}) (0: train.eval_every)")
    if s.type == "pbt":
        interval = s.perturbation_interval or t.checkpoint_every
        need(interval % t.checkpoint_every == 0,
              f"scheduler.perturbation_interval={interval} is not a multiple of train.checkpoint_every="
              f"{t.checkpoint_every}: PBT clones checkpoints, so it can only act where one was written")
        need(0 < s.quantile_fraction <= 0.5, f"scheduler.quantile_fraction must be in (0, 0.5] (got {s.quantile_fraction})")
        need(cfg.search.algorithm == "random",
              "search.algorithm: Ray Tune refuses a search algorithm beside PBT; with scheduler.type=pbt set "
              "search.algorithm=random (the initial population is sampled at random, and is not an Optuna study)")
        structural = [k for k in cfg.space if not k.startswith("train.")]
        need(not structural, f"space.{structural[0] if structural else ''}: PBT continues a trial from another "
                              f"trial's checkpoint, so it can only mutate train.* keys (the model must stay the same)")
