"""Torn and corrupt inputs: a checkpoint a kill left half-written is skipped on resume (and the console
says so), and a truncated Parquet shard, a corrupt EDF or HDF5 recording or a JSON line that is not
JSON is one error naming the file (and the line), never a hang or a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuraflex_ray.checkpoint import read_checkpoint_state
from neuraflex_ray.config import ModalitySpec, RecordingSpec
from neuraflex_ray.train.driver import RAY_RUN_NAME, checkpoints_root, latest_checkpoint
from pipelines.errors import BadInput
from pipelines.neuro_sources import read_source, recording_source
from pipelines.shards import load_splits

REPO = Path(__file__).resolve().parents[1]
LEGACY_CKPT = REPO / "tests" / "fixtures" / "legacy" / "moe" / "checkpoint"


def test_a_half_written_checkpoint_is_skipped_on_resume_and_the_console_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    root = checkpoints_root(run) / RAY_RUN_NAME
    whole = root / "checkpoint_2026-12-01_10-00-00.000000"
    shutil.copytree(LEGACY_CKPT, whole)
    torn = root / "checkpoint_2026-12-01_10-05-00.000000"  # newer: a kill mid-save left it without its experts
    shutil.copytree(LEGACY_CKPT, torn)
    for f in sorted((torn / "ds").glob("layer_*"))[1:]:
        f.unlink()
    assert latest_checkpoint(run, announce=True) == whole
    out = capsys.readouterr().out
    assert f"[ckpt] skipping {torn}: incomplete" in out and f"resuming from {whole.name}" in out
    assert read_checkpoint_state(whole)["step"] == 2


def test_a_truncated_parquet_shard_is_one_error_naming_it(tmp_path):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    for s in ("train/train-00000.parquet", "val/val-00000.parquet"):
        pq.write_table(pa.table({"tokens": [[1, 2, 3]] * 100}), out / s)
    (out / "manifest.json").write_text('{"train_shards": ["train/train-00000.parquet"], '
                                       '"val_shards": ["val/val-00000.parquet"]}')
    shard = out / "train" / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BadInput, match=r"train-00000\.parquet: not a complete Parquet file.*delete .*manifest\.json"):
        load_splits(str(out), "x")


@pytest.mark.parametrize("suffix", [".edf", ".h5"])
def test_a_corrupt_recording_names_the_file(tmp_path, suffix):
    path = tmp_path / f"rec{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    spec = RecordingSpec(path=str(path), modality="eeg", rate=0.0)
    with pytest.raises(BadInput, match=rf"rec\{suffix}: cannot be read as .*fix:"):
        read_source(recording_source(spec, 0), ModalitySpec(rate=128.0, max_channels=64))


def test_a_jsonl_line_that_is_not_json_is_one_line_on_the_console(tmp_path, ray_session):
    import ray

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n')
    env = {**{k: v for k, v in os.environ.items() if k != "NEURAFLEX_VERBOSE"},
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    r = subprocess.run([sys.executable, "-m", "neuraflex_ray", "data", "--config", "jobs/configs/moe_debug.yaml",
                        f"data.source={corpus}", f"data.output_dir={tmp_path / 'out'}", f"output_dir={tmp_path / 'runs'}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "docs.jsonl, line 3: not JSON" in errors[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
