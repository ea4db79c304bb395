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
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export  # noqa: E402
from neuraflex_ray.serving.deploy import free_port, wait_ready  # noqa: E402

MODEL = "neuraflex-moe"
BODY = {"model": MODEL, "prompt": "def handler(event, context):", "max_tokens": 8, "temperature": 0}


def post(url: str, body: dict[str, Any], key: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, {}


# ---------------------------------------------------------------------------------------------
# The head node lost under load
# ---------------------------------------------------------------------------------------------


class ClientThreads:
    """Client threads running `_run(k)` from entering the block until leaving it."""

    def __init__(self, n: int):
        self.results: list[Any] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def _run(self, k: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> ClientThreads:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


class Load(ClientThreads):
    """`clients` threads sending completions to `url` back to back; each result is (t_sent, ok)."""

    def __init__(self, url: str, clients: int):
        super().__init__(clients)
        self.url = url

    def _run(self, k: int) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            status, body = post(self.url, BODY, timeout=30)
            ok = status == 200 and body.get("usage", {}).get("completion_tokens") == BODY["max_tokens"]
            with self.lock:
                self.results.append((t0, ok))
            if not ok:
                time.sleep(0.2)  # a client backs off a little after a failure


def wait_app_running(env: dict[str, str], name: str, timeout_s: float) -> str | None:
    """Poll `serve status` until application `name` is RUNNING; its last status."""
    deadline, status = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        r = subprocess.run([str(REPO / ".venv" / "bin" / "serve"), "status", "-a", env["RAY_ADDRESS"]], env=env,
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            status = (yaml.safe_load(r.stdout) or {}).get("applications", {}).get(name, {}).get("status")
            if status == "RUNNING":
                return status
        time.sleep(2)
    return status


def local_sh(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    r = subprocess.run([str(REPO / "clusters" / "local.sh"), *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"local.sh {' '.join(args)} failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r.stdout


def cluster_env(state: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of `local.sh` for a two-node cluster kept under `state` on free ports (not the
    defaults: another local cluster may hold those), and that of the `ray` commands sent to it (token
    auth, RAY_ADDRESS at its dashboard)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(NFR_CLUSTER_DIR=str(state), NFR_HEAD_PORT=str(free_port(6392)), NFR_DASHBOARD_PORT=str(free_port(8277)),
               NFR_WORKER_SERVE_PORT=str(free_port(8101)), PATH=f"{REPO / '.venv' / 'bin'}:{env['PATH']}")
    return env, {**env, "RAY_ADDRESS": f"http://127.0.0.1:{env['NFR_DASHBOARD_PORT']}", "RAY_AUTH_MODE": "token"}


def ray_cli(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `ray` command line (jobs, the state API) against the cluster `env` names, from the repository root."""
    r = subprocess.run([str(REPO / ".venv" / "bin" / "ray"), *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    if check and r.returncode:
        raise RuntimeError(f"ray {' '.join(args[:3])} failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r


def job_info(jobs_env: dict[str, str], submission_id: str) -> dict[str, Any]:
    """The Ray job's state-API record: status, driver_info (its pid), driver_exit_code."""
    out = ray_cli(jobs_env, "list", "jobs", "--detail", "--format", "json", "-f", f"submission_id={submission_id}")
    jobs = json.loads(out.stdout)
    return jobs[0] if jobs else {}


def gcs_restart(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="nfr-ft-", dir="/tmp"))
    env, jobs_env = cluster_env(state)
    head_serve, worker_serve = free_port(8100), int(env["NFR_WORKER_SERVE_PORT"])
    local_sh(env, "up", "--gcs-ft")
    try:
        export = scratch_lm_export(state / "storage" / "lm", max_seq_len=128, flavour="tiny")
        config = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": head_serve},
                  "applications": [{"name": "ft", "route_prefix": "/", "import_path": "neuraflex_ray.serving.app:build_app",
                                    "args": {"models": {MODEL: str(export)}, "max_batch_size": 8},
                                    "deployments": [{"name": "NeuraFlexServer", "num_replicas": 2, "ray_actor_options": {
                                        # both replicas on the worker node: the head's loss must not take them
                                        "num_cpus": 0.5, "resources": {"nfr_worker_node": 0.01}}}]}]}
        (state / "serve.yaml").write_text(yaml.safe_dump(config))
        r = subprocess.run([str(REPO / ".venv" / "bin" / "serve"), "deploy", str(state / "serve.yaml"),
                            "-a", jobs_env["RAY_ADDRESS"]], env=jobs_env, capture_output=True, text=True, timeout=300,
                           cwd=REPO)
        if r.returncode:
            raise RuntimeError(f"serve deploy failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        job_id = f"nfr-ft-{os.getpid()}"  # named here: the id `ray job submit` prints comes wrapped in ANSI codes
        ray_cli(jobs_env, "job", "submit", "--submission-id", job_id, "--no-wait", "--", "python", "-c",
                "import time; time.sleep(3600)")
        url = f"http://127.0.0.1:{worker_serve}/v1/completions"
        wait_ready(f"http://127.0.0.1:{worker_serve}", 300)  # the worker node's proxy answers
        with Load(url, args.clients) as load:
            time.sleep(args.warmup_s)
            t_kill = time.monotonic()
            local_sh(env, "kill-head")
            time.sleep(args.outage_s)
            t_back = time.monotonic()
            local_sh(env, "start-head")  # returns once the worker node has rejoined the new head
            app = wait_app_running(jobs_env, "ft", 300)
            t_recovered = time.monotonic()
            time.sleep(args.after_s)
        during = [ok for t, ok in load.results if t_kill <= t < t_back]
        after = [ok for t, ok in load.results if t >= t_recovered]
        nodes = local_sh(env, "status")
        return {"requests_during_outage": len(during), "succeeded_during_outage": int(sum(during)),
                "requests_after": len(after), "failed_after": len(after) - int(sum(after)),
                "apps_recovered": app == "RUNNING", "app_recovered_s": round(t_recovered - t_back, 1),
                "nodes_alive_after": nodes.count("alive"),
                "job_after": job_info(jobs_env, job_id).get("status"),  # RUNNING: the job outlived its head
                "outage_s": args.outage_s,
                "clients": args.clients}
    finally:
        local_sh(env, "down")
        shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A sweep's driver killed mid-run
# ---------------------------------------------------------------------------------------------

POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"  # the machine's PostgreSQL (trust auth)
SWEEP = "fault-sweep"
SWEEP_STEPS = 24  # ASHA's rungs at 8 and 16; a checkpoint every 8 steps, so a killed trial resumes mid-run


def postgres(sql: str) -> None:
    """One statement on the `test` database, outside a transaction (CREATE/DROP DATABASE refuse one)."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def sweep_command(state: Path, storage: str, trials: int, resume: bool) -> list[str]:
    """`neuraflex-ray tune` on jobs/configs/tune_moe_debug.yaml made tiny (as tests/test_tune.py does): a
    trial trains for seconds, two run at a time, everything under the nodes' shared storage."""
    storage_dir = state / "storage"
    train = {"max_steps": SWEEP_STEPS, "warmup_steps": 2, "eval_every": 8, "eval_batches": 2, "log_every": 8,
             "checkpoint_every": 8, "micro_batch_size": 4, "max_failures": 0}
    return ["python", "-m", "neuraflex_ray", "tune", "--config", "jobs/configs/tune_moe_debug.yaml",
            *(["--resume"] if resume else []),
            f"name={SWEEP}", f"output_dir={storage_dir / 'sweeps'}", f"search.storage={storage}",
            f"num_trials={trials}", "max_concurrent_trials=2", "scheduler.grace_period=8",
            "overrides.model.flavour=tiny", "overrides.model.max_seq_len=64",
            f"overrides.data.output_dir={storage_dir / 'data'}", "overrides.data.max_bytes=400000",
            "overrides.data.vocab_size=512", "overrides.data.seq_len=32",
            *(f"overrides.train.{k}={v}" for k, v in train.items())]


def wait_job(jobs_env: dict[str, str], submission_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (info := job_info(jobs_env, submission_id)).get("status") not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {info.get('status')} after {timeout_s:.0f}s")
        time.sleep(3)
    return info


def job_log_tail(jobs_env: dict[str, str], submission_id: str) -> str:
    return ray_cli(jobs_env, "job", "logs", submission_id, check=False).stdout[-3000:]


def trial_nodes(jobs_env: dict[str, str], tune_dir: Path) -> dict[str, list[str]]:
    """Per Tune trial, the nodes ("head", "worker") its Train workers ran on. Both nodes share one IP, so
    Tune's node_ip cannot tell them apart: every evaluation a trial reports names its Train run's placement
    group, and Ray's state API (dead actors included) names the node of the workers in that group."""
    actors = json.loads(ray_cli(jobs_env, "list", "actors", "--detail", "--format", "json", "--limit", "10000",
                                "-f", "class_name=RayTrainWorker").stdout)
    nodes = json.loads(ray_cli(jobs_env, "list", "nodes", "--format", "json", "--limit", "1000").stdout)
    name = {n["node_id"]: "head" if "nfr_head_node" in n["resources_total"] else "worker" for n in nodes}
    group_node = {a["placement_group_id"]: name.get(a["node_id"], a["node_id"]) for a in actors
                  if a.get("placement_group_id")}
    out = {}
    for results in sorted(tune_dir.glob("*/result.json")):
        groups = {json.loads(line).get("placement_group") for line in results.read_text().splitlines() if line.strip()}
        out[results.parent.name] = sorted({group_node.get(g, "unknown") for g in groups if g})
    return out


def dashboard_reads(sweep_dir: Path, study_name: str) -> dict[str, int] | None:
    """`neuraflex-ray dashboard <sweep dir>` started as a user would, asked over optuna-dashboard's HTTP API
    for the study's trials: their count per state, or None when it does not list the study."""
    tb_port, optuna_port = free_port(6006), free_port(8080)
    log = sweep_dir / "dashboard-cli.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "neuraflex_ray", "dashboard", str(sweep_dir),
                                 "--tensorboard-port", str(tb_port), "--optuna-port", str(optuna_port)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    base = f"http://127.0.0.1:{optuna_port}/api/studies"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base, timeout=10) as r:
                    studies = json.loads(r.read())["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"neuraflex-ray dashboard did not answer: {log.read_text()[-2000:]}") from None
                time.sleep(1)
        ids = [s["study_id"] for s in studies if s["study_name"] == study_name]
        if not ids:
            return None
        with urllib.request.urlopen(f"{base}/{ids[0]}", timeout=30) as r:
            trials = json.loads(r.read())["trials"]
        return {state: sum(t["state"] == state for t in trials) for state in sorted({t["state"] for t in trials})}
    finally:
        proc.terminate()  # the command stops both servers on SIGTERM, as on Ctrl-C
        proc.wait(timeout=60)


def sweep_resume(args: argparse.Namespace) -> dict[str, Any]:
    import optuna
    import pandas as pd

    from neuraflex_ray.tune.run import LOST_WITH_DRIVER, TUNE_TRIAL_ID

    t_start = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="nfr-sweep-", dir="/tmp"))
    env, jobs_env = cluster_env(state)
    database = f"nfr_fault_{os.getpid()}"  # a study of its own: reruns never meet an older study
    url = f"{POSTGRES}/{database}"
    sweep_dir = state / "storage" / "sweeps" / SWEEP
    first, second = f"nfr-sweep-{os.getpid()}-1", f"nfr-sweep-{os.getpid()}-2"
    postgres(f"CREATE DATABASE {database}")
    storage = optuna.storages.RDBStorage(url)  # its tables made here: polling and the driver never race to
    try:
        local_sh(env, "up")
        t_up = time.monotonic()

        def trials() -> list[optuna.trial.FrozenTrial]:
            try:
                return optuna.load_study(study_name=SWEEP, storage=storage).get_trials(deepcopy=False)
            except KeyError:  # the driver has not created the study yet
                return []

        ray_cli(jobs_env, "job", "submit", "--submission-id", first, "--no-wait", "--working-dir", ".", "--",
                *sweep_command(state, url, args.sweep_trials, resume=False))
        # The kill lands just after the driver asked Optuna for a new trial once another one had ended: the
        # moment a killed driver can leave a trial in the study that Tune's saved state (written every few
        # seconds) does not know yet.
        deadline = time.monotonic() + args.sweep_timeout_s
        while True:
            seen = trials()
            ended = [t.datetime_complete for t in seen if t.state.is_finished()]
            if ended and any(t.state == optuna.trial.TrialState.RUNNING and t.datetime_start > min(ended)
                             for t in seen):
                break
            if time.monotonic() > deadline or job_info(jobs_env, first).get("status") != "RUNNING":
                raise RuntimeError(f"no trial ended in the sweep's first driver: {job_log_tail(jobs_env, first)}")
            time.sleep(0.5)
        driver = job_info(jobs_env, first)["driver_info"]
        os.kill(int(driver["pid"]), signal.SIGKILL)  # the driver's process, as a lost machine or OOM kill would
        t_kill = time.monotonic()
        running_at_kill = {t.number: t.user_attrs.get(TUNE_TRIAL_ID) for t in trials()
                           if t.state == optuna.trial.TrialState.RUNNING}
        killed = wait_job(jobs_env, first, 120)

        ray_cli(jobs_env, "job", "submit", "--submission-id", second, "--no-wait", "--working-dir", ".", "--",
                *sweep_command(state, url, args.sweep_trials, resume=True))
        t_resume = time.monotonic()
        resumed = wait_job(jobs_env, second, args.sweep_timeout_s)
        t_done = time.monotonic()
        for sid in (first, second):  # both drivers' logs, in the run's log (stderr)
            print(f"===== {sid}\n{ray_cli(jobs_env, 'job', 'logs', sid, check=False).stdout}", file=sys.stderr)

        # What the study holds: one told (finished) Optuna trial per Tune trial, none RUNNING. A trial the
        # resumed driver marked failed because the killed one had asked for it after Tune's last save is not
        # a result: another trial took its place (the seeded sampler draws its point again).
        study = trials()
        counting = [t for t in study if t.state.is_finished() and not t.user_attrs.get(LOST_WITH_DRIVER)]
        told = Counter(t.user_attrs.get(TUNE_TRIAL_ID) for t in counting)
        points = Counter(json.dumps(t.params, sort_keys=True) for t in counting)

        def run_again(lost: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
            again = [t for t in counting if t.number > lost.number and t.params == lost.params]
            return {"optuna_trial": again[0].number, "state": again[0].state.name,
                    "tune_trial": again[0].user_attrs.get(TUNE_TRIAL_ID)} if again else None

        # A resumed driver that failed wrote no table: its trials then count as lost, and its log says why.
        done = resumed["status"] == "SUCCEEDED"
        table = pd.read_csv(sweep_dir / "results.csv") if done else pd.DataFrame({"trial_id": []})
        summary = json.loads((sweep_dir / "summary.json").read_text()) if done else {}
        counted = set(table.trial_id) & set(told)
        after = {t.number: t for t in study}
        nodes = trial_nodes(jobs_env, sweep_dir / "tune")
        return {
            "trials": len(counted),
            "duplicated": sum(n - 1 for n in told.values() if n > 1) + len(table) - table.trial_id.nunique(),
            "lost": args.sweep_trials - len(counted),
            "num_trials": args.sweep_trials,
            "optuna_trials": len(study),
            "optuna_states": dict(Counter(t.state.name for t in study)),
            "stale_running": sum(not t.state.is_finished() for t in study),
            "same_point_twice": sum(n - 1 for n in points.values()),  # a point the sweep evaluated again
            # Each trial the kill left running: finished on resume, or failed and run again (once).
            "running_at_kill": [{"optuna_trial": n, "tune_trial": tid, "after_resume": after[n].state.name,
                                 **({"lost_with_driver": True, "point_run_again_as": run_again(after[n])}
                                    if after[n].user_attrs.get(LOST_WITH_DRIVER) else {})}
                                for n, tid in running_at_kill.items()],
            "optuna_only": sorted(set(told) - set(table.trial_id), key=str),  # told, yet not in the sweep's table
            "table": {k: summary.get(k) for k in ("trials", "completed", "stopped_early", "failed")},
            # Tune trials that went on from a checkpoint of theirs after the kill (trial.py logs each restart)
            "resumed_from_checkpoint": sorted(p.parent.name for p in sweep_dir.glob("trials/*/lineage.jsonl")),
            "nodes_seen": sorted({n for ns in nodes.values() for n in ns}),
            "trials_per_node": dict(Counter(n for ns in nodes.values() for n in ns)),
            "first_driver": {"status": killed["status"], "exit_code": killed.get("driver_exit_code")},
            "resumed_driver": {"status": resumed["status"], "exit_code": resumed.get("driver_exit_code"),
                               **({} if done else {"log_tail": job_log_tail(jobs_env, second)})},
            "dashboard_reads_study": (shown := dashboard_reads(sweep_dir, SWEEP) if done else None) is not None
                                     and sum(shown.values()) == len(study),
            "dashboard_states": shown,
            "wall_s": {"cluster_up": round(t_up - t_start, 1), "until_kill": round(t_kill - t_up, 1),
                       "resumed_sweep": round(t_done - t_resume, 1), "total": round(time.monotonic() - t_start, 1)},
        }
    finally:
        local_sh(env, "down")
        storage.engine.dispose()
        postgres(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A replica killed under load
# ---------------------------------------------------------------------------------------------


def _spec(i: int) -> dict[str, Any]:
    return {"prompt": f"# request {i}\ndef handler(event, context):", "seed": 1000 + i}


class Clients(ClientThreads):
    """`n` threads on the official openai client (its default retries), every other one streaming; each
    request's text is checked against the same request's text alone (seeded, batch-invariant decoding)."""

    def __init__(self, url: str, reference: dict[int, str], n: int, max_tokens: int):
        from openai import DefaultHttpx2Client

        super().__init__(n)
        self.url, self.reference, self.max_tokens = url, reference, max_tokens
        self.http = {"requests": 0, "5xx": 0}

        def on_response(r: Any) -> None:  # every HTTP attempt the client makes, retries included
            with self.lock:
                self.http["requests"] += 1
                self.http["5xx"] += r.status_code >= 500

        # The openai client's own HTTP client (its defaults), with a hook that sees every attempt.
        self.client_http = DefaultHttpx2Client(event_hooks={"response": [on_response]}, timeout=120)

    def _run(self, k: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", http_client=self.client_http)
        i = k
        while not self.stop.is_set():
            i = (i + len(self.threads)) % len(self.reference)
            spec, stream = _spec(i), k % 2 == 1
            kw = {"model": MODEL, "prompt": spec["prompt"], "seed": spec["seed"], "temperature": 0.8,
                  "max_tokens": self.max_tokens, "extra_body": {"ignore_eos": True}}
            text, finish, error = "", None, None
            try:
                if stream:
                    parts = []
                    for chunk in client.completions.create(stream=True, **kw):
                        for c in chunk.choices:
                            parts.append(c.text)
                            finish = c.finish_reason or finish
                    text = "".join(parts)
                else:
                    out = client.completions.create(**kw)
                    text, finish = out.choices[0].text, out.choices[0].finish_reason
            except Exception as e:  # noqa: BLE001 - what a client sees
                error = f"{type(e).__name__}: {e}"[:200]
            with self.lock:
                self.results.append({"stream": stream, "error": error, "silent_cut": error is None and finish is None,
                                     "wrong": error is None and finish is not None and text != self.reference[i]})


def replica_kill(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from neuraflex_ray.local_ray import start_local_ray
    from neuraflex_ray.serving.deploy import deploy

    root = Path(tempfile.mkdtemp(prefix="nfr-kill-"))
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        export = scratch_lm_export(root / "lm", max_seq_len=128, flavour="tiny")
        url = deploy({MODEL: str(export)}, port=free_port(), num_cpus=0.5, num_replicas=2, name="kill")
        from openai import OpenAI

        alone = OpenAI(base_url=f"{url}/v1", api_key="unused")
        reference = {i: alone.completions.create(model=MODEL, prompt=_spec(i)["prompt"], seed=_spec(i)["seed"],
                                                 temperature=0.8, max_tokens=args.max_tokens,
                                                 extra_body={"ignore_eos": True}).choices[0].text
                     for i in range(args.distinct)}
        with Clients(url, reference, args.kill_clients, args.max_tokens) as load:
            time.sleep(args.warmup_s)
            def replicas() -> list[dict[str, str]]:
                return [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if "SERVE_REPLICA" in a["name"] and "kill" in a["name"]]

            victim = replicas()[0]
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            t_kill = time.monotonic()
            recovered = None
            while time.monotonic() - t_kill < 120:  # back: 2 RUNNING, and the killed one is not among them
                states = serve.status().applications["kill"].deployments["NeuraFlexServer"].replica_states
                names = {a["name"] for a in replicas()}
                if states.get("RUNNING", 0) == 2 and victim["name"] not in names and len(names) == 2:
                    recovered = round(time.monotonic() - t_kill, 1)
                    break
                time.sleep(0.5)
            time.sleep(args.after_s)
        r = load.results
        plain, streams = [x for x in r if not x["stream"]], [x for x in r if x["stream"]]
        return {"requests": len(r), "failed": sum(x["error"] is not None for x in r),
                "failed_non_streaming": sum(x["error"] is not None for x in plain),
                "cut_streams_with_error": sum(x["error"] is not None for x in streams),
                "silent_cut_streams": sum(x["silent_cut"] for x in r),
                "wrong": sum(x["wrong"] for x in r) + sum(x["silent_cut"] for x in r),
                "recovered_s": recovered, "server_5xx": load.http["5xx"],
                "client_retries": load.http["requests"] - len(r), "clients": args.kill_clients,
                "errors": sorted({x["error"].split(":")[0] for x in r if x["error"]})}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Keys and limits
# ---------------------------------------------------------------------------------------------


def auth_and_rate_limit(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from neuraflex_ray.local_ray import start_local_ray
    from neuraflex_ray.serving.deploy import deploy

    root = Path(tempfile.mkdtemp(prefix="nfr-keys-"))
    keys = {"loaded": "sk-loaded-" + os.urandom(8).hex(), "quiet": "sk-quiet-" + os.urandom(8).hex()}
    (root / "keys.txt").write_text("".join(f"{k} {n}\n" for n, k in keys.items()))
    rpm = args.rpm
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        export = scratch_lm_export(root / "lm", max_seq_len=128, flavour="tiny")
        base = deploy({MODEL: str(export)}, port=free_port(), num_cpus=1,
                      access={"api_key_file": str(root / "keys.txt"), "requests_per_minute": rpm})
        url = base + "/v1/completions"
        no_key = {post(url, BODY)[0] for _ in range(20)}
        bad_key = {post(url, BODY, "sk-wrong")[0] for _ in range(20)}
        good = post(url, BODY, keys["quiet"])[0]

        def timed(key: str, n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _ = post(url, BODY, key)
                assert status == 200, status
                out.append(time.perf_counter() - t0)
            return out

        unloaded = timed(keys["quiet"], args.samples)
        # The loaded key sends 4x its limit over one minute (paced: 4 * rpm requests in 60 s, from 4
        # threads); the quiet key's requests are timed across that minute.
        statuses: list[int] = []
        period = 60.0 / (4 * rpm) * 4  # each of the 4 threads

        def flood() -> None:
            t_next = time.monotonic()
            for _ in range(rpm):
                statuses.append(post(url, BODY, keys["loaded"])[0])
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))

        threads = [threading.Thread(target=flood) for _ in range(4)]
        for t in threads:
            t.start()
        loaded = []
        for _ in range(args.samples):
            loaded += timed(keys["quiet"], 1)
            time.sleep(50.0 / args.samples)
        for t in threads:
            t.join()
        return {"auth": {"no_key": sorted(no_key)[0] if len(no_key) == 1 else sorted(no_key),
                         "bad_key": sorted(bad_key)[0] if len(bad_key) == 1 else sorted(bad_key), "good_key": good},
                "rate_limit": {"limited_status": 429 if 429 in statuses else None, "sent": len(statuses),
                               "admitted": statuses.count(200), "limited": statuses.count(429),
                               "requests_per_minute": rpm,
                               "other_key_p50_ratio": round(float(np.median(loaded) / np.median(unloaded)), 3),
                               "other_key_p50_ms": round(float(np.median(loaded)) * 1e3, 1),
                               "other_key_unloaded_p50_ms": round(float(np.median(unloaded)) * 1e3, 1)}}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


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
