"""Deploy exports on Ray Serve from Python (the `serve` CLI command, quickstart, tests, benchmarks), and
the quickstart's one HTTP round trip (`serve_and_call`)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

APP_NAME = "neuraflex"


def find_export(path: str | Path) -> Path:
    """An export directory, or a run directory holding one (`<run dir>/export`)."""
    p = Path(path).expanduser().resolve()
    if (p / "model.safetensors").is_file():
        return p
    if (p / "export" / "model.safetensors").is_file():
        return p / "export"
    if (p / "train_state.json").is_file() or (p / "checkpoints").is_dir():
        raise FileNotFoundError(f"{p} is a training checkpoint/run, not an export: run `neuraflex-ray export "
                                f"--checkpoint {p} --out <dir>` and serve <dir>")
    raise FileNotFoundError(f"--checkpoint {p}: no model.safetensors there or in {p}/export; pass the directory "
                            f"`neuraflex-ray export` or `make quickstart` wrote (runs/<name>/export)")


def parse_checkpoints(specs: list[str]) -> dict[str, str] | list[str]:
    """CLI `--checkpoint` values: `path` (named after its model type) or `name=path`."""
    named = [s.split("=", 1) for s in specs if "=" in s and not Path(s).exists()]
    if named and len(named) != len(specs):
        raise ValueError("--checkpoint: name every model (name=path) or none")
    if named:
        return {name: str(find_export(p)) for name, p in named}
    return [str(find_export(p)) for p in specs]


def deploy(models: dict[str, str] | list[str], *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
           route_prefix: str = "/", max_batch_size: int = 16, kv_cache: bool = True, num_replicas: int = 1,
           num_cpus: float = 1, num_gpus: float = 0, device: str = "auto", batch_invariant: bool = True,
           proxy_location: str = "EveryNode", timeout_s: float = 300, **serving: Any) -> str:
    """Start Serve's HTTP proxies on host:port (if Serve is not up yet), run the app, wait until it
    answers; returns the base URL. Replaces an app of the same name. `proxy_location`: EveryNode
    (Serve's default), or HeadOnly when several nodes share one machine and so one port. `serving`:
    more fields of serving/models.py:ServeOptions (quantize, speculative, draft, ...)."""
    from ray import serve

    from neuraflex_ray.serving.app import bind_app

    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    args = {"models": models, "max_batch_size": max_batch_size, "kv_cache": kv_cache, "device": device,
            "batch_invariant": batch_invariant, **serving}
    options = {"num_replicas": num_replicas, "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    app = bind_app(args, options)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{route_prefix.rstrip('/')}"
    wait_ready(url, timeout_s)
    return url


def free_port(preferred: int = 0) -> int:
    """`preferred` when nothing holds it, else a port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port")


def wait_ready(url: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f}s: {e}") from e
            time.sleep(0.5)


def post_json(url: str, body: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def serve_and_call(export_dir: str | Path, prompt: str, max_tokens: int, seed: int, port: int = 8000) -> dict[str, Any]:
    """Deploy an LM export on Ray Serve, send it one OpenAI completions request over HTTP, take it down."""
    from ray import serve

    from neuraflex_ray.serving.models import default_name

    url = deploy([str(export_dir)], port=free_port(port))
    request = {"model": default_name(Path(export_dir)), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7,
               "top_k": 50, "seed": seed}
    t0 = time.perf_counter()
    reply = post_json(f"{url}/v1/completions", request)
    latency = time.perf_counter() - t0
    serve.shutdown()
    print(f"[serve] POST {url}/v1/completions -> {reply['choices'][0]['text']!r} ({latency * 1e3:.0f} ms)", flush=True)
    return {"url": f"{url}/v1/completions", "request": request, "completion": reply["choices"][0]["text"],
            "usage": reply["usage"], "latency_ms": latency * 1e3}
