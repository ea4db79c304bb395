"""A sweep's search space, from its YAML spec to the two samplers that draw from it.

One table maps each `ParamSpec` type to its Optuna distribution (what OptunaSearch samples, and what
the dashboard shows) and its Tune domain (what PBT samples its mutations from), so both read the
same range the same way.
"""

from __future__ import annotations

from typing import Any

from neuraflex_ray.tune.config import ParamSpec


def _optuna(s: ParamSpec) -> Any:
    from optuna import distributions as d

    return {
        "uniform": lambda: d.FloatDistribution(s.low, s.high),
        "loguniform": lambda: d.FloatDistribution(s.low, s.high, log=True),
        "int": lambda: d.IntDistribution(int(s.low), int(s.high), log=s.log),
        "choice": lambda: d.CategoricalDistribution(s.values),
    }[s.type]()


def _tune(s: ParamSpec) -> Any:
    from ray import tune

    return {
        "uniform": lambda: tune.uniform(s.low, s.high),
        "loguniform": lambda: tune.loguniform(s.low, s.high),
        # Tune's integer domains exclude their upper bound; a spec's `high` is included.
        "int": lambda: (tune.lograndint if s.log else tune.randint)(int(s.low), int(s.high) + 1),
        "choice": lambda: tune.choice(s.values),
    }[s.type]()


def optuna_distributions(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The space as Optuna distributions (OptunaSearch's space)."""
    return {key: _optuna(s) for key, s in space.items()}


def tune_domains(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The same space as Tune domains: what PBT samples its mutations from."""
    return {key: _tune(s) for key, s in space.items()}
