"""Checkpoints and exports written before the family registry (tests/fixtures/legacy/, made by
tests/legacy_fixtures.py at commit 213bb7f) still read, consolidate, serve, export and resume today."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neuraflex_ray.checkpoint import (
    consolidate,
    export_checkpoint,
    is_complete,
    load_exported,
    read_checkpoint_state,
    read_export_meta,
)
from neuraflex_ray.config import load_config
from neuraflex_ray.serving.local import generate_text
from neuraflex_ray.serving.neuro import NeuroPredictor, NeuroRequest
from neuraflex_ray.train.driver import train
from tests.legacy_fixtures import FIXTURES, moe_overrides, neurofm_overrides

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"moe": ("moe_lm", "deepspeed"), "neurofm": ("neurofm", "fsdp")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_legacy_checkpoint_consolidates_to_the_weights_of_its_export(family):
    ckpt, export = FIXTURES / family / "checkpoint", FIXTURES / family / "export"
    state = read_checkpoint_state(ckpt)
    assert (state["model_type"], state["strategy"], state["world_size"], state["step"]) == (*FAMILIES[family], 2, 2)
    assert is_complete(ckpt)
    weights, model_cfg = consolidate(ckpt)
    assert type(model_cfg).__name__ == type(load_exported(export)[0].cfg).__name__
    exported = load_file(str(export / "model.safetensors"))  # a tied weight is stored once
    assert set(exported) <= set(weights)
    for name, tensor in exported.items():
        assert torch.equal(weights[name], tensor), name


def test_a_legacy_lm_export_generates_with_its_tokenizer_and_calibration():
    export = FIXTURES / "moe" / "export"
    assert read_export_meta(export)["calibration"]["temperature"] > 0
    text = generate_text(export, "the model routes", max_new_tokens=6)
    assert isinstance(text, str) and text


def test_a_legacy_neurofm_export_embeds_a_window():
    model, meta = load_exported(FIXTURES / "neurofm" / "export")
    predictor = NeuroPredictor(model, meta)
    t = np.arange(int(2.5 * 128)) / 128
    eeg = np.stack([np.sin(2 * np.pi * f * t) for f in (3.0, 7.0, 11.0)]).astype(np.float32)
    req = NeuroRequest.model_validate({"streams": [{"modality": "eeg", "sampling_rate": 128.0, "data": eeg.tolist()}]})
    out = predictor.embed(req)
    assert len(out["embedding"]) == model.cfg.dim and np.isfinite(out["embedding"]).all()


@pytest.fixture
def legacy_copy(tmp_path):
    """The fixture checkpoints copied out of the repository: a run must never write into tests/fixtures."""
    def copy(family: str) -> Path:
        return Path(shutil.copytree(FIXTURES / family / "checkpoint", tmp_path / f"{family}-checkpoint"))
    return copy


def test_a_legacy_deepspeed_checkpoint_resumes_and_exports(ray_session, tmp_path, legacy_copy):
    ckpt = legacy_copy("moe")
    tokenizer = FIXTURES / "moe" / "export" / "tokenizer.json"
    cfg = load_config(REPO / "jobs" / "configs" / "moe_debug.yaml",
                      [*moe_overrides(tmp_path, tokenizer=str(tokenizer)), "train.max_steps=4", "train.eval_every=4",
                       "train.checkpoint_every=4", f"train.resume_from={ckpt}"])
    out = train(cfg)
    assert out["restored_from_step"] == 2 and out["steps"] == 4
    export = export_checkpoint(ckpt, cfg.data.output_dir, tmp_path / "export")
    assert read_export_meta(export)["model_type"] == "moe_lm" and (export / "tokenizer.json").is_file()


def test_a_legacy_fsdp_checkpoint_resumes(ray_session, tmp_path, legacy_copy):
    ckpt = legacy_copy("neurofm")
    cfg = load_config(REPO / "jobs" / "configs" / "neurofm_debug.yaml",
                      [*neurofm_overrides(tmp_path), "train.max_steps=4", "train.eval_every=4",
                       "train.checkpoint_every=4", f"train.resume_from={ckpt}"])
    out = train(cfg)
    assert out["restored_from_step"] == 2 and out["steps"] == 4


def test_a_sweep_checkpoint_from_before_tune_held_copies_restores_through_its_pointer(tmp_path):
    """Sweeps started before tune/trial.py kept copies reported a pointer file; --resume follows it."""
    import json
    from types import SimpleNamespace

    from neuraflex_ray.tune.trial import POINTER, restore_point

    tune_ckpt = tmp_path / "tune" / "t_00001" / "checkpoint_000003"
    tune_ckpt.mkdir(parents=True)
    (tune_ckpt / POINTER).write_text(json.dumps({"path": str(FIXTURES / "moe" / "checkpoint")}))
    point = restore_point("t_00000", SimpleNamespace(path=str(tune_ckpt)))
    assert (point.path, point.donor, point.step) == (str(FIXTURES / "moe" / "checkpoint"), "t_00001", 2)
