"""Where sweeps lived before `neuraflex_ray/tune/`: kept so that a sweep started by older code resumes.

Tune pickles its run config into the sweep's state, and that state names this module's callback
class; `--resume` of such a sweep unpickles it from here. New code imports `neuraflex_ray.tune`.
"""

from neuraflex_ray.tune import load_sweep, run_sweep
from neuraflex_ray.tune.placement import ReleaseEndedTrialGroups as _ReleaseEndedTrialGroups

__all__ = ["_ReleaseEndedTrialGroups", "load_sweep", "run_sweep"]
