"""The retrieval memory (kNN-LM): a datastore built on Ray Data holds the export's own keys, λ = 0 is the
export exactly, a stored continuation wins, another export's datastore is refused, near-duplicates
merge without changing p_kNN, and held-out scoring keeps its fitting and reported halves apart."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from neuraflex_ray.checkpoint import fingerprint, load_exported
from neuraflex_ray.cli import main
from neuraflex_ray.config import ConfigError
from neuraflex_ray.eval.knn_lm import evaluate_with_datastores
from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.memory.build import build_datastore
from neuraflex_ray.memory.config import DatastoreConfig
from neuraflex_ray.memory.dedup import merge_near_duplicates
from neuraflex_ray.memory.fit import StoreRows, mixed_target_log_probs
from neuraflex_ray.memory.heldout import document_halves, held_out
from neuraflex_ray.memory.keys import block_keys, read_keys
from neuraflex_ray.memory.mixing import Gate, knn_log_probs, mix_log_probs, nearest
from neuraflex_ray.memory.store import Datastore, Neighbours
from pipelines.text import load_text_datasets, load_tokenizer, read_blocks

CFG = DatastoreConfig(k=8, shard_blocks=8, actors=2, pq_m=8, recall_queries=64)
SPLIT = {"val_fraction": 0.25, "min_val_documents": 8}


def corpus(root: Path, package: str) -> Path:
    """One document per standard-library file of `package`, its first 2,500 characters (a real corpus
    that needs no download)."""
    root.mkdir(parents=True)
    for f in sorted((Path(os.__file__).parent / package).glob("*.py"))[:40]:
        (root / f"{f.stem}.txt").write_text(f.read_text(errors="replace")[:2500])
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return scratch_lm_export(tmp_path_factory.mktemp("lm") / "export", vocab_size=512, dim=64, n_layers=2, n_heads=4,
                             n_kv_heads=2, num_experts=4, expert_ffn_dim=64, dense_ffn_dim=128, max_seq_len=64)


@pytest.fixture(scope="module")
def stores(export, tmp_path_factory, ray_session) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    out = {"email": root / "email", "asyncio": root / "asyncio"}
    build_datastore(export, str(corpus(root / "c-email", "email")), out["email"], CFG, SPLIT)
    args = ["datastore", "build", "--export", str(export), "--corpus", str(corpus(root / "c-asyncio", "asyncio")), "--out",
            str(out["asyncio"]), "--val-fraction", "0.25", "--min-val-documents", "4", "k=8",
            "shard_blocks=8", "pq_m=8", "recall_queries=64"]
    assert main(args) == 0
    return out


def test_the_ray_data_build_holds_the_exports_own_keys(export, stores):
    store = Datastore(stores["email"], export_dir=export)
    m = store.manifest
    shards = [read_keys(store.path / s) for s in m["shards"]]
    assert len(shards) > 2  # several shards, written by the actor pool
    keys = np.concatenate([s["key"] for s in shards])
    model, _ = load_exported(export)
    train, _, _ = load_text_datasets(str(store.path / m["text"]))
    blocks = read_blocks(train)
    expected, values = block_keys(model, blocks)
    np.testing.assert_allclose(keys, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.concatenate([s["value"] for s in shards]), values)
    assert np.array_equal(np.concatenate([s["position"] for s in shards]), np.arange(len(values)))
    assert m["tokens"] == m["entries"] == len(values) == blocks.shape[0] * (blocks.shape[1] - 1) and m["deduplicated"] == 0
    for kind in ("flat", "ivfpq", "hnsw"):
        assert faiss.read_index(str(store.path / m["index"][kind]["file"])).ntotal == len(values)
    assert m["index"]["ivfpq"]["bytes"] < m["index"]["flat"]["bytes"] / 4  # 8 bytes per key instead of 256
    assert 0 < m["index"]["ivfpq"]["recall_at_k"] <= 1 and 0 < m["index"]["hnsw"]["recall_at_k"] <= 1
    exact = store.search(expected[:5])
    assert np.all(exact.dist[:, 0] < 1e-3) and np.array_equal(exact.values[:, 0], values[:5])  # each key finds itself


def test_lambda_zero_is_the_export_exactly(export, stores):
    model, _ = load_exported(export)
    store = Datastore(stores["email"], export_dir=export)
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        h, _ = model.hidden_states(ids)
        lm = torch.log_softmax(model.logits(h)[0].double(), -1)
    n = store.search(h[0].numpy())
    off = Gate.fixed(0.0, 1.0)
    assert torch.equal(mix_log_probs(lm, [(knn_log_probs(n, 1.0, lm.shape[1]), off.logit(nearest(n)))]), lm)
    targets = ids[0, 1:].numpy()
    lm_t = lm[:-1].gather(1, torch.as_tensor(targets)[:, None])[:, 0].numpy()
    rows = StoreRows.of(Neighbours(n.dist[:-1], n.values[:-1], n.counts[:-1]), targets)
    assert np.array_equal(mixed_target_log_probs(lm_t, [rows], [off]), lm_t)
    on = mix_log_probs(lm, [(knn_log_probs(n, 1.0, lm.shape[1]), Gate.fixed(0.5, 1.0).logit(nearest(n)))])
    assert not torch.equal(on, lm) and torch.allclose(on.exp().sum(1), torch.ones(len(on), dtype=torch.float64))


def test_a_hand_made_datastore_that_holds_the_continuation_makes_it_the_top_token(export, tmp_path):
    model, _ = load_exported(export)
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        h, _ = model.hidden_states(prompt)
        lm = torch.log_softmax(model.logits(h)[0, -1].double(), -1)
    target = int(lm.argmin())  # the continuation the export finds least likely
    rng = np.random.default_rng(0)
    keys = np.concatenate([h[0, -1:].numpy(), rng.normal(size=(63, h.shape[-1])).astype(np.float32) * 3])
    values = np.concatenate([[target], rng.integers(0, lm.shape[0], 63)]).astype(np.int32)
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    faiss.write_index(index, str(tmp_path / "flat.faiss"))
    np.save(tmp_path / "values.npy", values)
    np.save(tmp_path / "counts.npy", np.ones(len(values), np.int32))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "export": str(export), "export_fingerprint": fingerprint(export), "corpus": "by hand",
        "index": {"flat": {"file": "flat.faiss"}}, "config": {"k": 4}}))
    store = Datastore(tmp_path, export_dir=export)
    n = store.search(h[0, -1:].numpy())
    mixed = mix_log_probs(lm[None], [(knn_log_probs(n, 1.0, lm.shape[0]), Gate.fixed(0.5, 1.0).logit(nearest(n)))])
    assert int(mixed[0].argmax()) == target != int(lm.argmax())


def test_a_datastore_built_by_another_export_is_refused_naming_both(export, stores, tmp_path):
    other = scratch_lm_export(tmp_path / "other", vocab_size=512, seed=1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              num_experts=4, expert_ffn_dim=64, dense_ffn_dim=128, max_seq_len=64)
    with pytest.raises(ConfigError) as e:
        Datastore(stores["email"], export_dir=other)
    msg = str(e.value)
    assert str(export) in msg and str(other) in msg and fingerprint(export) in msg and fingerprint(other) in msg


def test_near_duplicates_merge_into_one_entry_that_keeps_their_weight():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 16)).astype(np.float32)
    keys[50] = keys[10] + 1e-4  # same next token: merged into 10
    keys[120] = keys[10] + 2e-4  # merged too (its nearest earlier twin may be 10 or 50: the chain ends at 10)
    keys[60] = keys[10] + 1e-4  # a near-copy of the key with another next token: kept
    values = rng.integers(0, 5, 200).astype(np.int32)
    values[[10, 50, 120]], values[60] = 3, 4
    keep, counts = merge_near_duplicates(keys, values, max_msd=1e-6)
    assert not keep[50] and not keep[120] and keep[10] and keep[60] and counts[10] == 3
    assert keep.sum() == 198 and counts[keep].sum() == 200
    # A query sees the same p_kNN from the merged store: the survivor's count carries the weight.
    q = keys[10:11]
    full, merged = faiss.IndexFlatL2(16), faiss.IndexFlatL2(16)
    full.add(keys)
    merged.add(keys[keep])
    d1, i1 = full.search(q, 12)
    d2, i2 = merged.search(q, 10)
    p1 = knn_log_probs(Neighbours(d1, values[i1].astype(np.int64), np.ones_like(d1)), 1.0, 5)
    p2 = knn_log_probs(Neighbours(d2, values[keep][i2].astype(np.int64), counts[keep][i2].astype(np.float32)), 1.0, 5)
    assert torch.allclose(p1, p2, atol=1e-3)


def test_held_out_scoring_fits_on_one_half_of_the_documents_and_reports_the_other(export, stores):
    result = evaluate_with_datastores(export, {k: str(v) for k, v in stores.items()})
    assert set(result["domains"]) == {"email", "asyncio"} and set(result["mixed_delta"]) == {"email", "asyncio"}
    model, _ = load_exported(export)
    for name, d in result["domains"].items():
        store = Datastore(stores[name], export_dir=export)
        h = held_out(model, store)
        fit, report = document_halves(h.docs)
        assert not np.intersect1d(h.docs[fit], h.docs[report]).size
        assert d["documents"]["fit"] + d["documents"]["report"] == len(np.unique(h.docs))
        assert d["positions"] == int(report.sum())
        base = -h.lm_target[report].sum() / np.log(2) / (report.sum() * h.bytes_per_token)
        assert d["base"]["bpb"] == pytest.approx(base)
        for kind in ("base", "knn", "knn_adaptive", "mixed", "mixed_own_distance"):
            lo, hi = d[kind]["ci95"]
            assert lo <= d[kind]["bpb"] <= hi
            if kind != "base":  # the paired interval of the gain holds the gain
                lo, hi = d[kind]["minus_base_ci95"]
                assert lo <= d[kind]["bpb"] - d["base"]["bpb"] <= hi
    cross = result["gates"].pop("cross")
    assert cross["stores"] == ["email", "asyncio"] and np.array(cross["weights"]).shape == (2, 2)
    for gates in result["gates"].values():
        assert all(np.isfinite(g["temperature"]) and g["temperature"] > 0 for g in gates.values())


def test_bad_datastore_settings_name_the_field(export, tmp_path):
    with pytest.raises(ConfigError, match="nprobes"):
        DatastoreConfig.from_overrides(["nprobes=4"])
    with pytest.raises(ConfigError, match="pq_m=7 must divide the key width 64"):
        build_datastore(export, str(corpus(tmp_path / "c", "email")), tmp_path / "ds", DatastoreConfig(pq_m=7, shard_blocks=8),
                        SPLIT)
    assert not (tmp_path / "ds").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="no manifest.json"):
        Datastore(tmp_path / "nowhere")


# ---- Serve: requests name a datastore as model "<base>+NAME" ------------------------------------------

LM = "neuraflex-moe"
PROMPT = "def parse(self, text):\n    return"


@pytest.fixture(scope="module")
def served(export, stores):
    from openai import OpenAI
    from ray import serve

    from neuraflex_ray.serving.deploy import deploy, free_port

    url = deploy({LM: str(export)}, port=free_port(), num_cpus=0.5, name="knn",
                 datastores={k: str(v) for k, v in stores.items()})
    yield {"url": url, "client": OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}
    # Shut Serve down, proxies included, as test_serve.py does: a later deploy() on another port would
    # otherwise find Serve already listening on this one and wait for an answer that never comes.
    serve.shutdown()


def first_token_logprobs(client, model: str) -> tuple[str, float, dict]:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    return r.choices[0].text, lp.token_logprobs[0], lp.top_logprobs[0]


def test_serve_lists_each_datastore_and_refuses_an_unknown_one(served):
    from openai import NotFoundError

    ids = {m.id for m in served["client"].models.list().data}
    assert ids == {LM, f"{LM}+email", f"{LM}+asyncio"}
    with pytest.raises(NotFoundError, match="no datastore 'nowhere'"):
        served["client"].completions.create(model=f"{LM}+nowhere", prompt="x", max_tokens=1)
    card = served["client"].models.retrieve(f"{LM}+email")
    assert card.model_extra["datastore"]["gate"]["kind"] == "adaptive"


def test_serve_mixes_each_requests_own_datastore_batched_together(served, export, stores):
    from concurrent.futures import ThreadPoolExecutor

    from neuraflex_ray.serving.memory import Memories

    client = served["client"]
    models = [LM, f"{LM}+email", f"{LM}+asyncio"] * 3
    with ThreadPoolExecutor(len(models)) as pool:  # batched in the engine, each row its own store
        together = list(pool.map(lambda m: first_token_logprobs(client, m), models))
    alone = {m: first_token_logprobs(client, m) for m in models[:3]}
    for m, got in zip(models, together, strict=True):
        assert got == alone[m], m  # nobody else in the batch changes a request's distribution
    # The served distribution is the in-process mixture of the export and the store with its built gate.
    model, _ = load_exported(export)
    tok = load_tokenizer(export / "tokenizer.json")
    ids = torch.tensor([tok.encode(PROMPT).ids])
    with torch.no_grad():
        h, _ = model.hidden_states(ids)
        logits = model.logits(h)[0, -1:]
    memories = Memories(export, {k: str(v) for k, v in stores.items()})
    for name in (None, "email", "asyncio"):
        expected = torch.log_softmax(logits.double(), -1)[0] if name is None else memories.mix(name, h[0, -1:], logits)[0]
        _, best, _ = alone[LM if name is None else f"{LM}+{name}"]
        assert best == pytest.approx(float(expected.max()), abs=1e-4), name
    assert len({alone[m][1] for m in models[:3]}) == 3  # three different distributions


def test_serve_streams_the_mixture(served):
    client = served["client"]
    text = client.completions.create(model=f"{LM}+email", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    stream = client.completions.create(model=f"{LM}+email", prompt=PROMPT, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text


def test_a_tune_sweep_scores_trials_on_one_half_and_the_best_on_the_other(export, stores, tmp_path):
    out = tmp_path / "sweep"
    args = ["datastore", "tune", "--export", str(export), "--datastore", str(stores["email"]), "--out", str(out),
            "--trials", "3"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["pareto"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 and all(float(r["bpb"]) > 0 and float(r["ms_per_token"]) > 0 for r in rows)
    assert summary["best_on_fit_half"]["bpb"] == min(float(r["bpb"]) for r in rows)
    assert summary["reported_half"]["knn"] > 0 and (out / "study.db").is_file()
