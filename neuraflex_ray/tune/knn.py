"""A Ray Tune sweep over a retrieval memory's settings: k, λ, the temperature and the index (kind, IVF
cells and probes, HNSW links), with two results per trial, held-out bits/byte and the search's
milliseconds per generated token (what the memory adds to each decode step; Serve searches one query
at a time, and so does the timing).

Trials score the fitting half of the datastore corpus's held-out documents (a sample of its positions,
the same for every trial); OptunaSearch (multi-objective TPE, its study in an SQLite file in the sweep
directory, for optuna-dashboard) proposes them. The trial with the best bits/byte is then scored once on
the reported half, which no trial saw. ASHA has nothing to stop early here: a trial is one evaluation.

    neuraflex-ray datastore tune --export DIR --datastore DIR --out DIR [--trials N]
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from neuraflex_ray.atomic import write_json_atomic
from neuraflex_ray.memory.config import DatastoreConfig
from neuraflex_ray.memory.fit import StoreRows, mixed_target_log_probs
from neuraflex_ray.memory.heldout import GATE_FILE, document_halves, held_out
from neuraflex_ray.memory.index import configure, ivf_nlist, single_index
from neuraflex_ray.memory.mixing import Gate
from neuraflex_ray.memory.store import Datastore, kept_keys

METRICS = ("bpb", "ms_per_token")
FIT_POSITIONS = 4096  # held-out positions each trial scores
TIMED_QUERIES = 128  # searched one at a time for the cost


@dataclasses.dataclass
class HeldOutRows:
    keys: np.ndarray
    lm_target: np.ndarray
    targets: np.ndarray
    bytes_per_token: float


def held_out_halves(model: Any, store: Datastore, seed: int = 0) -> dict[str, HeldOutRows]:
    """{"fit": a sample of FIT_POSITIONS positions of the fitting half, "report": the whole reported half}."""
    h = held_out(model, store)
    fit, report = document_halves(h.docs, seed)
    sample = np.sort(np.random.default_rng(seed).permutation(np.flatnonzero(fit))[:FIT_POSITIONS])
    rows = {"fit": sample, "report": np.flatnonzero(report)}
    return {k: HeldOutRows(h.keys[r], h.lm_target[r], h.targets[r], h.bytes_per_token) for k, r in rows.items()}


def search_space(store: Datastore) -> dict[str, Any]:
    """Optuna distributions; the temperature around the one fitted at build, IVF cells the store can train."""
    import optuna.distributions as d

    t = json.loads((store.path / GATE_FILE).read_text())["fixed"]["temperature"]
    n = int(store.manifest["entries"])
    cells = sorted({min(c, ivf_nlist(n, DatastoreConfig())) for c in (64, 256, 1024, 4096)})
    return {"k": d.IntDistribution(4, 64, log=True), "lam": d.FloatDistribution(0.01, 0.9, log=True),
            "temperature": d.FloatDistribution(t / 4, t * 4, log=True),
            "index": d.CategoricalDistribution(["flat", "ivfpq", "hnsw"]),
            "nlist": d.CategoricalDistribution(cells), "nprobe": d.IntDistribution(1, 64, log=True),
            "hnsw_m": d.CategoricalDistribution([8, 16, 32])}


def cached_index(store: Datastore, kind: str, cfg: DatastoreConfig, cache: Path) -> faiss.Index:
    """The trial's index, built once per (kind, build parameters) and shared by later trials on disk."""
    key = {"flat": "flat", "ivfpq": f"ivfpq-{cfg.ivf_nlist}-{cfg.pq_m}", "hnsw": f"hnsw-{cfg.hnsw_m}"}[kind]
    path = cache / f"{key}.faiss"
    if path.is_file():
        index = faiss.read_index(str(path))
    else:
        index = single_index(kind, kept_keys(store.path), cfg)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)  # two trials may build the same one: either copy is whole
    return configure(index, cfg)


def score(store: Datastore, index: faiss.Index, rows: HeldOutRows, k: int, gate: Gate) -> float:
    """Bits/byte of the mixture on `rows`."""
    n = store.neighbours(*index.search(np.ascontiguousarray(rows.keys, dtype=np.float32), k))
    logp = mixed_target_log_probs(rows.lm_target, [StoreRows.of(n, rows.targets)], [gate])
    return float(-logp.sum() / math.log(2) / (len(logp) * rows.bytes_per_token))


def ms_per_query(index: faiss.Index, keys: np.ndarray, k: int) -> float:
    q = np.ascontiguousarray(keys[:TIMED_QUERIES], dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(len(q)):
        index.search(q[i:i + 1], k)
    return (time.perf_counter() - t0) * 1000 / max(1, len(q))


def configured(params: dict[str, Any]) -> DatastoreConfig:
    return DatastoreConfig(k=int(params["k"]), ivf_nlist=int(params["nlist"]), nprobe=int(params["nprobe"]),
                           hnsw_m=int(params["hnsw_m"]), hnsw_ef_search=max(64, int(params["k"])))


def knn_trial(params: dict[str, Any], store_dir: str, halves: dict[str, HeldOutRows], cache: str) -> None:
    from ray import tune

    faiss.omp_set_num_threads(1)
    store = Datastore(store_dir)
    cfg = configured(params)
    index = cached_index(store, params["index"], cfg, Path(cache))
    rows = halves["fit"]
    gate = Gate.fixed(float(params["lam"]), float(params["temperature"]))
    result = {"bpb": score(store, index, rows, cfg.k, gate), "ms_per_token": ms_per_query(index, rows.keys, cfg.k)}
    print(f"[tune] {params['index']} k={cfg.k} λ={params['lam']:.3f} T={params['temperature']:.2f}: "
          f"{result['bpb']:.4f} bits/byte, {result['ms_per_token']:.3f} ms/token", flush=True)
    tune.report(result)


def run_knn_sweep(export_dir: str | Path, store_dir: str | Path, out_dir: str | Path, *, trials: int = 24,
                  seed: int = 0, concurrent: int = 2) -> dict[str, Any]:
    """The sweep; writes results.csv, study.db (Optuna) and summary.json to out_dir and returns the summary."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from neuraflex_ray.checkpoint import load_exported

    out = Path(out_dir).expanduser().resolve()
    (out / "indexes").mkdir(parents=True, exist_ok=True)
    store = Datastore(store_dir, export_dir=export_dir)
    model, _ = load_exported(export_dir)
    halves = held_out_halves(model, store, seed)
    search = OptunaSearch(space=search_space(store), metric=list(METRICS), mode=["min", "min"],
                          sampler=optuna.samplers.TPESampler(seed=seed), study_name="knn",
                          storage=optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}"))
    trainable = tune.with_resources(tune.with_parameters(knn_trial, store_dir=str(store.path), halves=halves,
                                                         cache=str(out / "indexes")), {"CPU": 1})
    grid = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=search, num_samples=trials,
                                                              max_concurrent_trials=concurrent),
                      # Tune's status tables would bury the result: one line per trial instead (knn_trial).
                      run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0)).fit()
    rows = [{**{k: r.config[k] for k in search_space(store)}, **{m: r.metrics.get(m) for m in METRICS}}
            for r in grid if r.error is None and r.metrics]
    if not rows:
        errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None]
        raise RuntimeError(f"every trial of the sweep failed; the first: {errors[0] if errors else 'no result'}")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(METRICS))
        w.writeheader()
        w.writerows(rows)
    best = min(rows, key=lambda r: r["bpb"])
    index = cached_index(store, best["index"], configured(best), out / "indexes")
    reported = score(store, index, halves["report"], int(best["k"]), Gate.fixed(best["lam"], best["temperature"]))
    base = float(-halves["report"].lm_target.sum() / math.log(2) / (len(halves["report"].lm_target)
                                                                      * halves["report"].bytes_per_token))
    summary = {"trials": len(rows), "best_on_fit_half": best, "reported_half": {"base": base, "knn": reported},
               "pareto": pareto(rows), "results": str(out / "results.csv"), "optuna_storage": f"sqlite:///{out / 'study.db'}"}
    write_json_atomic(out / "summary.json", summary)
    return summary


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials no other trial beats on both bits/byte and milliseconds per token."""
    return sorted([r for r in rows if not any(o["bpb"] <= r["bpb"] and o["ms_per_token"] <= r["ms_per_token"]
                                              and o is not r and (o["bpb"], o["ms_per_token"]) != (r["bpb"], r["ms_per_token"])
                                              for o in rows)], key=lambda r: r["bpb"])
