"""Shared fixtures."""

from __future__ import annotations

import pytest


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
