"""The console a person reads: progress lines, not library chatter; `--verbose` brings the chatter back.

Both runs are real `python -m neuraflex_ray train` drivers connected to the session's cluster
through RAY_ADDRESS, as `ray job submit` connects one (and `ray job logs` shows that driver's output).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuraflex_ray.console import shown

# What a default run must not print (issue 16): DeepSpeed's op builder, Ray's dedup notice,
# FutureWarnings, Train's result dumps; and Ray Data's execution plans.
CHATTER = ("built successfully", "Ray deduplicates logs", "FutureWarning", "Reporting training result",
           "Execution plan of Dataset")


@pytest.mark.parametrize("line,show", [
    ("[train] step 10/400 | loss 7.2 | tok/s 5,000", True),
    ("[eval] step 100 | val loss 5.3846 | val bits_per_byte 2.1282", True),
    ("[data] wrote 6058 train / 124 val blocks", True),
    ("Traceback (most recent call last):", True),
    ("RuntimeError: Expected all tensors to be on the same device", True),
    ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", False),
    ("Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 100})", False),
    ("/venv/torch/distributed/c10d_logger.py:83: FutureWarning: `all_gather_into_tensor` is deprecated.", False),
    ("No existing process group found, creating a new group named: ep_size_2", False),
    ("Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)", False),
    ("Task ServeController.graceful_shutdown failed. Error: The actor is dead because it was killed", False),
    ("Exception: the training function raised", True),
])
def test_which_forwarded_lines_reach_the_console(line, show):
    assert shown(line) is show


def start_train(tmp: Path, name: str, *flags: str) -> subprocess.Popen:
    """`neuraflex-ray train` on its own local Ray (no RAY_ADDRESS: the CLI starts one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NEURAFLEX_VERBOSE")}
    cmd = [sys.executable, "-m", "neuraflex_ray", *flags, "train", "--config", "jobs/configs/moe_debug.yaml",
           f"name={name}", f"output_dir={tmp / 'runs'}", f"data.output_dir={tmp / name / 'data'}",
           "model.flavour=tiny", "model.max_seq_len=64", "data.max_bytes=200000", "data.vocab_size=512",
           "data.seq_len=32", "train.micro_batch_size=4", "train.max_steps=4", "train.warmup_steps=1",
           "train.log_every=2", "train.eval_every=4", "train.eval_batches=2", "train.checkpoint_every=4"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(__file__).parents[1])


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """Two trainings at once, each starting its own local Ray beside the suite's: three Ray instances
    on the machine, so a Ray helper that looks for "the" local cluster would find several."""
    tmp = tmp_path_factory.mktemp("console")
    procs = [start_train(tmp, "quiet"), start_train(tmp, "loud", "--verbose")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return tmp, *outs


def test_two_trainings_at_once_each_on_its_own_local_ray_run_clean(runs):
    """Ray Train's PlacementGroupCleaner finds its cluster through RAY_ADDRESS (local_ray.py): with the
    address left to discovery it raised "Found multiple active Ray instances" and stopped watching."""
    tmp, quiet, loud = runs
    library = (tmp / "runs" / "quiet" / "logs" / "library.log").read_text()
    for text in (quiet, loud, library):
        assert "multiple active Ray instances" not in text, text[-3000:]
    assert "Traceback" not in quiet, quiet[-3000:]  # nothing failed where a person would see it
    assert "[ray] started a Ray cluster" in quiet and "[ray] started a Ray cluster" in loud


def test_a_default_run_shows_progress_and_no_chatter(runs):
    tmp, quiet, _ = runs
    assert "[train] step 2/4" in quiet and "[train] step 4/4" in quiet and "[eval] step 4" in quiet
    assert "[ckpt] step 4 complete: " in quiet  # Ray's own checkpoint line went to the log file
    assert [c for c in CHATTER if c in quiet] == []
    log = tmp / "runs" / "quiet" / "logs" / "library.log"
    assert f"library output goes to {log}" in quiet
    assert "Reporting training result" in log.read_text()  # nothing lost: the chatter is in the file


def test_verbose_brings_the_chatter_back(runs):
    _, _, loud = runs
    assert "[train] step 4/4" in loud
    assert "Reporting training result" in loud and "library output goes to" not in loud


DRIVER = """
import logging
from neuraflex_ray import console
path = console.install({log!r})
import ray.serve  # Serve configures its logger on import, after install: it must be quietened too
logging.getLogger("ray.serve").info("Started Serve in namespace serve")
logging.getLogger("ray.serve").warning("replica unhealthy")
logging.getLogger("ray.data").info("Execution plan of Dataset d_0")
"""


def test_the_drivers_library_logging_goes_to_the_file_and_its_warnings_stay(tmp_path):
    log = tmp_path / "library.log"
    r = subprocess.run([sys.executable, "-c", DRIVER.format(log=str(log))], capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "NEURAFLEX_VERBOSE"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "replica unhealthy" in out and "Started Serve" not in out and "Execution plan" not in out
    text = log.read_text()
    for line in ("Started Serve in namespace serve", "replica unhealthy", "Execution plan of Dataset d_0"):
        assert text.count(line) == 1, text  # each once, though the file's handler sits on several loggers


GCS_ERRORS = """
from neuraflex_ray import console
console.install({log!r})
console.filter_worker_lines()
from ray._private import worker
worker.print_to_stdstream({{"lines": ["Task ServeController.graceful_shutdown failed. There are infinite retries "
                                      "remaining, so the task will be retried. Error: The actor is dead",
                                      "RuntimeError: something a person must see"],
                            "pid": "raylet", "is_err": False}}, ignore_prefix=False)
"""


def test_error_messages_the_gcs_publishes_are_filtered_too(tmp_path):
    """Ray prints the GCS's error messages ("(raylet) Task ... failed") without the forwarding
    dispatcher: they pass the same filter, so Serve's shutdown notice leaves the console."""
    log = tmp_path / "library.log"
    r = subprocess.run([sys.executable, "-c", GCS_ERRORS.format(log=str(log))], capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "NEURAFLEX_VERBOSE"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "RuntimeError: something a person must see" in out and "graceful_shutdown" not in out
    assert "graceful_shutdown" in log.read_text()
