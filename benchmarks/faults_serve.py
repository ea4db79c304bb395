"""The Serve-side parts of benchmarks/fault_suite.py, each on a local Ray: a replica killed under load
(`replica_kill`) and keys and limits under load (`auth_and_rate_limit`), with the openai-client threads
the first one checks answers with. What each part measures is in fault_suite.py's docstring.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from faults_common import BODY, MODEL, ClientThreads, post  # first: it puts the repository on sys.path

from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.serving.deploy import free_port

# ---------------------------------------------------------------------------------------------
# A replica killed under load
# ---------------------------------------------------------------------------------------------


def _spec(i: int) -> dict[str, Any]:
    return {"prompt": f"# request {i}\ndef handler(event, context):", "seed": 1000 + i}


class Clients(ClientThreads):
    """`n` threads on the official openai client (its default retries), every other one streaming; each
    request's text is checked against the same request's text alone (seeded, batch-invariant decoding)."""

    def __init__(self, url: str, reference: dict[int, str], n: int, max_tokens: int):
        from openai import DefaultHttpx2Client

        super().__init__(n)
        self.url, self.reference, self.max_tokens = url, reference, max_tokens
        self.http = {"requests": 0, "5xx": 0}

        def on_response(r: Any) -> None:  # every HTTP attempt the client makes, retries included
            with self.lock:
                self.http["requests"] += 1
                self.http["5xx"] += r.status_code >= 500

        # The openai client's own HTTP client (its defaults), with a hook that sees every attempt.
        self.client_http = DefaultHttpx2Client(event_hooks={"response": [on_response]}, timeout=120)

    def _run(self, k: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", http_client=self.client_http)
        i = k
        while not self.stop.is_set():
            i = (i + len(self.threads)) % len(self.reference)
            spec, stream = _spec(i), k % 2 == 1
            kw = {"model": MODEL, "prompt": spec["prompt"], "seed": spec["seed"], "temperature": 0.8,
                  "max_tokens": self.max_tokens, "extra_body": {"ignore_eos": True}}
            text, finish, error = "", None, None
            try:
                if stream:
                    parts = []
                    for chunk in client.completions.create(stream=True, **kw):
                        for c in chunk.choices:
                            parts.append(c.text)
                            finish = c.finish_reason or finish
                    text = "".join(parts)
                else:
                    out = client.completions.create(**kw)
                    text, finish = out.choices[0].text, out.choices[0].finish_reason
            except Exception as e:  # noqa: BLE001 - what a client sees
                error = f"{type(e).__name__}: {e}"[:200]
            with self.lock:
                self.results.append({"stream": stream, "error": error, "silent_cut": error is None and finish is None,
                                     "wrong": error is None and finish is not None and text != self.reference[i]})


def replica_kill(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from neuraflex_ray.local_ray import start_local_ray
    from neuraflex_ray.serving.deploy import deploy

    root = Path(tempfile.mkdtemp(prefix="nfr-kill-"))
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        export = scratch_lm_export(root / "lm", max_seq_len=128, flavour="tiny")
        url = deploy({MODEL: str(export)}, port=free_port(), num_cpus=0.5, num_replicas=2, name="kill")
        from openai import OpenAI

        alone = OpenAI(base_url=f"{url}/v1", api_key="unused")
        reference = {i: alone.completions.create(model=MODEL, prompt=_spec(i)["prompt"], seed=_spec(i)["seed"],
                                                 temperature=0.8, max_tokens=args.max_tokens,
                                                 extra_body={"ignore_eos": True}).choices[0].text
                     for i in range(args.distinct)}
        with Clients(url, reference, args.kill_clients, args.max_tokens) as load:
            time.sleep(args.warmup_s)
            def replicas() -> list[dict[str, str]]:
                return [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if "SERVE_REPLICA" in a["name"] and "kill" in a["name"]]

            victim = replicas()[0]
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            t_kill = time.monotonic()
            recovered = None
            while time.monotonic() - t_kill < 120:  # back: 2 RUNNING, and the killed one is not among them
                states = serve.status().applications["kill"].deployments["NeuraFlexServer"].replica_states
                names = {a["name"] for a in replicas()}
                if states.get("RUNNING", 0) == 2 and victim["name"] not in names and len(names) == 2:
                    recovered = round(time.monotonic() - t_kill, 1)
                    break
                time.sleep(0.5)
            time.sleep(args.after_s)
        r = load.results
        plain, streams = [x for x in r if not x["stream"]], [x for x in r if x["stream"]]
        return {"requests": len(r), "failed": sum(x["error"] is not None for x in r),
                "failed_non_streaming": sum(x["error"] is not None for x in plain),
                "cut_streams_with_error": sum(x["error"] is not None for x in streams),
                "silent_cut_streams": sum(x["silent_cut"] for x in r),
                "wrong": sum(x["wrong"] for x in r) + sum(x["silent_cut"] for x in r),
                "recovered_s": recovered, "server_5xx": load.http["5xx"],
                "client_retries": load.http["requests"] - len(r), "clients": args.kill_clients,
                "errors": sorted({x["error"].split(":")[0] for x in r if x["error"]})}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Keys and limits
# ---------------------------------------------------------------------------------------------


def auth_and_rate_limit(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from neuraflex_ray.local_ray import start_local_ray
    from neuraflex_ray.serving.deploy import deploy

    root = Path(tempfile.mkdtemp(prefix="nfr-keys-"))
    keys = {"loaded": "sk-loaded-" + os.urandom(8).hex(), "quiet": "sk-quiet-" + os.urandom(8).hex()}
    (root / "keys.txt").write_text("".join(f"{k} {n}\n" for n, k in keys.items()))
    rpm = args.rpm
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        export = scratch_lm_export(root / "lm", max_seq_len=128, flavour="tiny")
        base = deploy({MODEL: str(export)}, port=free_port(), num_cpus=1,
                      access={"api_key_file": str(root / "keys.txt"), "requests_per_minute": rpm})
        url = base + "/v1/completions"
        no_key = {post(url, BODY)[0] for _ in range(20)}
        bad_key = {post(url, BODY, "sk-wrong")[0] for _ in range(20)}
        good = post(url, BODY, keys["quiet"])[0]

        def timed(key: str, n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _ = post(url, BODY, key)
                assert status == 200, status
                out.append(time.perf_counter() - t0)
            return out

        unloaded = timed(keys["quiet"], args.samples)
        # The loaded key sends 4x its limit over one minute (paced: 4 * rpm requests in 60 s, from 4
        # threads); the quiet key's requests are timed across that minute.
        statuses: list[int] = []
        period = 60.0 / (4 * rpm) * 4  # each of the 4 threads

        def flood() -> None:
            t_next = time.monotonic()
            for _ in range(rpm):
                statuses.append(post(url, BODY, keys["loaded"])[0])
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))

        threads = [threading.Thread(target=flood) for _ in range(4)]
        for t in threads:
            t.start()
        loaded = []
        for _ in range(args.samples):
            loaded += timed(keys["quiet"], 1)
            time.sleep(50.0 / args.samples)
        for t in threads:
            t.join()
        return {"auth": {"no_key": sorted(no_key)[0] if len(no_key) == 1 else sorted(no_key),
                         "bad_key": sorted(bad_key)[0] if len(bad_key) == 1 else sorted(bad_key), "good_key": good},
                "rate_limit": {"limited_status": 429 if 429 in statuses else None, "sent": len(statuses),
                               "admitted": statuses.count(200), "limited": statuses.count(429),
                               "requests_per_minute": rpm,
                               "other_key_p50_ratio": round(float(np.median(loaded) / np.median(unloaded)), 3),
                               "other_key_p50_ms": round(float(np.median(loaded)) * 1e3, 1),
                               "other_key_unloaded_p50_ms": round(float(np.median(unloaded)) * 1e3, 1)}}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
