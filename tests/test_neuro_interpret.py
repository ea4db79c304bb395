"""NeuroFM's interpretability hooks (families/neurofm/interpret.py): the Ray Data activations job writes
what an in-process forward gives at the latent tokens, and splicing an identity SAE there leaves the
held-out masked-reconstruction and forecast losses unchanged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraflex_ray.checkpoint import export_family, load_exported
from neuraflex_ray.config import load_config
from neuraflex_ray.families.neurofm.scratch import SCRATCH_NEURO_MANIFEST, scratch_neurofm_export
from neuraflex_ray.interpret.activations import collect_activations, read_activations
from neuraflex_ray.interpret.sae_eval import identity_sae, spliced_loss_score
from neuraflex_ray.models.neurofm import window_inputs
from pipelines.timeseries import read_series
from tests.test_finetune_neurofm import recordings


@pytest.fixture(scope="module")
def export(tmp_path_factory, ray_session) -> Path:
    """The scratch export, its config.json naming a real dataset of its layout (synthetic EEG + ECG)."""
    tmp = tmp_path_factory.mktemp("neuro-interp")
    out = scratch_neurofm_export(tmp / "export")
    cfg = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "data.samples=[]",
                             f"data.recordings={recordings(tmp)}", "data.modalities={eeg: {rate: 32, max_channels: 3}, "
                             "ecg: {rate: 16, max_channels: 1}}", "data.context_s=2.0", "data.horizons_s=[0.25, 0.5]",
                             "data.hop_s=1.0", f"data.output_dir={tmp / 'data'}"])
    data = dataclasses.replace(cfg.data, channel_table=dict(SCRATCH_NEURO_MANIFEST["channel_ids"]))
    export_family(out).build_data(data)
    meta = json.loads((out / "config.json").read_text())
    meta["data"] = {**meta["data"], "output_dir": str(tmp / "data")}
    (out / "config.json").write_text(json.dumps(meta))
    return out


def test_the_ray_data_job_writes_the_latent_tokens_of_an_in_process_forward(export, tmp_path):
    manifest = collect_activations(export, "latents", "train", tmp_path / "a", max_blocks=20, shard_blocks=8)
    got = read_activations(tmp_path / "a")
    model, meta = load_exported(export)
    arrays, recs, _ = read_series(meta["data"]["output_dir"], "train")
    n = model.cfg.context_patches
    sub = {m: dataclasses.replace(a, x=a.x[:20], chan=a.chan[:20], present=a.present[:20]) for m, a in arrays.items()}
    inputs = {m: dataclasses.replace(w, x=w.x[..., :n * model.patch_len[m]]) for m, w in window_inputs(sub, slice(None)).items()}
    with torch.no_grad():
        want = model.eval()(inputs, decode=False).latents  # [20, L, d]
    lat = model.cfg.n_latents
    assert manifest["rows"] == 20 * lat and manifest["width"] == model.cfg.dim
    np.testing.assert_allclose(got["activation"], want.reshape(20 * lat, -1).numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(got["block"], np.repeat(np.arange(20), lat)) and got["position"].max() == lat - 1
    assert set(got["recording"]) <= set(recs.tolist()) and set(got["modalities"]) <= {"ecg", "eeg", "ecg+eeg"}


def test_splicing_an_identity_sae_at_the_latents_leaves_both_losses_unchanged(export):
    model, meta = load_exported(export)
    family = export_family(export)
    site = family.activation_sites(model)["latents"]
    losses = family.spliced_losses(model, meta)
    sae = identity_sae(model.cfg.dim)
    for name in ("recon", "forecast"):
        out = spliced_loss_score(losses[name], site, sae, name)
        assert out[f"{name}_sae"] == pytest.approx(out[f"{name}_clean"], rel=1e-5)
        if name == "recon":  # the untrained forecast is persistence whatever the latents say (its heads start at 0)
            assert out["recon_zero"] != pytest.approx(out["recon_clean"], rel=1e-3)


def test_compare_reads_the_same_windows_through_two_neurofm_exports(export, tmp_path):
    """The family's site outputs feed `compare` as an LM's do: an export against itself is CKA 1 at every
    site and identifies every site; another seed reads A's windows; a model without A's channels is refused."""
    from neuraflex_ray.config import ConfigError
    from neuraflex_ray.interpret.compare import compare_exports

    same = compare_exports(export, export, tmp_path / "same", tokens=128)
    assert same["tokens"] == 128 and set(same["sites_a"]) >= {"latents", "cross_0", "backbone_0"}
    assert np.allclose(np.diag(same["cka_matrix"]), 1.0, atol=1e-6) and same["identify"]["cka"] == 1.0
    other = scratch_neurofm_export(tmp_path / "seed1", seed=1)
    meta = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**meta, "data": json.loads((export / "config.json").read_text())["data"]}))
    table = compare_exports(export, other, tmp_path / "seeds", sites=["latents", "backbone_0"], tokens=128)
    assert table["sites_a"] == ["latents", "backbone_0"] and all(np.isfinite(np.asarray(table["cka_matrix"])).ravel())
    assert (tmp_path / "seeds" / "compare.png").stat().st_size > 0
    meta["data"] = {**json.loads((export / "config.json").read_text())["data"], "channel_ids": {}}
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="another id"):
        compare_exports(export, other, tmp_path / "refused", tokens=128)
