"""The BLT's byte data (families/blt/data.py): raw bytes in blocks, a byte-level LM's entropies beside
them scored by Ray Data actors, and the same entropies (so the same patches) in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuraflex_ray.checkpoint import load_exported, write_export
from neuraflex_ray.config import ModelConfig
from neuraflex_ray.config.blt import ByteDataConfig
from neuraflex_ray.families.blt.data import build_byte_dataset
from neuraflex_ray.families.blt.entropy import byte_entropies, model_ids
from neuraflex_ray.models.blt_patching import EOS, fit_threshold, mean_patch_bytes, patch_starts
from neuraflex_ray.models.moe_lm import MoELM
from pipelines.text import load_tokenizer

BLOCK = 48


def corpus(root: Path) -> Path:
    words = ["naïve", "café", "routes", "token", "to", "expert", "résumé", "ünïcode", "and", "the", "✓"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=int(rng.integers(10, 40)))) for _ in range(120)]
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"DOC{i:03d} {line}"}) + "\n" for i, line in enumerate(lines)))
    return path


def blocks(out: Path, split: str, column: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.stack(pq.read_table(out / s).column(column).to_numpy(zero_copy_only=False))
                           for s in m[f"{split}_shards"]])


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    """Bytes alone first (that builds the byte-level text dataset), then an untrained byte-level LM on its
    tokenizer scores them: the scores only need to be the model's, not good ones."""
    tmp = tmp_path_factory.mktemp("blt-data")
    cfg = ByteDataConfig(source=str(corpus(tmp)), block_bytes=BLOCK, val_fraction=0.1, min_val_documents=20,
                         output_dir=str(tmp / "bytes"))
    plain = build_byte_dataset(cfg)
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, num_experts=0,
                            dense_ffn_dim=64, max_seq_len=64)
    export = write_export(MoELM(model_cfg).state_dict(), model_cfg, "moe_lm", tmp / "entropy-model",
                          files={"tokenizer.json": tmp / "bytes" / "text" / "tokenizer.json"})
    cfg.entropy_model, cfg.entropy_actors = str(export), 2
    return {"cfg": cfg, "plain": plain, "scored": build_byte_dataset(cfg), "export": export,
            "out": tmp / "bytes", "docs": (tmp / "docs.jsonl").read_text()}


def test_blocks_are_the_documents_raw_bytes(built):
    out, m = built["out"], built["scored"]
    assert m["val_documents"] >= 20 and m["train_blocks"] > 0 and m["val_blocks"] > 0
    for split in ("train", "val"):
        b = blocks(out, split, "bytes")
        assert b.shape[1] == BLOCK + 1 and b.min() >= 0 and b.max() <= EOS
    # Validation blocks are in document order: their bytes, EOS read as a line break, are the documents.
    text = bytes(int(x) if x != EOS else 10 for x in blocks(out, "val", "bytes").ravel()).decode(errors="replace")
    lines = [json.loads(line)["text"] for line in built["docs"].splitlines()]
    whole = [t for t in text.split("\n")[1:-1] if t]  # the first and last pieces may be cut by the blocks
    assert whole and all(t in lines for t in whole)


def test_entropies_from_the_actors_equal_those_of_the_model_in_one_process(built):
    out = built["out"]
    model, _ = load_exported(built["export"])
    to_model = model_ids(load_tokenizer(built["export"] / "tokenizer.json"))
    for split in ("train", "val"):
        raw, scored = blocks(out, split, "bytes"), blocks(out, split, "entropy")
        local = byte_entropies(model, to_model, raw)
        np.testing.assert_allclose(scored, local, rtol=0, atol=1e-5)
        # So the patch boundaries agree: the pipeline's and the one-process ones, at a fitted threshold.
        threshold = fit_threshold(torch.from_numpy(local), 4.0)
        ids = torch.from_numpy(raw.astype(np.int64))
        assert torch.equal(patch_starts(ids, torch.from_numpy(scored), "entropy", threshold=threshold),
                           patch_starts(ids, torch.from_numpy(local), "entropy", threshold=threshold))
        assert abs(mean_patch_bytes(patch_starts(ids, torch.from_numpy(local), "entropy", threshold=threshold)) / 4 - 1) < 0.05
    assert built["scored"]["mean_entropy"]["train"] > 0 and built["scored"]["entropy_model"] == str(built["export"])


def test_a_rebuild_reuses_the_blocks_and_the_entropy_model_is_part_of_the_fingerprint(built, capsys):
    assert build_byte_dataset(built["cfg"]) == built["scored"]
    assert "reusing" in capsys.readouterr().out
    assert built["plain"]["fingerprint"] != built["scored"]["fingerprint"] and not built["plain"]["entropy_model"]
