"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor for every
# run. A test's run trains for a second or two, so the poll adds about a second at each end and the
# watcher a process start: ~5 s of a ~30 s run on 2 cores, over some sixty runs. Tests poll every
# 0.25 s and go without the watcher (nothing here tests spot-instance preemption); every process the
# suite starts (Ray's, a CLI driver's, the two-node cluster's) inherits these. Users keep Ray's defaults.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (starting Ray takes seconds).

    4 logical CPUs on a 2-core machine: 2 training workers take one each and Ray Data's read
    tasks need the rest, else ingestion waits forever behind the workers.

    Reuses a cluster that is already running; shuts down only the one it started.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    if started:
        ray.shutdown()
