"""Activations at named sites (neuraflex_ray/interpret/activations.py): the Ray Data job writes what an
in-process forward gives, and the last residual site is what the output norm reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraflex_ray.checkpoint import export_family, load_exported
from neuraflex_ray.cli import main
from neuraflex_ray.config import ConfigError
from neuraflex_ray.config.lm import DataConfig
from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.interpret.activations import collect_activations, lm_activations, read_activations, sites_of
from pipelines.text import build_text_dataset, load_text_datasets, read_blocks


def lm_with_dataset(root: Path, documents: int, chars: int) -> Path:
    """A scratch LM export whose config.json names a real dataset (the first `chars` characters of
    `documents` email/*.py files of the standard library) tokenized with its tokenizer."""
    out = scratch_lm_export(root / "export", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4,
                            expert_ffn_dim=64, dense_ffn_dim=128, max_seq_len=64)
    docs = root / "docs"
    docs.mkdir()
    for f in sorted((Path(os.__file__).parent / "email").glob("*.py"))[:documents]:
        (docs / f"{f.stem}.txt").write_text(f.read_text(errors="replace")[:chars])
    build_text_dataset(DataConfig(source=str(docs), tokenizer=str(out / "tokenizer.json"), seq_len=32,
                                  val_fraction=0.2, output_dir=str(root / "data")))
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "data": {"output_dir": str(root / "data")}}))
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory, ray_session) -> Path:
    return lm_with_dataset(tmp_path_factory.mktemp("acts"), documents=12, chars=3000)


def test_the_ray_data_job_writes_the_in_process_activations(export, tmp_path):
    assert main(["activations", "--export", str(export), "--site", "resid_1", "--out", str(tmp_path / "a"),
                 "--max-blocks", "40"]) == 0
    got = read_activations(tmp_path / "a")
    model, meta = load_exported(export)
    blocks = read_blocks(load_text_datasets(meta["data"]["output_dir"])[0])[:40]
    want = lm_activations(model, sites_of(export_family(export), model, ["resid_1"]), blocks)["resid_1"]
    np.testing.assert_allclose(got["activation"], want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got["token"], blocks[:, :-1].reshape(-1))
    assert np.array_equal(got["block"], np.repeat(np.arange(40), 32)) and got["position"].max() == 31
    # resid_1 is the last block's output: the output norm of it is the hidden state the LM head reads
    with torch.no_grad():
        hidden, _ = model.hidden_states(torch.from_numpy(blocks[:, :-1].astype(np.int64)))
        normed = model.norm(torch.from_numpy(want).view(40, 32, -1))
    torch.testing.assert_close(normed, hidden, rtol=1e-4, atol=1e-4)


def test_every_sublayer_is_a_site_and_an_unknown_one_names_them(export, tmp_path):
    model, _ = load_exported(export)
    sites = export_family(export).activation_sites(model)
    assert {"attn_0", "ffn_0", "resid_0", "attn_1", "ffn_1", "resid_1"} <= set(sites)
    assert any(name.startswith("moe_in_") for name in sites)
    with pytest.raises(ConfigError, match="resid_0"):
        collect_activations(export, "resid_9", "train", tmp_path / "x")
    assert not (tmp_path / "x").exists()
