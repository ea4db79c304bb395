"""Where sweeps lived before `neuraflex_ray/tune/`: kept so that a sweep started by older code resumes.

Tune pickles its tune and run configs into the sweep's state (tune/tuner.pkl), and that state names
this module's trial-naming function and callback class; `--resume` of such a sweep unpickles them
from here. New code imports `neuraflex_ray.tune`.
"""

from neuraflex_ray.tune import load_sweep, run_sweep
from neuraflex_ray.tune.placement import ReleaseEndedTrialGroups as _ReleaseEndedTrialGroups
from neuraflex_ray.tune.run import _trial_dirname

__all__ = ["_ReleaseEndedTrialGroups", "_trial_dirname", "load_sweep", "run_sweep"]
