"""Placement-group housekeeping: Train's worker groups sit outside Tune's accounting.

A sweep's trials each start a Ray Train run whose workers hold a placement group. When Tune ends a
trial (ASHA, PBT's pause, the end of the sweep) the group should go with it; on a busy machine one
stayed reserved and the next trial could never place its workers. Two nets: a Tune callback that
removes an ended trial's groups after a grace period, and a sweep-end sweep of whatever this job
still holds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback


class ReleaseEndedTrialGroups(Callback):
    """A Tune callback in the driver: when a trial ends, make sure its Train run's placement group goes.

    Stopping a trial (ASHA, PBT's pause, the end of the sweep) terminates the trial actor, and with it
    the Train controller it owns. Train's own cleaner is meant to remove the controller's placement
    group then, but on a busy 2-core machine one stayed reserved and the next trial could never place
    its workers (benchmarks/RESULTS.md, the router sweep). Every evaluation a worker reports names its
    group; a group still alive `grace_s` after its trial ended is removed here.
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.groups: dict[str, set[str]] = {}

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        if result.get("placement_group"):
            self.groups.setdefault(trial.trial_id, set()).add(result["placement_group"])

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)  # a trial restarted after a pause: groups seen so far belong to its old run

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)

    def _release(self, trial: Any) -> None:
        groups = self.groups.pop(trial.trial_id, set())
        if groups:  # off Tune's event loop: the grace period must not hold up the next trial's start
            threading.Thread(target=self._release_now, args=(groups, trial.trial_id), daemon=True).start()

    def _release_now(self, groups: set[str], trial_id: str) -> None:
        if release_groups(groups, self.grace_s):
            print(f"[tune] trial {trial_id}: released the placement group its Train run left reserved", flush=True)


def release_groups(groups: set[str], grace_s: float) -> list[str]:
    """Remove those of `groups` (hex ids) that are still alive after `grace_s`; return the ones removed."""
    import time

    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    def alive() -> list[str]:
        table = placement_group_table()
        return [g for g in groups if table.get(g, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED")]

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive()
    for g in left:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(g))))
    return left


DRIVER_JOBS = "driver_jobs.txt"  # in the sweep directory: the Ray job id of every driver that ran the sweep


def record_driver_job(sweep_dir: Path) -> list[str]:
    """Add this driver's Ray job id to the sweep's list; return the ids of the drivers that ran it before."""
    path = sweep_dir / DRIVER_JOBS
    earlier = path.read_text().split() if path.is_file() else []
    job = ray.get_runtime_context().get_job_id()
    with open(path, "a") as f:
        f.write(job + "\n")
    return [j for j in earlier if j != job]


def release_leaked_placement_groups(earlier_jobs: Sequence[str] = (), grace_s: float = 15.0) -> None:
    """Remove the worker placement groups this sweep's Train runs left behind.

    Once Tune has returned no trial of ours is running, so whatever this job still holds after a
    grace period for Ray's own clean-up is a leak: a group of a Train run that was still starting when
    its trial stopped, before any report could name it. Groups of the sweep's earlier drivers
    (`earlier_jobs`: a run interrupted and now resumed) go at once when Ray lists their job as dead:
    Ray should have removed them with the job, yet once in a CI run one stayed reserved a minute after
    the resumed sweep had ended. Placement group ids end with the id of the job that created them.
    """
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    table = placement_group_table()
    old: set[str] = set()
    if earlier_jobs:  # an id recorded by a driver on another cluster may name a live job here: only dead ones count
        jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info()
        dead = {k.hex() for k, v in jobs.items() if v.is_dead} & set(earlier_jobs)
        old = {pg for pg in table if any(pg.endswith(j) for j in dead)}
    leaked = release_groups(old, 0.0) + release_groups({pg for pg in table if pg.endswith(job)}, grace_s)
    if leaked:
        print(f"[tune] released {len(leaked)} placement group(s) that stopped trials left behind", flush=True)
