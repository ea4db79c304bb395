"""kNN-LM retrieval memory (issue 28): in domain, a new domain with zero gradient steps, both attached,
compressed and graph indexes, and the cost per generated token.

    python benchmarks/retrieval_memory.py [--base EXPORT] [--work-dir DIR] [--dedup-distance X]

1. The base: `--base`, or the quickstart's config trained with 20 held-out documents
   (`data.min_val_documents=20`: the quickstart's own split holds out 4).
2. Two datastores built by `neuraflex_ray.memory.build` (Ray Data actor pool, Parquet shards, flat /
   IVF-PQ / HNSW): the base's own training split (stdlib) and KJV's (1.5 MB, the corpus and split of
   `jobs/configs/finetune_kjv.yaml`).
3. Held-out bits/byte (eval/knn_lm.py): gates fitted on half of each corpus's held-out documents,
   figures on the other half with per-document intervals; with only its own store and with both.
4. LoRA for 200 steps on the same KJV split (finetune_kjv.yaml), scored on the same reported half.
5. Serve: milliseconds per generated token with and without a datastore, at concurrency 1 and 16.

Prints one JSON object shaped as issue 28 asks; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
KJV = {"max_bytes": 1_500_000, "val_fraction": 0.05, "min_val_documents": 20, "seed": 0}  # finetune_kjv.yaml's split
PROMPTS = ["def main(argv):\n    ", "import os\n\nclass ", "And the LORD said unto Moses, ", "In the beginning "]


def log(msg: str) -> None:
    print(f"[retrieval_memory] {msg}", file=sys.stderr, flush=True)


def base_export(args: argparse.Namespace, work: Path) -> Path:
    if args.base:
        return Path(args.base).resolve()
    from neuraflex_ray.config import load_config
    from neuraflex_ray.workflows import quickstart

    cfg = load_config(REPO / "jobs" / "configs" / "moe_debug.yaml",
                      [f"output_dir={work / 'runs'}", f"data.output_dir={work / 'data' / 'text-stdlib-20'}", "name=knn-base",
                       "data.min_val_documents=20"])
    quickstart(cfg)
    return cfg.run_dir / "export"


def lora_kjv(base: Path, work: Path) -> Path:
    """The merged export of LoRA on KJV for 200 steps (finetune_kjv.yaml, as benchmarks/continual.py)."""
    from neuraflex_ray.config import load_config
    from neuraflex_ray.finetune.run import finetune, merge_adapter

    cfg = load_config(REPO / "jobs" / "configs" / "finetune_kjv.yaml",
                      [f"output_dir={work / 'runs'}", f"finetune.from_export={base}", "name=knn-lora",
                       f"data.output_dir={work / 'data' / 'text-kjv-ft'}", "finetune.ewc_lambda=0"])
    out = finetune(cfg, fresh=True)
    adapter = Path(out["adapter"])
    return merge_adapter(base, adapter, adapter.parent / "merged")


def reported_bpb(export: Path, store_dir: Path) -> dict[str, Any]:
    """An export alone on the reported half of a datastore's held-out documents (the halves eval uses)."""
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.eval.knn_lm import bpb
    from neuraflex_ray.memory.heldout import document_halves, held_out
    from neuraflex_ray.memory.store import Datastore

    model, _ = load_exported(export)
    h = held_out(model, Datastore(store_dir))
    _, report = document_halves(h.docs)
    return bpb(h.lm_target[report], h.docs[report], h.bytes_per_token)


def reused(path: Path, base: Path) -> dict[str, Any] | None:
    from neuraflex_ray.checkpoint import fingerprint

    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    return m if m["export_fingerprint"] == fingerprint(base) else None


def ms_per_token(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> float:
    """Mean over requests of latency / generated tokens, `concurrency` clients at once."""
    def one(i: int) -> float:
        body = json.dumps({"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return (time.perf_counter() - t0) * 1000 / out["usage"]["completion_tokens"]

    one(0)  # warm-up
    with ThreadPoolExecutor(concurrency) as pool:
        return float(np.mean(list(pool.map(one, range(requests)))))


def serve_cost(base: Path, stores: dict[str, Path], max_tokens: int) -> dict[str, Any]:
    """ms/token of the export alone and with the stdlib store (exact search: "knn"; the HNSW graph:
    "knn_hnsw"), one replica at a time on the same machine."""
    from ray import serve

    from neuraflex_ray.serving.deploy import deploy, free_port

    out: dict[str, Any] = {"c1": {}, "c16": {}}
    port = free_port()
    for index, key in (("flat", "knn"), ("hnsw", "knn_hnsw")):
        url = deploy({"neuraflex-moe": str(base)}, port=port, name="knn-bench", num_cpus=1,
                     datastores={k: str(v) for k, v in stores.items()}, datastore_index=index)
        try:
            for c in (1, 16):
                n = max(4, 2 * c)
                if index == "flat":
                    out[f"c{c}"]["base"] = ms_per_token(url, "neuraflex-moe", c, n, max_tokens)
                out[f"c{c}"][key] = ms_per_token(url, "neuraflex-moe+stdlib", c, n, max_tokens)
                log(f"ms/token at concurrency {c}: {out[f'c{c}']}")
        finally:
            serve.delete("knn-bench")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="", help="an LM export (default: train the quickstart config with 20 held-out docs)")
    p.add_argument("--work-dir", default="runs/bench-retrieval")
    p.add_argument("--dedup-distance", type=float, default=1e-4, help="DatastoreConfig.dedup_distance")
    p.add_argument("--lora-export", default="", help="a merged LoRA-on-KJV export to score instead of training one")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request in the Serve cost measurement")
    p.add_argument("--reuse-datastores", action="store_true",
                   help="keep datastores already in the work dir that this base built (their build figures are the old run's)")
    args = p.parse_args()
    work = Path(args.work_dir).resolve()

    from neuraflex_ray.eval.knn_lm import evaluate_with_datastores
    from neuraflex_ray.memory.build import build_datastore
    from neuraflex_ray.memory.config import DatastoreConfig
    from neuraflex_ray.train.driver import ensure_ray

    with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the JSON
        ensure_ray(None, min_cpus=4)
        base = base_export(args, work)
        own_source = json.loads((base / "config.json").read_text())
        log(f"base export {base}")
        cfg = DatastoreConfig(dedup_distance=args.dedup_distance)
        stores = {"stdlib": work / "datastores" / "stdlib", "kjv": work / "datastores" / "kjv"}
        manifests = {name: reused(stores[name], base) if args.reuse_datastores else None for name in stores}
        manifests["stdlib"] = manifests["stdlib"] or build_datastore(base, "stdlib", stores["stdlib"], cfg)
        manifests["kjv"] = manifests["kjv"] or build_datastore(base, "kjv", stores["kjv"], cfg, KJV)
        if not manifests["stdlib"]["own_training_data"]:
            log(f"warning: the stdlib datastore is not the export's own training split ({own_source.get('data')})")
        evals = {}
        for index in ("flat", "ivfpq", "hnsw"):
            t0 = time.perf_counter()
            evals[index] = evaluate_with_datastores(base, {k: str(v) for k, v in stores.items()}, index=index)
            log(f"{index}: evaluated in {time.perf_counter() - t0:.0f}s: "
                + json.dumps({d: {k: round(v['bpb'], 4) for k, v in r.items() if isinstance(v, dict) and 'bpb' in v}
                              for d, r in evals[index]['domains'].items()}))
        lora_export = Path(args.lora_export) if args.lora_export else lora_kjv(base, work)
        lora = reported_bpb(lora_export, stores["kjv"])
        log(f"LoRA on KJV (200 steps), reported half: {lora}")
        cost = serve_cost(base, stores, args.max_tokens)

    flat, pq, hnsw = evals["flat"], evals["ivfpq"], evals["hnsw"]
    m = manifests["stdlib"]

    def figs(d: dict[str, Any]) -> dict[str, Any]:
        return {"base": d["base"]["bpb"], "knn": d["knn"]["bpb"], "knn_adaptive": d["knn_adaptive"]["bpb"],
                "mixed": d["mixed"]["bpb"], "mixed_own_distance": d["mixed_own_distance"]["bpb"],
                "ci95": {k: d[k]["ci95"] for k in ("base", "knn", "knn_adaptive", "mixed")},
                "minus_base_ci95": {k: d[k]["minus_base_ci95"] for k in ("knn", "knn_adaptive", "mixed")},
                "low_overlap": None if d["low_overlap"] is None else {k: v["bpb"] for k, v in d["low_overlap"].items()},
                "documents": d["documents"]}

    result = {
        "datastore": {"tokens": m["tokens"], "build_s": m["build_s"], "deduplicated": m["deduplicated"],
                      "index": {k: {kk: vv for kk, vv in v.items() if kk != "file"} for k, v in m["index"].items()},
                      "index_build_s": m["index_build_s"], "kjv": {k: manifests["kjv"][k] for k in
                                                                   ("tokens", "build_s", "deduplicated", "index")}},
        "in_domain": figs(flat["domains"]["stdlib"]),
        "new_domain": {**figs(flat["domains"]["kjv"]), "lora": lora["bpb"], "lora_ci95": lora["ci95"]},
        "mixed": {"stdlib_delta": flat["mixed_delta"]["stdlib"], "kjv_delta": flat["mixed_delta"]["kjv"]},
        "ivfpq_bpb_delta": pq["domains"]["stdlib"]["knn"]["bpb"] - flat["domains"]["stdlib"]["knn"]["bpb"],
        "hnsw_bpb_delta": hnsw["domains"]["stdlib"]["knn"]["bpb"] - flat["domains"]["stdlib"]["knn"]["bpb"],
        "index_memory_ratio_flat_over_ivfpq": m["index"]["flat"]["bytes"] / m["index"]["ivfpq"]["bytes"],
        "ms_per_token": cost,
        "gates": flat["gates"],
        "config": {"base": str(base), "datastore": m["config"], "kjv_split": KJV, "lora_export": str(lora_export),
                   "machine": platform.platform(), "k": flat["k"]},
    }
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
