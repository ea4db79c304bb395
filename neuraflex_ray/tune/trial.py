"""One sweep trial: a Ray Train run inside a Ray Tune trial, and where a restarted trial reads from.

Each start of a trial (first, after --resume, after PBT paused it or told it to continue from another
trial's checkpoint) is its own Train run under trials/<id>/start-<n>; every evaluation it reports is
forwarded to Tune, with Tune's own copy of its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

from neuraflex_ray.config import config_from_raw, set_dotted
from neuraflex_ray.tune.config import Sweep

# Sweeps started before Tune held copies reported a pointer file to the Train checkpoint instead;
# `--resume` of such a sweep still follows it.
POINTER = "train_checkpoint.json"


# --------------------------------------------------------------------------------------------
# One trial: a Train run inside a Tune trial
# --------------------------------------------------------------------------------------------
#
# Where a restart reads from. A trial restarts from a checkpoint after --resume, after PBT paused it,
# and after PBT told it to continue from another trial's (the donor's) checkpoint. The donor keeps
# training meanwhile, and its Train run keeps only `train.num_to_keep` checkpoints: a path into the
# donor's Train run can be deleted between the exploit and the moment the restarted trial's workers
# open it (that race lost trials at random). So every checkpoint a trial reports to Tune is Tune's own
# copy, under <sweep>/tune/<trial>/checkpoint_*, and restarts read only that copy:
#   - Tune copies the Train checkpoint while Train's retention is held back: the Train controller's
#     report callback (below) waits until Tune has persisted the checkpoint, and Train deletes old
#     checkpoints only when it registers the next one, in the same controller, after that callback.
#   - Tune deletes its copies only by its own CheckpointConfig (`run.py`): PBT keeps them all, since
#     the donor's copy it hands out may be several reports old; the other schedulers keep the latest,
#     the only one a trial's own restart reads.
# The price is one more copy of each reported checkpoint (Tune's), not a pointer file.


class RestoreError(RuntimeError):
    """A trial could not continue from the checkpoint Tune handed it; one line names donor, path, cause."""


def error_line(err: BaseException) -> str:
    """One line for a table: the innermost cause's type and the last line of its message."""
    cause = getattr(err, "cause", None) or err
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


@dataclasses.dataclass
class RestorePoint:
    """The checkpoint a trial's start continues from, and whose it is."""

    path: str  # a Train checkpoint directory (Tune's copy of it)
    donor: str  # the trial that reported it (this trial's own id unless PBT exploited another)
    step: int

    def describe(self, trial_id: str) -> str:
        whose = "its own checkpoint" if self.donor == trial_id else f"trial {self.donor}'s checkpoint"
        return f"trial {trial_id} continuing from {whose} {self.path} (step {self.step})"


def restore_point(trial_id: str, checkpoint: Any) -> RestorePoint:
    """Where Tune's checkpoint `checkpoint` (`tune.get_checkpoint()`) restarts trial `trial_id` from.

    Tune's copies live in <sweep>/tune/<donor trial>/checkpoint_*, so the donor is the parent folder.
    Raises RestoreError, one line naming the donor, the path and the cause, when it cannot be read.
    """
    from neuraflex_ray.checkpoint import read_checkpoint_state

    path = Path(checkpoint.path)
    point = RestorePoint(path=str(path), donor=path.parent.name, step=-1)
    try:
        if (path / POINTER).is_file():  # a sweep started by older code: the Train checkpoint it named
            point.path = json.loads((path / POINTER).read_text())["path"]
        point.step = int(read_checkpoint_state(point.path)["step"])
    except Exception as e:  # noqa: BLE001 - every cause is reported, in one line, as the trial's error
        raise RestoreError(f"{point.describe(trial_id)}: {error_line(e)}") from e
    return point


def _forward_reports_callback(reports: Any, persisted: Any) -> Any:
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        """Runs in the Train controller: hands rank 0's report, and its checkpoint, to the trial.

        Ray's TuneReportCallback forwards metrics only. Forwarding the checkpoint as well gives Tune a
        copy per report, which is what --resume and PBT restore from. With a checkpoint, this waits
        until the trial says Tune has persisted its copy: Train's retention deletes old checkpoints when
        the controller registers the next report, which cannot happen while this callback runs.
        """

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            reports.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint.path if checkpoint else None})
            if checkpoint is not None:
                persisted.get()

    return ForwardReports()


def _lineage(trial_dir: Path, start: int, point: RestorePoint, params: dict[str, Any]) -> None:
    """Where each start came from: under PBT a trial continues from another trial's checkpoint, and this
    file is the trial's lineage (which checkpoint, whose, at which step, with which new params)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "lineage.jsonl", "a") as f:
        f.write(json.dumps({"start": start, "restored_from": point.path, "donor": point.donor, "step": point.step,
                            "params": params}) + "\n")


def run_trial(params: dict[str, Any], sweep: Sweep) -> None:
    """Tune's trainable: build this trial's config, train it, forward each evaluation to Tune."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from neuraflex_ray.train.driver import train

    trial_id = tune.get_context().get_trial_id()
    trial_dir = sweep.dir / "trials" / trial_id
    # Each start of a trial (first, after --resume, after a PBT exploit) is its own Train run, so Train
    # never restores a stale run of its own over the checkpoint Tune hands us.
    start = len(list(trial_dir.glob("start-*"))) if trial_dir.is_dir() else 0
    raw = sweep.trial_raw(params)
    raw = {**raw, "name": f"start-{start}", "output_dir": str(trial_dir)}
    point = None
    held = tune.get_checkpoint()
    if held is not None:
        point = restore_point(trial_id, held)
        _lineage(trial_dir, start, point, params)
        if point.step >= sweep.base.train.max_steps:
            # PBT may perturb at the final report and restart the trial from a finished checkpoint:
            # there is nothing left to train, and the trial's last report stands.
            print(f"[tune] trial {trial_id}: {point.path} is already at train.max_steps; nothing to train", flush=True)
            return
        raw = set_dotted(raw, "train.resume_from", point.path)
    cfg = config_from_raw(raw)
    if cfg.finetune.from_export:  # a fine-tuning sweep: the model is the export's (finetune/setup.py)
        from neuraflex_ray.finetune.setup import finetune_config

        cfg = finetune_config(cfg)

    # Lockstep: one report in flight, so Tune stops a trial promptly; `persisted` answers each checkpoint.
    reports: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
    persisted: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["out"] = train(cfg, callbacks=[_forward_reports_callback(reports, persisted)],
                                   tensorboard_dir=sweep.dir / "tensorboard" / trial_id)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"train-{trial_id}", daemon=True)
    worker.start()
    reported = 0
    while worker.is_alive() or not reports.empty():
        try:
            item = reports.get(timeout=1.0)
        except Empty:
            continue
        if item["checkpoint"] is None:
            tune.report(item["metrics"])
        else:  # Tune copies the directory into its own storage before report returns
            tune.report(item["metrics"], checkpoint=tune.Checkpoint.from_directory(item["checkpoint"]))
            persisted.put(True)
        reported += 1
    if "error" in outcome:
        if point is not None and reported == 0:  # the table names where this start came from
            raise RestoreError(f"{point.describe(trial_id)} failed before its first report: "
                               f"{error_line(outcome['error'])}") from outcome["error"]
        raise outcome["error"]
