"""A model family from outside the package (tests/toy_family.py) runs through the same commands as ours.

Nothing outside tests/ knows it: the job YAML names it by import path, the command line trains it on
2 Ray Train workers with FSDP2, exports the checkpoint and evaluates the export, each through the
family's own methods.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from neuraflex_ray.checkpoint import read_checkpoint_state, read_export_meta
from neuraflex_ray.cli import main
from neuraflex_ray.config import ConfigError, get_family, load_config

TOY = "tests.toy_family:FAMILY"


def write_config(tmp: Path, **train) -> Path:
    raw = {"name": "toy", "output_dir": str(tmp / "runs"), "model_type": TOY,
           "model": {"hidden": 32}, "data": {"output_dir": str(tmp / "data")},
           "train": {"strategy": "fsdp", "num_workers": 2, "micro_batch_size": 16, "max_steps": 60, "lr": 1e-2,
                     "warmup_steps": 2, "log_every": 20, "eval_every": 30, "eval_batches": 2, "checkpoint_every": 30,
                     "max_failures": 0, **train}}
    path = tmp / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(capsys, *args: str) -> dict:
    """The command's JSON result: the last top-level `{ ... }` block on stdout (progress lines come first)."""
    assert main(list(args)) == 0
    lines = capsys.readouterr().out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    end = next(j for j in range(start, len(lines)) if lines[j] == "}")
    return json.loads("\n".join(lines[start:end + 1]))


def test_a_family_named_by_import_path_trains_exports_and_evaluates(ray_session, tmp_path, capsys):
    config = str(write_config(tmp_path))
    trained = run_cli(capsys, "train", "--config", config)
    assert trained["steps"] == 60 and trained["workers"] == 2 and trained["strategy"] == "fsdp"
    assert read_checkpoint_state(trained["checkpoint"])["model_type"] == TOY
    assert math.isfinite(trained["final_loss"]) and math.isfinite(trained["val_loss"])

    exported = run_cli(capsys, "export", "--config", config)
    assert read_export_meta(exported["export"])["model_type"] == TOY

    ev = run_cli(capsys, "eval", "--config", config)
    assert ev["val_windows"] > 0
    # It learned something the baselines fitted on training data do not know: the series' local shape.
    assert ev["val_mse"] < ev["train_mean_mse"] and ev["val_mse"] < ev["persistence_mse"], ev


def test_a_family_that_cannot_be_imported_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model_type='tests.no_such_family:FAMILY': cannot import"):
        load_config(None, ["model_type=tests.no_such_family:FAMILY"])
    with pytest.raises(ConfigError, match="model_type: unknown model type 'nope'"):
        load_config(None, ["model_type=nope"])


def test_a_capability_the_family_lacks_is_named_in_one_line():
    with pytest.raises(ConfigError, match=rf"model_type={TOY}: this family has no Serve deployment"):
        get_family(TOY).load_served("toy", Path("."), None)
