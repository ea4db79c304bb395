"""API keys and per-key limits on the Serve app (serving/access.py): a real deployment of two replicas,
called over real HTTP and with the official `openai` client. The limits are counted once for the
deployment (a shared ledger actor), so two replicas do not let twice the limit through."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from openai import AuthenticationError, OpenAI

from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.serving.deploy import deploy, free_port

LM = "neuraflex-moe"
RPM = 8
KEYS = {name: f"sk-{name}-{uuid.uuid4().hex}" for name in ("auth", "openai", "rate", "other", "stream", "size", "rotate")}


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("access")
    key_file = root / "keys.txt"
    key_file.write_text("# key name\n" + "".join(f"{k} {n}\n" for n, k in KEYS.items()))
    export = scratch_lm_export(root / "lm", max_seq_len=128, flavour="tiny")
    access = {"api_key_file": str(key_file), "requests_per_minute": RPM, "max_concurrent_streams": 1,
              "max_body_bytes": 4096, "max_prompt_tokens": 32}
    url = deploy({LM: str(export)}, port=free_port(), num_cpus=0.25, num_replicas=2, access=access)
    yield {"url": url, "key_file": key_file}
    serve.shutdown()
    ray.kill(ray.get_actor("neuraflex-access-neuraflex", namespace="serve"))


def call(url: str, key: str | None = None, body: dict | bytes | None = None) -> tuple[int, Any, dict]:
    """(status, headers (case-insensitive), JSON body) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, r.headers, json.loads(raw) if raw.startswith(b"{") else {}
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def completion(n: int = 4) -> dict:
    return {"model": LM, "prompt": "def f(x):", "max_tokens": n, "temperature": 0}


def test_every_route_but_health_needs_a_key_and_a_wrong_one_is_a_401_in_openais_shape(server):
    u = server["url"]
    for path, body in (("/v1/models", None), ("/v1/completions", completion()), ("/tokenize", {"prompt": "x"}),
                       ("/tokenizer_info", None), ("/docs", None), ("/openapi.json", None),
                       ("/v1/neuro/embed", {"model": "x"})):
        for key in (None, "sk-wrong"):
            status, headers, err = call(u + path, key, body)
            assert status == 401, (path, key, status)
            assert err["error"]["code"] == "invalid_api_key" and err["error"]["type"] == "invalid_request_error"
            assert headers["WWW-Authenticate"] == "Bearer"
    assert call(u + "/health")[0] == 200  # open: a load balancer's probe holds no key
    status, _, models = call(u + "/v1/models", KEYS["auth"])
    assert status == 200 and models["data"][0]["id"] == LM
    assert call(u + "/openapi.json", KEYS["auth"])[0] == 200


def test_the_openai_client_with_and_without_a_key(server):
    bad = OpenAI(base_url=f"{server['url']}/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(AuthenticationError, match="Incorrect API key"):
        bad.completions.create(model=LM, prompt="x", max_tokens=2)
    good = OpenAI(base_url=f"{server['url']}/v1", api_key=KEYS["openai"], max_retries=0)
    out = good.completions.create(model=LM, prompt="def f(x):", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


def test_a_key_over_its_request_limit_gets_429_once_for_the_deployment_and_another_key_goes_on(server):
    u = server["url"] + "/v1/completions"
    statuses, retry_after = [], []
    for _ in range(2 * RPM):
        status, headers, _ = call(u, KEYS["rate"], completion(2))
        statuses.append(status)
        if status == 429:
            retry_after.append(int(headers["Retry-After"]))
    # Two replicas answered, yet the key got its limit once, not once per replica.
    assert statuses == [200] * RPM + [429] * RPM, statuses
    assert all(0 < r <= 60 for r in retry_after)
    assert call(u, KEYS["other"], completion(2))[0] == 200


def test_body_size_and_prompt_length_limits(server):
    u = server["url"] + "/v1/completions"
    status, _, err = call(u, KEYS["size"], b'{"model": "x", "prompt": "' + b"a" * 5000 + b'"}')
    assert status == 413 and "max_body_bytes" in err["error"]["message"]
    prompt = "word " * 16
    n = call(server["url"] + "/tokenize", KEYS["size"], {"prompt": prompt})[2]["count"]
    assert 32 < n < 128  # over max_prompt_tokens, inside the model's context
    status, _, err = call(u, KEYS["size"], {"model": LM, "prompt": prompt, "max_tokens": 1})
    assert status == 400 and err["error"]["param"] == "prompt" and err["error"]["code"] == "prompt_too_long"


def open_stream(url: str, key: str, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    p = urlparse(url)
    conn = http.client.HTTPConnection(p.hostname, p.port, timeout=60)
    body = json.dumps({**completion(max_tokens), "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return conn, conn.getresponse()


def replica_loads(url: str, tries: int = 40) -> dict[str, dict]:
    seen = {}
    for _ in range(tries):
        h = call(url + "/health")[2]
        seen[h["replica"]] = h["models"][LM]
    return seen


def test_stream_limit_and_a_client_that_disconnects_frees_its_slot_and_its_stream(server):
    u = server["url"]
    before = sum(s["cancelled"] for s in replica_loads(u).values())
    conn, resp = open_stream(u, KEYS["stream"], max_tokens=100)
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # it is generating
    status, _, err = call(u + "/v1/completions", KEYS["stream"], {**completion(2), "stream": True})
    assert status == 429 and "max_concurrent_streams" in err["error"]["message"]
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while True:
        loads = replica_loads(u, tries=10)
        if sum(s["cancelled"] for s in loads.values()) > before and all(s["active"] == 0 for s in loads.values()):
            break
        assert time.monotonic() < deadline, loads
        time.sleep(0.5)
    # The engine dropped the sequence at its next step: at most one token after the cancel.
    assert max(s["tokens_after_cancel"] for s in loads.values()) <= 1
    assert max(s["tokens"] for s in loads.values()) < 100 + 60  # it did not run on to max_tokens
    conn, resp = open_stream(u, KEYS["stream"], max_tokens=2)  # the stream's lease was released
    assert resp.status == 200 and b"[DONE]" in resp.read()
    conn.close()


def test_keys_rotate_without_a_restart_and_never_reach_the_logs(server):
    import ray

    u = server["url"] + "/v1/models"
    new = f"sk-rotated-{uuid.uuid4().hex}"
    text = server["key_file"].read_text().replace(KEYS["rotate"], new)
    server["key_file"].write_text(text)
    deadline = time.monotonic() + 20
    while call(u, KEYS["rotate"])[0] != 401 or call(u, new)[0] != 200:
        assert time.monotonic() < deadline, "the replicas did not pick up the rotated key file"
        time.sleep(0.5)
    assert all(call(u, new)[0] == 200 for _ in range(4))  # both replicas took it
    node = ray._private.worker._global_node
    logs = Path(node.get_session_dir_path()) / "logs"
    for f in logs.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            text = f.read_bytes()
            for key in (*KEYS.values(), new):
                assert key.encode() not in text, f
    # Nor Ray's Prometheus endpoint, which carries Serve's per-route and per-deployment metrics.
    with urllib.request.urlopen(f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics", timeout=30) as r:
        metrics = r.read()
    assert b"ray_" in metrics and not any(key.encode() in metrics for key in (*KEYS.values(), new))
