"""Real Ray Tune + real Optuna over real Ray Train runs (tiny MoE, 1 worker per trial, 2 at a time).

One sweep serves every test. It is started by the command line in a separate driver process,
interrupted with SIGINT once two trials have finished, then resumed here with --resume semantics.
Its first trial is a point that diverges (lr = 1e30), so one trial always fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import yaml
from ray.tune import ExperimentAnalysis

from neuraflex_ray.config import config_from_raw, load_config
from neuraflex_ray.train.driver import train
from neuraflex_ray.tune import load_sweep, run_sweep
from neuraflex_ray.tune.run import LOST_WITH_DRIVER, TUNE_TRIAL_ID, _search

REPO = Path(__file__).resolve().parents[1]
STEPS = 16  # ASHA's rungs at 4, 8 and 16; PBT perturbs at 8
TRIALS = 5
STUDY = f"t_{uuid.uuid4().hex[:8]}"  # the sweep's name, and its study's in the shared PostgreSQL database


def write_sweep(tmp: Path, storage: str = "") -> Path:
    raw = {
        "name": STUDY, "output_dir": str(tmp / "sweeps"), "base": str(REPO / "jobs" / "configs" / "moe_debug.yaml"),
        "overrides": {
            "model": {"flavour": "tiny", "max_seq_len": 64},
            "data": {"output_dir": str(tmp / "data"), "max_bytes": 400000, "vocab_size": 512, "seq_len": 32},
            "train": {"ep_size": 1, "micro_batch_size": 4, "max_steps": STEPS, "warmup_steps": 2, "log_every": 4,
                      "eval_every": 4, "eval_batches": 2, "checkpoint_every": 8, "max_failures": 0},
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "space": {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
                  # Architecture in the space: the router each trial trains with (as tune_router_debug.yaml).
                  "model.router": {"type": "choice", "values": ["softmax_topk", "aux_free", "sinkhorn"]}},
        "metric": "val_loss", "mode": "min", "num_trials": TRIALS, "max_concurrent_trials": 2, "seed": 0,
        "search": {"algorithm": "optuna", "n_startup_trials": 2, "storage": storage,
                   "points_to_evaluate": [{"train.lr": 1e30, "model.router": "softmax_topk"}]},
        "scheduler": {"type": "asha", "grace_period": 4, "reduction_factor": 2},
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def finished_in_optuna(storage: str) -> int:
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
    except KeyError:  # not created yet
        return 0
    return sum(t.state.is_finished() for t in study.trials)


def trial_files(sweep_dir: Path) -> dict[str, list[str]]:
    """Per trial: its Train run directories and TensorBoard event files (a rerun would add to both)."""
    out = {}
    for d in sorted((sweep_dir / "trials").glob("*")):
        runs = [p.name for p in sorted(d.glob("start-*"))]
        events = [p.name for p in sorted((sweep_dir / "tensorboard" / d.name).glob("events.out.tfevents.*"))]
        out[d.name] = runs + events
    return out


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory, postgres_url):
    """The study lives in the machine's PostgreSQL (as a sweep over several nodes keeps it): both the
    interrupted driver and the resumed one write to it."""
    tmp = tmp_path_factory.mktemp("tune")
    path = write_sweep(tmp, storage=postgres_url)
    loaded = load_sweep(path)
    # Optuna makes its tables on first use; made here, the polling below and the driver never race to.
    optuna.storages.RDBStorage(postgres_url)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = open(tmp / "phase1.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "neuraflex_ray.cli", "tune", "--config", str(path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while finished_in_optuna(loaded.storage_url) < 2:
        assert proc.poll() is None, (tmp / "phase1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in 10 minutes"
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=300)
    log.close()
    analysis = ExperimentAnalysis(str(loaded.dir / "tune"))
    finished = {t.trial_id for t in analysis.trials if t.status in ("TERMINATED", "ERROR")}
    before = trial_files(loaded.dir)

    summary = run_sweep(load_sweep(path), resume=True)
    yield {"path": path, "sweep": loaded, "rc": rc, "finished_before": finished, "files_before": before,
            "summary": summary, "log": (tmp / "phase1.log").read_text(), "tmp": tmp}
    optuna.delete_study(study_name=STUDY, storage=postgres_url)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    assert sweep["rc"] == 130, sweep["log"][-3000:]  # the CLI says "interrupted", not success
    assert "continue with --resume" in sweep["log"]
    assert len(sweep["finished_before"]) >= 2
    after = trial_files(sweep["sweep"].dir)
    for trial_id in sweep["finished_before"]:
        assert after.get(trial_id, []) == sweep["files_before"].get(trial_id, []), trial_id
    assert sweep["summary"]["trials"] == TRIALS
    assert not sweep["summary"].get("interrupted")


def test_sweep_completes_with_asha_stopping_a_trial_and_a_diverged_trial_failed(sweep):
    s = sweep["summary"]
    assert s["failed"] == 1 and s["stopped_early"] >= 1 and s["completed"] >= 1, s
    table = pd.read_csv(Path(s["dir"]) / "results.csv")
    failed = table[table.status == "failed"].iloc[0]
    assert failed["config/train.lr"] == 1e30 and "diverged" in failed["error"]
    stopped = table[table.status == "stopped_early"]
    assert (stopped.steps < STEPS).all()
    done = table[table.status == "completed"]
    assert (done.steps == STEPS).all() and done.val_loss.map(math.isfinite).all()
    # Compute used: a stopped trial trained fewer steps and reported fewer evaluations.
    assert stopped.reports.max() < done.reports.min()
    assert s["steps"] == int(table.steps.sum())


def test_results_table_in_csv_and_parquet(sweep):
    d = Path(sweep["summary"]["dir"])
    csv, parquet = pd.read_csv(d / "results.csv"), pd.read_parquet(d / "results.parquet")
    assert len(csv) == len(parquet) == TRIALS
    for col in ("trial_id", "status", "config/train.lr", "config/model.router", "val_loss", "best_val_loss",
                "val_bits_per_byte", "steps", "time_s", "cpu_s", "checkpoint", "error"):  # every val_* the family reports
        assert col in parquet.columns, col
    assert set(parquet["config/model.router"]) <= {"softmax_topk", "aux_free", "sinkhorn"}
    assert list(csv.trial_id) == list(parquet.trial_id)
    assert csv.steps.tolist() == parquet.steps.tolist()


def test_optuna_storage_holds_every_trial(sweep):
    assert sweep["sweep"].storage_url.startswith("postgresql")
    study = optuna.load_study(study_name=STUDY, storage=sweep["sweep"].storage_url)
    states = [t.state for t in study.trials]
    assert len(states) == TRIALS
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    assert study.trials[0].params == {"train.lr": 1e30, "model.router": "softmax_topk"}  # the point to evaluate came first
    # Each Optuna trial names its Tune trial, once: the study and the sweep's table count the same trials.
    table = pd.read_csv(Path(sweep["summary"]["dir"]) / "results.csv")
    assert sorted(t.user_attrs[TUNE_TRIAL_ID] for t in study.trials) == sorted(table.trial_id)
    best = study.best_trial
    assert best.value == pytest.approx(sweep["summary"]["best"]["val_loss"])
    # What each run measured rides along as user attributes, pruned trials included (not the failed one:
    # it never reported), so the dashboard can plot a searched value against any of them.
    assert best.user_attrs["val_bits_per_byte"] > 0 and best.user_attrs["step"] == STEPS
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(0 < t.user_attrs["step"] < STEPS and "val_loss" in t.user_attrs for t in pruned)


def test_a_killed_drivers_trials_end_once_in_the_study(tmp_path):
    """--resume after the driver was killed outright, not stopped: the study is ahead of Tune's last save.
    A trial asked after the save is failed and another takes its place; a trial told after it keeps what
    was told while Tune runs it on. (benchmarks/fault_suite.py sweep_resume kills a real driver on two nodes.)"""
    path = write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["search"]["points_to_evaluate"] = []
    path.write_text(yaml.safe_dump(raw))
    loaded = load_sweep(path)
    loaded.dir.mkdir(parents=True)
    search = _search(loaded)
    search.suggest("a")
    search.suggest("b")
    search.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    lost = search.suggest("c")
    search.on_trial_complete("b", {"val_loss": 1.0, "step": STEPS})

    resumed = _search(loaded)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("b", {"val_loss": 0.5, "step": STEPS, "training_iteration": 4})  # run on from a checkpoint
    resumed.on_trial_complete("b", {"val_loss": 0.5, "step": STEPS})
    assert resumed.suggest("d") == lost  # the seeded sampler, restored with the save, draws the lost point again
    assert resumed.suggest("e") != lost  # and only once
    for trial_id in ("a", "d", "e"):
        resumed.on_trial_complete(trial_id, {"val_loss": 2.0, "step": STEPS})

    study = optuna.load_study(study_name=STUDY, storage=loaded.storage_url)
    by_tune = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study.trials}
    assert {k: t.state.name for k, t in by_tune.items()} == {"a": "COMPLETE", "b": "COMPLETE", "c": "FAIL",
                                                             "d": "COMPLETE", "e": "COMPLETE"}
    assert by_tune["b"].value == 1.0
    assert [k for k, t in by_tune.items() if t.user_attrs.get(LOST_WITH_DRIVER)] == ["c"]


def test_tensorboard_has_every_trial_under_one_directory(sweep):
    tb = Path(sweep["summary"]["tensorboard"])
    table = pd.read_csv(Path(sweep["summary"]["dir"]) / "results.csv")
    for trial_id in table.trial_id:
        assert list((tb / trial_id).glob("events.out.tfevents.*")), trial_id
        assert list((tb / trial_id / "hparams").glob("events.out.tfevents.*")), trial_id


def test_resources_are_free_after_the_sweep(sweep):
    from ray.util import placement_group_table

    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        held = {k: {f: v.get(f) for f in ("state", "bundles", "stats")} for k, v in placement_group_table().items()
                if v.get("state") != "REMOVED"}
        assert time.monotonic() < deadline, f"placement groups left behind: {held}; {ray.available_resources()}"
        time.sleep(1)


def test_every_trial_reported_its_train_placement_group(sweep):
    analysis = ExperimentAnalysis(str(sweep["sweep"].dir / "tune"))
    for t in analysis.trials:
        if t.status == "TERMINATED":
            assert len(t.last_result["placement_group"]) == 36, t.trial_id  # a hex PlacementGroupID


def test_the_dashboards_serve_the_finished_sweep(sweep):
    """`neuraflex-ray dashboard`: optuna-dashboard's HTTP API lists the sweep's trials, TensorBoard its runs."""
    import urllib.request

    from neuraflex_ray.dashboard import start, stop
    from neuraflex_ray.serving.deploy import free_port

    servers = start(sweep["sweep"].dir, tensorboard_port=free_port(), optuna_port=free_port())
    try:
        studies = json.loads(urllib.request.urlopen(servers["optuna"] + "/api/studies", timeout=30).read())
        (study,) = [s for s in studies["study_summaries"] if s["study_name"] == STUDY]
        detail = json.loads(urllib.request.urlopen(f"{servers['optuna']}/api/studies/{study['study_id']}",
                                                   timeout=30).read())
        assert len(detail["trials"]) == TRIALS
        assert {t["state"] for t in detail["trials"]} >= {"Complete", "Pruned", "Fail"}
        runs = json.loads(urllib.request.urlopen(servers["tensorboard"] + "/data/runs", timeout=30).read())
        table = pd.read_csv(Path(sweep["summary"]["dir"]) / "results.csv")
        assert set(table.trial_id) <= set(runs)
    finally:
        stop(servers)


def test_an_ended_trials_placement_group_is_released(ray_session):
    """The driver-side callback removes the group a trial's run left reserved, and only that one."""
    from types import SimpleNamespace

    from ray.util import placement_group, placement_group_table

    from neuraflex_ray.tune.placement import ReleaseEndedTrialGroups

    ended, running = (placement_group([{"CPU": 0.01}]) for _ in range(2))
    ray.get([ended.ready(), running.ready()])
    callback = ReleaseEndedTrialGroups(grace_s=0.5)
    trial_a, trial_b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    callback.on_trial_result(0, [], trial_a, {"placement_group": ended.id.hex()})
    callback.on_trial_result(0, [], trial_b, {"placement_group": running.id.hex()})
    callback.on_trial_complete(0, [], trial_a)
    state = lambda pg: placement_group_table()[pg.id.hex()]["state"]  # noqa: E731
    deadline = time.monotonic() + 30
    while state(ended) != "REMOVED":
        assert time.monotonic() < deadline, state(ended)
        time.sleep(0.2)
    assert state(running) == "CREATED" and callback.groups == {"b": {running.id.hex()}}
    ray.util.remove_placement_group(running)


def test_best_yaml_loads_and_trains(sweep):
    best = sweep["summary"]["best"]
    assert Path(best["checkpoint"]).is_dir()
    cfg = load_config(best["best_yaml"], [f"output_dir={sweep['tmp'] / 'best'}", "train.max_steps=4",
                                          "train.eval_every=4", "train.checkpoint_every=4"])
    assert cfg.train.lr == pytest.approx(best["config"]["train.lr"])
    out = train(cfg, fresh=True)
    assert out["steps"] == 4 and math.isfinite(out["val_loss"])


def test_pbt_trials_continue_from_each_others_checkpoints(sweep, tmp_path):
    """PBT (with Tune's own sampler): the trial that falls behind restarts from the leader's checkpoint.

    Each Train run keeps one checkpoint, so a donor deletes its Train checkpoint as soon as it reports
    again; a restart must read Tune's copy, never the donor's Train run (tune/trial.py, "Where a restart
    reads from").
    """
    path = write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw.update(name="pbt", num_trials=2, search={"algorithm": "random"},
               space={"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
                      "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.2}},
               scheduler={"type": "pbt", "perturbation_interval": 8, "quantile_fraction": 0.5})
    raw["overrides"]["data"]["output_dir"] = str(sweep["tmp"] / "data")  # the dataset the sweep above built
    raw["overrides"]["train"]["num_to_keep"] = 1
    path.write_text(yaml.safe_dump(raw))
    loaded = load_sweep(path)
    summary = run_sweep(loaded)
    assert summary["completed"] == 2 and summary["optuna_storage"] is None
    sweep_dir, tune_dir = Path(summary["dir"]), Path(summary["dir"]) / "tune"
    # A trial restarts from its own checkpoint when PBT pauses it to let the other catch up, and from
    # the other trial's when PBT exploits; both are logged in the trial's lineage, and both read Tune's copy.
    restores = [(d.name, json.loads(line)) for d in (sweep_dir / "trials").iterdir()
                if (d / "lineage.jsonl").is_file() for line in (d / "lineage.jsonl").read_text().splitlines()]
    for _, r in restores:
        assert Path(r["restored_from"]).is_dir() and 0 < r["step"] <= STEPS
        assert Path(r["restored_from"]).parent == tune_dir / r["donor"], r
    exploits = [r for trial, r in restores if r["donor"] != trial]
    assert exploits, f"PBT never continued a trial from another's checkpoint: {restores}"
    assert (sweep_dir / "best.yaml").is_file()

    # The race made certain: a copy Tune holds of a checkpoint whose Train original its run has already
    # deleted (the donor reported again after it) still restarts a run, as an exploit would.
    from neuraflex_ray.checkpoint import read_checkpoint_state

    def train_steps(trial: str) -> set[int]:
        return {read_checkpoint_state(p.parent)["step"] for p in (sweep_dir / "trials" / trial).rglob("train_state.json")}

    held = [(p, read_checkpoint_state(p)["step"]) for p in sorted(tune_dir.glob("*/checkpoint_*"))]
    gone = [(p, step) for p, step in held if step < STEPS and step not in train_steps(p.parent.name)]
    assert gone, f"every Train original is still on disk: {held}"
    copy, step = gone[0]
    cfg = config_from_raw({**loaded.trial_raw({"train.lr": 1e-3, "train.weight_decay": 0.1}),
                           "name": "race", "output_dir": str(tmp_path / "race")})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=step + 4, resume_from=str(copy)))
    out = train(cfg)
    assert out["restored_from_step"] == step and out["steps"] == step + 4


def test_a_restart_that_cannot_read_its_checkpoint_names_the_donor_the_path_and_the_cause(tmp_path):
    """What a user sees in the sweep's table when a PBT restart fails (a path its node cannot read, say)."""
    from types import SimpleNamespace

    from neuraflex_ray.tune.trial import RestoreError, error_line, restore_point

    missing = tmp_path / "tune" / "t_00001" / "checkpoint_000002"
    with pytest.raises(RestoreError) as raised:
        restore_point("t_00000", SimpleNamespace(path=str(missing)))
    line = error_line(raised.value)
    assert "\n" not in line and line.startswith("RestoreError: trial t_00000 continuing from trial t_00001's")
    assert str(missing) in line and "FileNotFoundError" in line
