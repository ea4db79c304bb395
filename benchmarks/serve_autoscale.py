"""Serve under load: concurrency 1 -> 64 -> 1 against the autoscaling Serve config; nothing lost, nothing wrong.

    python benchmarks/serve_autoscale.py [--config jobs/configs/serve_moe.yaml] [--phase-s 20] [--max-tokens 32]

The application and its deployment options (autoscaling 1-2 replicas, max_ongoing_requests,
graceful shutdown) come from the Serve config itself; only the model path is replaced by an
untrained `debug` export (families/moe_lm/scratch.py: speed and correctness do not need trained weights).
One local Ray cluster, real HTTP, the official `openai` client, streaming requests.

1. Reference: each of `--distinct` seeded requests (prompt, seed, temperature 0.8) is sent alone,
   one at a time, on the one replica: the text it gets alone.
2. Load: client threads follow the concurrency schedule 1, 4, 16, 32, 64, 32, 16, 4, 1 (`--phase-s`
   each), each sending those requests in turn, streamed. A request fails when it raises or its
   stream ends without a finish reason; it is wrong when its text differs from the reference
   (batch-invariant decoding makes a seeded request's text independent of its batch and replica).
3. Scale-down: concurrency 1 goes on until Serve is back at min_replicas, so the draining replica's
   in-flight streams are among the checked requests.

A sampler thread records running replicas once a second. Prints one JSON object:
{"requests", "failed", "wrong", "max_replicas", "final_replicas", "p50_ms", "p99_ms", "timeline": [...]}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export  # noqa: E402
from neuraflex_ray.local_ray import start_local_ray  # noqa: E402
from neuraflex_ray.serving.deploy import free_port, wait_ready  # noqa: E402

MODEL = "neuraflex-moe"
SCHEDULE = (1, 4, 16, 32, 64, 32, 16, 4, 1)


def request_spec(i: int) -> dict[str, Any]:
    return {"prompt": f"# request {i}\ndef handler(event, context):", "seed": 1000 + i}


def stream_once(client: Any, spec: dict[str, Any], max_tokens: int) -> tuple[str, str | None]:
    """(text, finish_reason) of one streamed completion."""
    text, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt=spec["prompt"], seed=spec["seed"], temperature=0.8,
                                           max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            text.append(choice.text)
            finish = choice.finish_reason or finish
    return "".join(text), finish


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


class Load:
    """Client threads; `target` says how many are active now. Every request is checked."""

    def __init__(self, url: str, reference: dict[int, str], max_tokens: int):
        self.url, self.reference, self.max_tokens = url, reference, max_tokens
        self.target = 0
        self.stop = False
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.next_spec = 0

    def set_concurrency(self, n: int) -> None:
        self.target = n
        while len(self.threads) < n:
            t = threading.Thread(target=self._client, args=(len(self.threads),), daemon=True)
            self.threads.append(t)
            t.start()

    def _client(self, k: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)
        while not self.stop:
            if k >= self.target:  # idle in this phase
                time.sleep(0.1)
                continue
            with self.lock:
                i = self.next_spec % len(self.reference)
                self.next_spec += 1
            t0 = time.perf_counter()
            try:
                text, finish = stream_once(client, request_spec(i), self.max_tokens)
                error = None if finish else "stream ended without a finish_reason"
            except Exception as e:  # any failure a client sees counts
                text, error = "", f"{type(e).__name__}: {e}"
            r = {"t": time.perf_counter(), "ms": (time.perf_counter() - t0) * 1e3, "error": error,
                 "wrong": error is None and text != self.reference[i]}
            with self.lock:
                self.results.append(r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/serve_moe.yaml")
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--distinct", type=int, default=24, help="distinct seeded requests the clients cycle through")
    p.add_argument("--scale-down-timeout-s", type=float, default=180.0)
    args = p.parse_args()

    from openai import OpenAI
    from ray import serve

    from neuraflex_ray.serving.app import bind_app

    spec = yaml.safe_load(Path(args.config).read_text())
    app_spec = spec["applications"][0]
    dep = dict(app_spec["deployments"][0])
    dep_name = dep.pop("name")
    auto = dep["autoscaling_config"]
    start_local_ray(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    port = free_port(8000)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        export = scratch_lm_export(Path(tmp) / "debug", vocab_size=4096)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        args_ = {**app_spec["args"], "models": {MODEL: str(export)}}
        serve.run(bind_app(args_, dep), name=app_spec["name"], route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        reference = {i: stream_once(client, request_spec(i), args.max_tokens)[0] for i in range(args.distinct)}
        print(f"[autoscale] {len(reference)} reference texts; replicas {running_replicas(app_spec['name'], dep_name)}",
              flush=True)

        timeline: list[dict[str, Any]] = []
        load = Load(url, reference, args.max_tokens)
        t_start = time.perf_counter()
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                timeline.append({"t_s": round(time.perf_counter() - t_start, 1), "concurrency": load.target,
                                 "replicas": running_replicas(app_spec["name"], dep_name)})
                time.sleep(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for c in SCHEDULE:
            load.set_concurrency(c)
            print(f"[autoscale] concurrency {c}, replicas {running_replicas(app_spec['name'], dep_name)}", flush=True)
            time.sleep(args.phase_s)
        deadline = time.perf_counter() + args.scale_down_timeout_s  # concurrency 1 goes on while it scales down
        while running_replicas(app_spec["name"], dep_name) > auto["min_replicas"] and time.perf_counter() < deadline:
            time.sleep(1.0)
        time.sleep(5.0)  # a few requests on the one replica left
        load.stop = True
        for t in load.threads:
            t.join(timeout=600)
        sampling.set()
        sampler.join()
        final = running_replicas(app_spec["name"], dep_name)
        serve.shutdown()

    ms = np.array([r["ms"] for r in load.results if r["error"] is None])
    errors = [r["error"] for r in load.results if r["error"]]
    out = {
        "requests": len(load.results),
        "failed": len(errors),
        "wrong": sum(r["wrong"] for r in load.results),
        "max_replicas": max(s["replicas"] for s in timeline),
        "final_replicas": final,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "timeline": timeline,
        "first_errors": errors[:5],
        "config": {"serve_config": args.config, "deployment": dep, "schedule": SCHEDULE, "phase_s": args.phase_s,
                   "max_tokens": args.max_tokens, "distinct_requests": args.distinct, "model": "debug (untrained)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
