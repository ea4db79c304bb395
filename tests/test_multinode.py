"""The cluster path end to end on a real two-node Ray cluster on this machine (clusters/local.sh):

- `ray job submit --working-dir . -- python jobs/train_moe.py ...` trains the debug MoE with its 2
  workers on the 2 nodes, reaches SUCCEEDED, writes checkpoints and TensorBoard files to the shared
  storage, and `ray job logs` shows the progress lines;
- `ray job submit ... jobs/serve.py` serves that model's export on the cluster, over HTTP;
- a training worker process killed with SIGKILL mid-run: Ray Train restarts the workers from the
  last checkpoint and the job still ends at train.max_steps, its loss curve going on from there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from neuraflex_ray.checkpoint import is_complete, read_checkpoint_state
from neuraflex_ray.serving.deploy import free_port, post_json
from neuraflex_ray.train.driver import RAY_RUN_NAME, checkpoints_root, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
HEAD_PORT, DASHBOARD_PORT = 6390, 8275
# Two raylets, a training job and Serve on 2 cores: run with nothing beside it (`make test`'s second part).
pytestmark = pytest.mark.alone

# The tiny MoE (the cluster path, not the model, is under test); the data build runs on the cluster.
SMALL = ["model.flavour=tiny", "model.max_seq_len=64", "data.max_bytes=400000", "data.vocab_size=512",
         "data.seq_len=64", "train.micro_batch_size=4", "train.eval_batches=2", "train.placement_strategy=STRICT_SPREAD"]


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's socket files live under it.
    state = Path(tempfile.mkdtemp(prefix="nfr-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(NFR_CLUSTER_DIR=str(state), NFR_HEAD_PORT=str(HEAD_PORT), NFR_DASHBOARD_PORT=str(DASHBOARD_PORT))
    try:
        subprocess.run([str(REPO / "clusters" / "local.sh"), "up"], env=env, check=True, timeout=300)
        jobs_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}", "RAY_AUTH_MODE": "token"}
        storage = state / "storage"
        yield {"env": jobs_env, "storage": storage,
               "common": [f"output_dir={storage / 'runs'}", f"data.output_dir={storage / 'data'}", *SMALL]}
    finally:
        subprocess.run([str(REPO / "clusters" / "local.sh"), "down"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def ray_cli(cluster, *args: str, timeout: float = 60) -> str:
    out = subprocess.run([RAY, *args], env=cluster["env"], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr  # the CLI prints its status lines to stderr


def submit(cluster, job_id: str, *overrides: str, wait: bool) -> str:
    # Log dedup would fold the ranks' lines into one; the test reads each rank's.
    runtime_env = json.dumps({"env_vars": {"RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}})
    return ray_cli(cluster, "job", "submit", "--submission-id", job_id, "--working-dir", str(REPO),
                   "--runtime-env-json", runtime_env, *([] if wait else ["--no-wait"]), "--",
                   "python", "jobs/train_moe.py", "--config", "jobs/configs/moe_debug.yaml",
                   *cluster["common"], *overrides, timeout=900)


def job_status(cluster, job_id: str) -> str:
    out = ray_cli(cluster, "job", "status", job_id).lower()  # "Job 'x' succeeded", "... is currently running"
    return next(s.upper() for s in ("succeeded", "failed", "stopped", "running", "pending") if s in out)


def test_job_submit_trains_across_both_nodes(cluster):
    submit(cluster, "nfr-e2e", "name=e2e", "train.max_steps=16", "train.log_every=4", "train.eval_every=8",
           "train.checkpoint_every=8", wait=True)
    assert job_status(cluster, "nfr-e2e") == "SUCCEEDED"
    logs = ray_cli(cluster, "job", "logs", "nfr-e2e")
    nodes = set(re.findall(r"\[train\] rank \d/2 on node ([0-9a-f]+)", logs))
    assert len(nodes) == 2, logs[-3000:]  # STRICT_SPREAD: one worker per node
    progress = re.findall(r"\[train\] step (\d+)/16 \| loss [\d.]+ .*tokens/s .*mfu .*eta", logs)
    assert progress and int(progress[-1]) == 16, logs[-3000:]
    assert "[train] done: 16 steps" in logs
    run = cluster["storage"] / "runs" / "e2e"
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and read_checkpoint_state(ckpt)["step"] == 16
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_job_submit_serves_the_trained_model(cluster):
    run = cluster["storage"] / "runs" / "e2e"  # trained by the test above
    subprocess.run([sys.executable, "-m", "neuraflex_ray.cli", "export", "--config", "jobs/configs/moe_debug.yaml",
                    "name=e2e", *cluster["common"]], cwd=REPO, check=True, capture_output=True, timeout=300)
    port = free_port(8123)
    out = ray_cli(cluster, "job", "submit", "--submission-id", "nfr-serve", "--working-dir", str(REPO), "--",
                  "python", "jobs/serve.py", "--checkpoint", str(run / "export"), "--port", str(port),
                  "--proxy-location", "HeadOnly", "--no-block", timeout=600)
    assert job_status(cluster, "nfr-serve") == "SUCCEEDED", out[-3000:]
    assert f"is up at http://127.0.0.1:{port}" in out
    # The job has ended; the app lives on in the cluster's Serve.
    reply = post_json(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": "neuraflex-moe", "prompt": "def main():", "max_tokens": 8, "seed": 0})
    assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["text"] is not None
    subprocess.run([str(Path(sys.executable).parent / "serve"), "shutdown", "-y", "-a", cluster["env"]["RAY_ADDRESS"]],
                   env=cluster["env"], check=True, capture_output=True, timeout=120)  # its CPU back for the next test


def tensorboard_losses(run: Path) -> list[tuple[int, float, float]]:
    """(step, loss, wall time) of every train/loss point in every event file of the run, in write order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points = []
    for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == "train/loss":
                    value = v.simple_value if v.HasField("simple_value") else float(v.tensor.float_val[0])
                    points.append((event.step, value, event.wall_time))
    return sorted(points, key=lambda p: p[2])


def alive_train_workers(cluster) -> list[dict]:
    out = subprocess.run([RAY, "list", "actors", "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE",
                          "--format", "json", "--detail"], env=cluster["env"], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:  # no such actor yet: the CLI prints a notice, not JSON
        return []


def registered_step(run: Path) -> int | None:
    """The step of the newest checkpoint Train's controller has registered, from the snapshot it
    writes after each registration (None before the first)."""
    snapshot = checkpoints_root(run) / RAY_RUN_NAME / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    return None if latest is None else int(latest["metrics"]["step"])


def test_killed_worker_restarts_from_the_last_checkpoint_and_finishes(cluster):
    run = cluster["storage"] / "runs" / "recover"
    steps, every = 48, 16
    # The debug flavour here: its steps are slow enough that the kill lands before the next checkpoint.
    submit(cluster, "nfr-recover", "name=recover", "model.flavour=debug", f"train.max_steps={steps}", "train.log_every=2",
           "train.eval_every=24", f"train.checkpoint_every={every}", "train.max_failures=2", wait=False)
    deadline = time.monotonic() + 600
    # Find the workers first: listing actors takes seconds, which must not fall between the first
    # checkpoint and the kill (the run would be near its next checkpoint by then).
    while len(workers := alive_train_workers(cluster)) < 2:
        assert time.monotonic() < deadline and job_status(cluster, "nfr-recover") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    assert len(workers) == 2
    # Kill only once Train's controller has registered the first checkpoint (step 16): one that is
    # complete on disk but not yet registered is not the "last checkpoint" a restart gets, and under
    # load that window lasts seconds (a restart then rightly starts from step 0).
    while (last_step := registered_step(run)) is None:
        assert time.monotonic() < deadline and job_status(cluster, "nfr-recover") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    victim = max(workers, key=lambda w: w["pid"])
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()

    while (status := job_status(cluster, "nfr-recover")) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the job did not finish after the worker was killed"
        time.sleep(2)
    logs = ray_cli(cluster, "job", "logs", "nfr-recover")
    assert status == "SUCCEEDED", logs[-4000:]
    restored = [int(s) for s in re.findall(r"\[train\] resumed from checkpoint at step (\d+)", logs)]
    assert restored and set(restored) == {last_step}, (restored, last_step)
    assert f"[train] done: {steps} steps" in logs

    # The loss curve goes on from the checkpoint: after the restart the steps count on from
    # last_step, and the steps trained twice (after the checkpoint, before the kill) see the same
    # batches from the same weights, so they log the same loss.
    points = tensorboard_losses(run)
    before = dict((s, v) for s, v, t in points if t < killed_at)
    after = [(s, v) for s, v, t in points if t > killed_at]
    assert after[0][0] == last_step + 2 and after[-1][0] == steps
    retrained = [(step, loss, before[step]) for step, loss in after if step in before]
    print(f"killed pid {victim['pid']}; restored at step {last_step}; trained twice: {retrained}")
    for step, loss, first in retrained:
        assert abs(loss - first) < 1e-3, (step, loss, first)
    assert after[0][1] < before[min(before)] - 0.1  # well below the untrained start: not from scratch

    # Nothing half-written outlives the run: every checkpoint directory has all its shards.
    assert all(is_complete(d) for d in (run / "checkpoints").rglob("checkpoint_*") if d.is_dir())
    assert read_checkpoint_state(latest_checkpoint(run))["step"] == steps
