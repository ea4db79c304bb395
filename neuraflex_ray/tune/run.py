"""Running a sweep: the search, the scheduler and the Tuner over trials (`trial.py`), to the results.

A sweep YAML (jobs/configs/tune_*.yaml) names a base job config, a search space over its dotted
keys, the metric, the trial budget and the resources of one trial (loaded and checked by
`config.py`):

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
import math
import shutil
from pathlib import Path
from typing import Any

import ray

from neuraflex_ray.config import ConfigError
from neuraflex_ray.tune.config import Sweep
from neuraflex_ray.tune.placement import (
    ReleaseEndedTrialGroups,
    record_driver_job,
    release_leaked_placement_groups,
)
from neuraflex_ray.tune.space import optuna_distributions, tune_domains
from neuraflex_ray.tune.trial import run_trial

TRIAL_CPU = 0.01  # the Tune trial actor itself: it only drives a Train run
# Optuna trials' user attributes: the Tune trial (trials/<id>) each one is, and the mark of a trial a
# killed driver left running that no Tune trial will end (see Search below).
TUNE_TRIAL_ID, LOST_WITH_DRIVER = "tune_trial_id", "lost_with_driver"

# --------------------------------------------------------------------------------------------
# Search, scheduler, Tuner
# --------------------------------------------------------------------------------------------


def _search(sweep: Sweep) -> Any:
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    max_steps = sweep.base.train.max_steps

    class Search(OptunaSearch):
        """Upstream records a trial COMPLETE once it reported anything. Here an errored trial is FAIL
        and a trial the scheduler stopped before max_steps is PRUNED, as the Optuna dashboard expects.

        A driver killed outright (no Ctrl-C, no SIGTERM: a lost head machine, the OOM killer) leaves the
        study ahead of Tune's saved state, which is at most a few seconds old, and --resume restores
        this searcher from that state:
          - a trial asked of Optuna after the save is RUNNING in the study, yet no restored Tune trial
            will ever end it: it is marked failed (LOST_WITH_DRIVER) and the resumed sweep asks for a
            trial in its place; the sampler, restored with its random state, draws the lost trial's
            point again when seeded (queueing the lost point as well made the sweep run it twice);
          - a trial told after the save is run on by Tune from its last checkpoint: the study keeps
            what the killed driver told, and the trial counts once.
        """

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            # The dashboard then names each Optuna trial's Tune trial (its trials/<id> and tune/<id>).
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
            return config

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            restored = {t.number for t in self._ot_trials.values()}
            storage = self._storage
            study_id = storage.get_study_id_from_name(self._study_name)
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number not in restored:  # asked by a driver that was killed before Tune saved it
                    trial = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                    storage.set_trial_user_attr(trial, LOST_WITH_DRIVER, True)
                    self._ot_study.tell(t.number, state=TrialState.FAIL)
                    print(f"[tune] Optuna trial {t.number} (Tune trial {t.user_attrs.get(TUNE_TRIAL_ID)}) was "
                          f"left running by a driver stopped before Tune saved it: marked failed, another "
                          f"trial takes its place", flush=True)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            try:
                super().on_trial_result(trial_id, result)
            except UpdateFinishedTrialError:  # told by a killed driver after Tune's last save (see above)
                self._completed_trials.add(trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            stopped = result is not None and result.get("step", max_steps) < max_steps
            if result and trial_id in self._ot_trials and trial_id not in self._completed_trials:
                # Every validation metric the family reports (a BLT's measured mean patch size beside
                # its bits per byte), kept as user attributes: the dashboard plots a searched value
                # against what the run measured, pruned trials included.
                try:
                    for key, value in result.items():
                        if (key.startswith("val_") or key == "step") and isinstance(value, int | float) \
                                and math.isfinite(value):
                            self._ot_trials[trial_id].set_user_attr(key, float(value))
                except UpdateFinishedTrialError:  # told by a killed driver after Tune's last save
                    self._completed_trials.add(trial_id)
            super().on_trial_complete(trial_id, None if error or stopped else result, error)

    c = sweep.cfg
    sampler = {"optuna": lambda: optuna.samplers.TPESampler(seed=c.seed, n_startup_trials=c.search.n_startup_trials),
               "random": lambda: optuna.samplers.RandomSampler(seed=c.seed),
               "grid": lambda: optuna.samplers.GridSampler({k: s.values for k, s in c.space.items()}, seed=c.seed),
               }[c.search.algorithm]()
    storage = optuna.storages.RDBStorage(sweep.storage_url)
    return Search(space=optuna_distributions(c.space), metric=c.metric, mode=c.mode, sampler=sampler,
                  study_name=c.name, storage=storage, points_to_evaluate=c.search.points_to_evaluate or None)


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s, t = sweep.cfg.scheduler, sweep.base.train
    if s.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=t.max_steps, grace_period=s.grace_period or t.eval_every,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval or t.checkpoint_every,
                                       hyperparam_mutations=tune_domains(sweep.cfg.space),
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
        search, space = BasicVariantGenerator(random_state=c.seed), tune_domains(c.space)
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
            callbacks=[ReleaseEndedTrialGroups()],
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
    earlier_jobs = record_driver_job(sweep.dir)
    release_leaked_placement_groups(earlier_jobs, grace_s=0.0)  # an interrupted driver's leftovers, if any
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
    release_leaked_placement_groups(earlier_jobs)
    finished = grid.num_terminated + grid.num_errors
    if finished < c.num_trials:  # Ctrl-C / SIGTERM: Tune saved its state and returned early
        print(f"[tune] interrupted with {finished} of {c.num_trials} trials finished; continue with --resume "
              f"(finished trials are kept)", flush=True)
        return {"sweep": c.name, "dir": str(sweep.dir), "interrupted": True, "finished_trials": finished}
    from neuraflex_ray.tune.results import summarize

    return summarize(sweep, grid)
