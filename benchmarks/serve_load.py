"""Ray Serve load test: generated tokens/s and latency with batching on and off, KV cache on and off.

    python benchmarks/serve_load.py [--flavour debug --kv-flavours debug small --max-tokens 64]

One run, one local Ray cluster, one replica with 1 CPU, real HTTP (the official `openai` client,
one thread per client). Models are NeuralFlex-MoE flavours, untrained (scratch.py): speed does not
depend on the weights, and `ignore_eos` makes every request generate exactly its max_tokens.

- runs (`--flavour`): batching on (16 decode slots) in the default batch-invariant mode and without
  it, and batching off (1 slot: requests decode one after another), at concurrency 1, 4 and 16;
  every client sends `requests-per-client` completions back to back; tokens/s = all generated
  tokens / wall time; latency per request, end to end.
- kv_cache (each of `--kv-flavours`): one `kv-tokens`-token completion with the KV cache and with
  recomputation of the whole sequence at every token (both with 1 slot: only the cache differs).

Prints one JSON object: `runs`, `kv_cache` (the last of --kv-flavours), `kv_cache_by_flavour`, and
the ratios the goals name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export  # noqa: E402
from neuraflex_ray.local_ray import start_local_ray  # noqa: E402
from neuraflex_ray.serving.deploy import deploy, free_port  # noqa: E402

MODEL = "neuraflex-moe"


def load(url: str, concurrency: int, requests_per_client: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def one_client(c: int) -> list[tuple[float, int]]:
        out = []
        for r in range(requests_per_client):
            t0 = time.perf_counter()
            reply = client.completions.create(model=MODEL, prompt=f"# client {c}, request {r}\ndef solve(data):",
                                              max_tokens=max_tokens, temperature=0.8, seed=c * 100 + r,
                                              extra_body={"ignore_eos": True})
            out.append((time.perf_counter() - t0, reply.usage.completion_tokens))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = [x for xs in pool.map(one_client, range(concurrency)) for x in xs]
    wall = time.perf_counter() - t0
    latency_ms = np.array([d for d, _ in done]) * 1e3
    return {"concurrency": concurrency, "requests": len(done), "tokens": sum(n for _, n in done),
            "tokens_per_s": sum(n for _, n in done) / wall, "p50_ms": float(np.percentile(latency_ms, 50)),
            "p99_ms": float(np.percentile(latency_ms, 99)), "wall_s": wall}


def timed_completion(url: str, tokens: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    reply = client.completions.create(model=MODEL, prompt="def main():", max_tokens=tokens, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == tokens, reply.usage
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--kv-tokens", type=int, default=256)
    p.add_argument("--flavour", default="debug", help="model.flavour for the load runs")
    p.add_argument("--kv-flavours", nargs="+", default=["debug", "small"], help="model.flavour(s) for the KV runs")
    args = p.parse_args()

    from ray import serve

    start_local_ray(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    port = free_port(8000)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        exports = {f: export_for(f, Path(tmp), args.kv_tokens) for f in {args.flavour, *args.kv_flavours}}
        models = {f: json.loads((Path(e) / "config.json").read_text())["model"] for f, e in exports.items()}
        runs = []
        for batching, invariant in ((True, True), (True, False), (False, False)):
            url = deploy([exports[args.flavour]], port=port, max_batch_size=16 if batching else 1,
                         batch_invariant=invariant)
            load(url, 1, 1, 8)  # warm-up: first-call costs stay out of the figures
            for c in args.concurrency:
                r = {"batching": batching, "batch_invariant": invariant,
                     **load(url, c, args.requests_per_client, args.max_tokens)}
                print(json.dumps(r), flush=True)
                runs.append(r)
        kv = {}
        for flavour in args.kv_flavours:
            kv[flavour] = {"tokens": args.kv_tokens, "flavour": flavour}
            for key, cache in (("with_cache_s", True), ("recompute_s", False)):
                url = deploy([exports[flavour]], port=port, max_batch_size=1, kv_cache=cache)
                timed_completion(url, 8)
                kv[flavour][key] = timed_completion(url, args.kv_tokens)
            print(json.dumps(kv[flavour]), flush=True)
        serve.shutdown()

    def by(batching: bool, invariant: bool, c: int) -> float:
        return next(r["tokens_per_s"] for r in runs
                    if (r["batching"], r["batch_invariant"], r["concurrency"]) == (batching, invariant, c))

    top, low = max(args.concurrency), min(args.concurrency)
    result = {
        "runs": runs,
        "kv_cache": kv[args.kv_flavours[-1]],
        "kv_cache_by_flavour": kv,
        "batching_speedup": by(True, True, top) / by(False, False, top),
        "batching_speedup_not_invariant": by(True, False, top) / by(False, False, top),
        "invariance_cost_at_concurrency_1": by(True, False, low) / by(True, True, low),
        "kv_cache_speedup": {f: v["recompute_s"] / v["with_cache_s"] for f, v in kv.items()},
        "config": {"flavour": args.flavour, "models": models,
                   "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
                   "replica_cpus": 1, "dtype": "float32"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))


def export_for(flavour: str, root: Path, kv_tokens: int) -> str:
    from neuraflex_ray.config import MODEL_FLAVOURS

    # Room for the KV run's completion after its prompt.
    model = {**MODEL_FLAVOURS[flavour], "max_seq_len": max(512, kv_tokens + 64)}
    return str(scratch_lm_export(root / flavour, vocab_size=4096, **model))


if __name__ == "__main__":
    main()
