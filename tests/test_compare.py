"""`neuraflex-ray compare` (neuraflex_ray/interpret/compare.py): two LM exports read the same held-out
tokens; every pair of sites gets a CKA, same-named sites every measure, and the site table finds itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.stats import ortho_group

from neuraflex_ray.cli import main
from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.interpret.compare import compare_activations, identify_sites
from neuraflex_ray.interpret.similarity import cka_matrix, linear_cka
from tests.test_activations import lm_with_dataset


def test_the_cka_table_equals_pairwise_cka_and_identifies_transformed_sites():
    rng = np.random.default_rng(0)
    a = {f"s{i}": rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16)) for i in range(4)}
    rot = ortho_group.rvs(16, random_state=1)
    b = {name: 3.0 * x @ rot + 5.0 for name, x in a.items()}  # rotated, scaled and shifted copies
    table = compare_activations(a, b)
    m = np.asarray(table["cka_matrix"])
    assert np.allclose(m, cka_matrix(list(a.values()), list(b.values())))
    assert m[1, 2] == pytest.approx(linear_cka(a["s1"], b["s2"]), abs=1e-12)
    assert np.allclose(np.diag(m), 1.0) and all(abs(v["procrustes"]) < 1e-9 for v in table["sites"].values())
    assert identify_sites(table, cca_matrix=np.eye(4).tolist()) == {"cka": 1.0, "chance": 0.25, "cca": 1.0}


def test_the_cli_compares_every_site_of_two_exports(tmp_path_factory, ray_session, tmp_path):
    root = tmp_path_factory.mktemp("cmp")
    a = lm_with_dataset(root, documents=6, chars=2000)
    b = tmp_path / "b"  # the same architecture and tokenizer, other initial weights
    scratch_lm_export(tmp_path / "b0", vocab_size=512, seed=1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      num_experts=4, expert_ffn_dim=64, dense_ffn_dim=128, max_seq_len=64)
    shutil.copytree(a, b)
    shutil.copy(tmp_path / "b0" / "model.safetensors", b / "model.safetensors")
    assert main(["compare", str(a), str(b), "--tokens", "256", "--out", str(tmp_path / "out")]) == 0
    table = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert table["sites_a"] == table["sites_b"] and len(table["sites_a"]) == 8  # attn, ffn, resid, moe_in x 2
    assert table["tokens"] == 256 and (tmp_path / "out" / "compare.png").stat().st_size > 0
    assert set(table["sites"]["resid_1"]) >= {"cka", "rsa", "rsa_ceiling_a", "procrustes", "svcca", "cca"}
    assert main(["compare", str(a), str(a), "--site", "resid_0", "--site", "resid_1", "--tokens", "256",
                 "--out", str(tmp_path / "self")]) == 0
    same = json.loads((tmp_path / "self" / "compare.json").read_text())
    assert np.allclose(np.diag(same["cka_matrix"]), 1.0) and same["identify"]["cka"] == 1.0
    assert main(["compare", str(a), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
