"""Hyperparameter sweeps: Ray Tune (OptunaSearch + ASHA, or PBT) over real Ray Train runs.

    config.py     the sweep YAML (`load_sweep`) and every check made before a trial starts
    space.py      the search space as Optuna distributions and as Tune domains (one table)
    trial.py      one trial: a Train run inside a Tune trial, and where a restart reads from
    run.py        the search, the scheduler, the Tuner: `run_sweep`
    results.py    results.csv / .parquet, best.yaml, the TensorBoard hparams view, summary.json
    placement.py  releasing the worker placement groups that ended trials leave behind

    neuraflex-ray tune --config jobs/configs/tune_moe_debug.yaml            # --resume, --fresh
"""

from neuraflex_ray.tune.config import ParamSpec, Sweep, SweepConfig, load_sweep
from neuraflex_ray.tune.run import run_sweep

__all__ = ["ParamSpec", "Sweep", "SweepConfig", "load_sweep", "run_sweep"]
