"""Start a local Ray cluster whose address every process of it can find, even beside another Ray.

Ray's helpers that run inside a cluster find it through RAY_ADDRESS, or else by looking for GCS
processes on the machine: Ray Train's PlacementGroupCleaner asks the state API whether the run's
controller is alive that way. A plain `ray.init()` that starts a cluster sets no RAY_ADDRESS, so
with a second Ray on the same machine (a benchmark's, another `neuraflex-ray train`, the test
suite's two-node cluster) the cleaner raised "Found multiple active Ray instances" and stopped
watching the placement group it exists to release. Here the GCS port is chosen first and
RAY_ADDRESS names it before the cluster starts: the raylet inherits the driver's environment and
every worker inherits the raylet's, so Ray's own helpers resolve the address without guessing.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

_started: str | None = None  # the address this process put in RAY_ADDRESS for the cluster it started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_local_ray(*, keep_address: bool = True, **init_kwargs: Any) -> Any:
    """`ray.init(address="local", **init_kwargs)` with RAY_ADDRESS naming the new cluster in the
    environment its processes inherit. `keep_address`: leave it in this process's environment too
    (a CLI driver: its subprocesses then join this cluster); False restores the caller's value once
    the cluster is up (a test session whose subprocesses choose their own cluster)."""
    global _started
    from ray._private.services import get_node_ip_address

    address = f"{get_node_ip_address()}:{_free_port()}"
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_ADDRESS"] = address
    os.environ["RAY_GCS_SERVER_PORT"] = address.rsplit(":", 1)[1]  # the port the head's GCS listens on
    ok = False
    try:
        ctx = ray.init(address="local", **init_kwargs)
        ok = True
    finally:
        for k, v in saved.items():
            if k == "RAY_ADDRESS" and keep_address and ok:
                continue
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if keep_address:
        _started = address
    return ctx


def cluster_to_join() -> str | None:
    """The RAY_ADDRESS a user (or `ray job submit`) gave this process, not one start_local_ray set."""
    address = os.environ.get("RAY_ADDRESS")
    return None if not address or address == _started else address
