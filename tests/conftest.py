"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

# Ray Train starts a preemption-watcher actor for every run: a process start on a 2-core machine, for
# some sixty runs of a second or two of training each. Nothing here tests spot-instance preemption, so
# the suite goes without it; every process the suite starts (Ray's, a CLI driver's, the two-node
# cluster's) inherits this. Users keep Ray's default. (A 0.25 s controller poll, tried beside it, let a
# worker's failure one step after a checkpoint be handled before the checkpoint was registered, once in
# three runs of test_finetune_neurofm.py: the poll interval stays Ray's 2 s.)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (starting Ray takes seconds): one per process of
    `pytest -n 2` (make test), each of which runs whole modules (--dist loadfile).

    4 logical CPUs on a 2-core machine: 2 training workers take one each and Ray Data's read
    tasks need the rest, else ingestion waits forever behind the workers.

    Reuses a cluster that is already running; shuts down only the one it started.
    """
    import ray

    from neuraflex_ray.local_ray import start_local_ray

    started = not ray.is_initialized()
    if started:  # its address in its own processes' environment (Train's cleaner finds it beside other Rays)
        start_local_ray(keep_address=False, num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    if started:
        ray.shutdown()


POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The machine's PostgreSQL (trust auth, database `test`): a sweep's shared Optuna study lives there."""
    import psycopg2

    try:
        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=5).close()
    except psycopg2.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, database test): {str(e).strip()}; "
                    f"`make test` needs it (README, 'Tests')", pytrace=False)
    return POSTGRES
