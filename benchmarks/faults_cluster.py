"""The parts of benchmarks/fault_suite.py on a two-node cluster on this machine (`clusters/local.sh`): the
head node lost under load (`gcs_restart`) and a sweep's driver killed mid-run (`sweep_resume`), with the
helpers both use to start the cluster and drive it through the `ray` and `serve` command lines. What each
part measures is in fault_suite.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from faults_common import BODY, MODEL, REPO, ClientThreads, post  # first: it puts the repository on sys.path

from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.serving.deploy import free_port, wait_ready

# ---------------------------------------------------------------------------------------------
# The local cluster, driven as a user would
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The head node lost under load
# ---------------------------------------------------------------------------------------------


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
