"""Faults tried on purpose, with nothing lost: a replica and a head node lost under Serve load, keys and
limits under load, a torn checkpoint on resume, a sweep's driver killed.

    python benchmarks/fault_suite.py [--parts replica_kill,gcs_restart,auth,torn_checkpoint,sweep_resume]
                                     [--outage-s 20] [--sweep-trials 6]

- replica_kill: two replicas of an untrained tiny LM on a local Ray; 32 clients on the official openai
  client (its default 2 retries), every other one streaming, each request seeded and checked against
  its text alone; one replica's actor is killed (`ray.kill`). Counts failures as the clients saw them,
  cut streams (with an error, or silently), wrong texts, the server's 5xx and the client's retries, and
  the seconds until Serve runs 2 replicas again.
- gcs_restart: `clusters/local.sh up --gcs-ft` (a head and a worker node on this machine, the GCS backed
  by the machine's Redis); an untrained tiny LM served by `serve deploy` with both replicas on the
  worker node; 16 clients send completions through the worker node's Serve proxy. Every process of
  the head node is killed (`local.sh kill-head`), and `--outage-s` later the head is started again
  (`local.sh start-head`, what a supervisor or KubeRay would do). Counts the requests sent during the
  outage and those that succeeded, then those that failed after it, and checks that the application,
  a job submitted before the loss and the worker node are still there.
- auth / rate_limit: one replica with keys; 20 requests without a key and 20 with a wrong one (their
  statuses), and a key sending 4x its requests_per_minute while a second key's latency is measured
  beside an unloaded run of it (p50 ratio).
- torn_checkpoint: a checkpoint directory cut short (its expert files removed, as by a kill
  mid-save) beside a complete one: the step the resume takes.
- sweep_resume: `clusters/local.sh up` (two nodes); `neuraflex-ray tune` on jobs/configs/tune_moe_debug.yaml
  made tiny, submitted as a Ray job, its Optuna study in a PostgreSQL database of its own. The driver's
  process is SIGKILLed just after it asked Optuna for a trial once another had ended, then the same
  command runs again with --resume. Counts, from the study and the sweep's results table, the trials
  that ended once in both (trials), more than once (duplicated) and never (lost); the study's trial
  states, what became of each trial the kill left running, the nodes the trials' Train workers ran on,
  and whether `neuraflex-ray dashboard` shows the study.

Prints one JSON object with a key per part (the shape of issue 31's evidence).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# The parts live beside this script (Python puts its directory first on sys.path); faults_common, which
# the others import first, puts the repository on sys.path for project code.
from faults_cluster import gcs_restart, sweep_resume
from faults_common import REPO
from faults_serve import auth_and_rate_limit, replica_kill

# ---------------------------------------------------------------------------------------------
# A torn checkpoint
# ---------------------------------------------------------------------------------------------


def torn_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.checkpoint import read_checkpoint_state
    from neuraflex_ray.train.driver import RAY_RUN_NAME, checkpoints_root, latest_checkpoint

    legacy = REPO / "tests" / "fixtures" / "legacy" / "moe" / "checkpoint"
    with tempfile.TemporaryDirectory() as tmp:
        root = checkpoints_root(Path(tmp)) / RAY_RUN_NAME
        shutil.copytree(legacy, root / "checkpoint_2026-12-01_10-00-00.000000")
        torn = root / "checkpoint_2026-12-01_10-05-00.000000"
        shutil.copytree(legacy, torn)
        for f in sorted((torn / "ds").glob("layer_*"))[1:]:
            f.unlink()
        used = latest_checkpoint(Path(tmp), announce=True)  # says on the console what it skipped
        return {"resumed_from_step": read_checkpoint_state(used)["step"] if used else None,
                "skipped": [torn.name]}


PARTS = {"replica_kill": replica_kill, "gcs_restart": gcs_restart, "auth": auth_and_rate_limit,
         "torn_checkpoint": torn_checkpoint, "sweep_resume": sweep_resume}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="replica_kill,gcs_restart,auth,torn_checkpoint,sweep_resume")
    p.add_argument("--kill-clients", type=int, default=32, help="replica_kill: clients, every other one streaming")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--distinct", type=int, default=16, help="replica_kill: distinct seeded requests")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--outage-s", type=float, default=20)
    p.add_argument("--warmup-s", type=float, default=10)
    p.add_argument("--after-s", type=float, default=15)
    p.add_argument("--rpm", type=int, default=60, help="requests_per_minute of every key")
    p.add_argument("--sweep-trials", type=int, default=6, help="sweep_resume: the sweep's num_trials")
    p.add_argument("--sweep-timeout-s", type=float, default=900, help="sweep_resume: the longest each driver may run")
    p.add_argument("--samples", type=int, default=12, help="the quiet key's timed requests, unloaded and loaded "
                                                           "(2 x samples + 1 must stay under --rpm)")
    args = p.parse_args()
    out: dict[str, Any] = {}
    for name in args.parts.split(","):
        with contextlib.redirect_stdout(sys.stderr):  # Ray's and the parts' notices; stdout carries the JSON
            result = PARTS[name.replace("rate_limit", "auth")](args)
        out.update(result if name == "auth" else {name: result})
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
