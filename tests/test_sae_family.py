"""A TopK SAE trained on an LM's activations as a model family (`model_type: sae`): `neuraflex-ray train`
(Ray Train, FSDP2 on 2 workers), `export` and `eval` on the same commands as any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.cli import main
from neuraflex_ray.interpret.activations import collect_activations
from tests.test_activations import lm_with_dataset

CONFIG = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "sae_debug.yaml")


@pytest.fixture(scope="module")
def activations(tmp_path_factory, ray_session) -> Path:

    root = tmp_path_factory.mktemp("sae")
    lm = lm_with_dataset(root, documents=16, chars=4000)
    out = root / "acts"
    collect_activations(lm, "resid_1", "train", out, max_blocks=240)
    return out


def test_an_sae_trains_exports_and_evaluates_like_any_model(activations, tmp_path, capsys):
    common = ["--config", CONFIG, f"output_dir={tmp_path / 'runs'}", f"data.activations={activations}",
              f"data.output_dir={tmp_path / 'data'}", "model.expansion=2", "model.k=8", "model.dead_after=10",
              "train.micro_batch_size=256", "train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=20",
              "train.log_every=10"]
    assert main(["train", *common]) == 0
    assert main(["export", *common]) == 0
    capsys.readouterr()
    assert main(["eval", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["explained_variance"] <= 1 and 0 < result["l0"] <= 8 and 0 <= result["dead_frac"] < 1
    assert result["d_in"] == 64 and result["n_latents"] == 128 and result["pca_components"] == round(result["l0"])
    assert result["ce_clean"] < result["ce_zero"] and result["ce_sae"] > 0
    assert all(0 <= result[k] <= 1 for k in ("concept_latents", "concept_neurons", "concept_random"))
    report = tmp_path / "runs" / "sae-debug" / "export" / "report"
    assert "## Latents and their top-activating held-out rows" in (report / "features.md").read_text()
    assert (report / "features.png").stat().st_size > 0
    concepts = json.loads((report / "concepts.json").read_text())
    assert len(concepts["per_latent"]["firings"]) == 128 and concepts["tokens"] == result["rows"]
    assert "«" in (report / "features.md").read_text()  # each context marks its token
    sae, meta = load_exported(tmp_path / "runs" / "sae-debug" / "export")
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-4)  # unit rows after every step
    assert meta["activations"]["site"] == "resid_1"
    split = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert len(split["train_mean"]) == 64 and len(sae.cfg.init_b_dec) == 64  # b_dec started at the training mean
