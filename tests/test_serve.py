"""Ray Serve end to end: a real deployment on the session's Ray cluster, called over real HTTP with
the official `openai` client and with raw requests.

The models are untrained exports (scratch.py): what they say is noise, but the wire format, the
batching, the determinism and the error handling are the same as for a trained model.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from openai import BadRequestError, NotFoundError, OpenAI
from ray.serve.schema import ServeDeploySchema

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.families.moe_lm.scratch import scratch_lm_export
from neuraflex_ray.families.neurofm.scratch import SCRATCH_NEURO_MANIFEST, scratch_neurofm_export
from neuraflex_ray.models.moe_lm import param_counts
from neuraflex_ray.serving.access import AccessConfig
from neuraflex_ray.serving.app import build_app
from neuraflex_ray.serving.deploy import deploy, find_export, free_port
from neuraflex_ray.serving.models import ServeOptions

LM, NEURO, TITANS = "neuraflex-moe", "neurofm", "neuraflex-titans"
CONTEXT = 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    models = {LM: str(scratch_lm_export(root / "lm", max_seq_len=CONTEXT)),
              NEURO: str(scratch_neurofm_export(root / "neuro")),
              TITANS: str(scratch_lm_export(root / "titans", max_seq_len=128, flavour="tiny", memory="titans",
                                            attn_window=16, memory_chunk=8))}
    url = deploy(models, port=free_port(), num_cpus=0.5)
    yield {"url": url, "models": models, "client": OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}
    serve.shutdown()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(server, prompt: str, **kw) -> str:
    status, body = post(f"{server['url']}/v1/completions", {"model": LM, "prompt": prompt, **kw})
    assert status == 200, body
    return body["choices"][0]["text"]


def test_model_list_health_and_cards(server):
    status, models = get(f"{server['url']}/v1/models")
    assert status == 200 and models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {LM, NEURO, TITANS}
    _, card = get(f"{server['url']}/v1/models/{LM}")
    config = json.loads((Path(server["models"][LM]) / "config.json").read_text())["model"]
    assert card["config"] == config and card["context_length"] == CONTEXT
    assert card["parameters"] == param_counts(ModelConfig(**config))
    assert card["serving"]["max_batch_size"] == 16 and card["serving"]["kv_cache"] is True
    _, card = get(f"{server['url']}/v1/models/{NEURO}")
    assert card["modalities"]["eeg"]["channels"] == ["Fp1", "C3", "Cz"] and card["parameters"] > 0
    status, err = get(f"{server['url']}/v1/models/gpt-4")
    assert status == 404 and err["error"]["param"] == "model" and "gpt-4" in err["error"]["message"]
    status, health = get(f"{server['url']}/health")
    assert status == 200 and health["status"] == "ok" and health["models"][LM]["slots"] == 16


def test_a_titans_model_serves_on_the_same_app_with_its_memory_per_request(server):
    """Greedy text over HTTP equals in-process generation (the memory updated chunk by chunk as the
    engine decodes), alone and with 7 other requests in the same decode steps."""
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.models.moe_lm import generate
    from pipelines.text import load_tokenizer

    model, _ = load_exported(server["models"][TITANS])
    tok = load_tokenizer(Path(server["models"][TITANS]) / "tokenizer.json")
    prompts = [f"def f{i}(x):\n    return x * {i} + " + "y" * (3 * i) for i in range(8)]  # past several chunks
    want = [tok.decode(generate(model, tok.encode(p).ids, 24)) for p in prompts]

    def one(p: str) -> str:
        return server["client"].completions.create(model=TITANS, prompt=p, max_tokens=24, temperature=0.0,
                                                   extra_body={"ignore_eos": True}).choices[0].text

    assert one(prompts[3]) == want[3]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, prompts)) == want


def test_openai_client_completions_chat_and_streaming(server):
    client = server["client"]
    r = client.completions.create(model=LM, prompt="def main():", max_tokens=12, temperature=0.8, seed=7, n=2)
    assert len(r.choices) == 2 and r.choices[0].text != r.choices[1].text  # seeds 7 and 8
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens > 0
    assert {c.finish_reason for c in r.choices} == {"length"}
    again = client.completions.create(model=LM, prompt="def main():", max_tokens=12, temperature=0.8, seed=7)
    assert again.choices[0].text == r.choices[0].text

    chunks = list(client.completions.create(model=LM, prompt="def main():", max_tokens=12, temperature=0.8,
                                            seed=7, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    chat = client.chat.completions.create(model=LM, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hello"}],
                                          max_tokens=10, seed=1, temperature=0.7, extra_body={"top_k": 40})
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    text = chat.choices[0].message.content
    streamed = list(client.chat.completions.create(model=LM, messages=[{"role": "system", "content": "Be brief."},
                                                                       {"role": "user", "content": "Hello"}],
                                                   max_tokens=10, seed=1, temperature=0.7, stream=True,
                                                   extra_body={"top_k": 40}))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text


def test_stop_sequences_cut_the_text(server):
    full = complete(server, "import os\n", max_tokens=40, temperature=1.0, seed=3)
    stop = full[10:13]
    assert stop and full.index(stop) >= 1
    status, body = post(f"{server['url']}/v1/completions", {"model": LM, "prompt": "import os\n", "max_tokens": 40,
                                                            "temperature": 1.0, "seed": 3, "stop": [stop]})
    assert body["choices"][0]["text"] == full[:full.index(stop)] and body["choices"][0]["finish_reason"] == "stop"


def test_raw_sse_stream_ends_with_done(server):
    conn = http.client.HTTPConnection(server["url"].split("//")[1], timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": LM, "prompt": "x = ", "max_tokens": 5,
                                                        "stream": True, "seed": 0}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [line for line in r.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_sixteen_concurrent_clients_get_what_they_get_alone(server):
    client = server["client"]
    jobs = [dict(prompt=f"# task {i}\ndef f{i}(x):", max_tokens=24, seed=i, temperature=0.0 if i % 4 == 0 else 0.9,
                 top_p=0.9 if i % 3 == 0 else 1.0) for i in range(16)]

    def one(job: dict) -> str:
        return client.completions.create(model=LM, **job).choices[0].text

    alone = [one(job) for job in jobs]
    _, before = get(f"{server['url']}/health")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, jobs))
    assert together == alone
    _, after = get(f"{server['url']}/health")
    assert after["models"][LM]["peak_batch"] >= 8  # they shared decode steps
    assert after["models"][LM]["failed"] == before["models"][LM]["failed"] == 0


BAD_LM = [
    ({"model": LM, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": LM, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": LM, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": LM, "prompt": "x", "n": 99}, 400, "n"),
    ({"model": LM, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": LM, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"model": LM, "prompt": "x", "seed": 2**64}, 400, "seed"),
    ({"model": LM, "prompt": ["x"] * 10, "n": 8}, 400, "prompt"),
    ({"model": LM, "prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ({"model": LM}, 400, "prompt"),
    ({"model": LM, "prompt": 42}, 400, "prompt"),
    ({"model": LM, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": LM, "prompt": "x " * 3000}, 400, "prompt"),
    ({"model": LM, "prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": NEURO, "prompt": "x"}, 400, "model"),
    ({"prompt": "x"}, 400, "model"),
]
BAD_CHAT = [
    ({"model": LM, "messages": []}, 400, "messages"),
    ({"model": LM, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": LM, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": LM, "messages": [{"role": "user", "content": "x " * 3000}]}, 400, "messages"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_replica_keeps_serving(server):
    url = server["url"]
    for path, cases in (("/v1/completions", BAD_LM), ("/v1/chat/completions", BAD_CHAT)):
        for body, status, param in cases:
            got, err = post(url + path, body)
            assert (got, err["error"]["param"]) == (status, param), (body, err)
            assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    got, err = post(url + "/v1/completions", b'{"model": "neuraflex-moe", "prompt": ')  # malformed JSON
    assert got == 400 and "not valid JSON" in err["error"]["message"]
    got, err = post(url + "/v1/completions", b'{"model": "neuraflex-moe", "prompt": "x", "temperature": NaN}')
    assert (got, err["error"]["param"]) == (400, "temperature")
    got, err = post(url + "/v1/completions", b"[1, 2]")
    assert got == 400 and "JSON object" in err["error"]["message"]
    assert get(url + "/v1/nowhere")[0] == 404
    # The official client surfaces them as its own exceptions.
    with pytest.raises(BadRequestError, match="max_tokens"):
        server["client"].completions.create(model=LM, prompt="x", max_tokens=0)
    with pytest.raises(NotFoundError, match="model"):
        server["client"].chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # ...and the replica still answers.
    assert complete(server, "print(", max_tokens=3, seed=0)
    assert get(url + "/health")[1]["models"][LM]["failed"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    url = server["url"]
    before = get(url + "/health")[1]["models"][LM]
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"model": LM, "prompt": "def", "max_tokens": CONTEXT - 8, "stream": True, "seed": 0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 3:  # the stream is flowing
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 30
    while True:
        load = get(url + "/health")[1]["models"][LM]
        if load["active"] == 0 and load["cancelled"] > before["cancelled"]:
            break
        assert time.monotonic() < deadline, f"the stream's slot was not freed: {load}"
        time.sleep(0.2)
    assert load["tokens"] - before["tokens"] < CONTEXT - 8  # it stopped early, not at max_tokens
    assert complete(server, "x", max_tokens=2, seed=0) is not None


def _eeg(seconds: float = 3.0) -> np.ndarray:
    rate = SCRATCH_NEURO_MANIFEST["modalities"]["eeg"]["rate"]
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([np.sin(2 * np.pi * 0.7 * t + k) for k in range(3)]).astype(np.float32)


def test_neuro_embed_and_forecast_over_json_arrow_and_npy(server):
    url = server["url"]
    x = _eeg()
    stream = {"modality": "eeg", "sampling_rate": 32.0, "data": x.tolist(), "channels": ["Fp1", "C3", "Cz"]}
    status, emb = post(url + "/v1/neuro/embed", {"model": NEURO, "streams": [stream]})
    assert status == 200 and emb["dim"] == len(emb["embedding"]) and emb["model"] == NEURO
    assert post(url + "/v1/neuro/embed", {"streams": [stream]})[1]["embedding"] == emb["embedding"]  # the only NeuroFM

    table = pa.table({"modality": ["eeg"], "sampling_rate": [32.0], "data": [x.tolist()],
                      "channels": [["Fp1", "C3", "Cz"]]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    status, arrow = post(url + "/v1/neuro/embed", sink.getvalue(), "application/vnd.apache.arrow.stream")
    assert status == 200 and np.allclose(arrow["embedding"], emb["embedding"], atol=1e-6)
    npy = io.BytesIO()
    np.save(npy, x)
    status, from_npy = post(url + "/v1/neuro/embed?modality=eeg&sampling_rate=32&channels=Fp1,C3,Cz", npy.getvalue(),
                            "application/x-npy")
    assert status == 200 and np.allclose(from_npy["embedding"], emb["embedding"], atol=1e-6)

    status, fc = post(url + "/v1/neuro/forecast", {"streams": [stream]})
    assert status == 200 and fc["horizons_s"] == SCRATCH_NEURO_MANIFEST["horizons_s"]
    out = np.array(fc["streams"][0]["forecast"])
    patch = SCRATCH_NEURO_MANIFEST["modalities"]["eeg"]["patch_len"]
    assert out.shape == (3, len(fc["horizons_s"]), patch) and np.isfinite(out).all()


BAD_NEURO = [
    ({"streams": [{"modality": "fmri", "sampling_rate": 1.0, "data": [[0.0] * 10]}]}, "streams[0].modality"),
    ({"streams": [{"modality": "eeg", "sampling_rate": -5, "data": [[0.0] * 100] * 3}]}, "streams[0].sampling_rate"),
    ({"streams": [{"modality": "eeg", "sampling_rate": 32, "data": [[0.0] * 10] * 3}]}, "streams[0].data"),
    ({"streams": [{"modality": "eeg", "sampling_rate": 32, "data": [[0.0] * 100, [0.0] * 99, [0.0] * 100]}]},
     "streams[0].data"),
    ({"streams": [{"modality": "eeg", "sampling_rate": 32, "data": [[0.0] * 100] * 3, "channels": ["Fp1", "C3", "O9"]}]},
     "streams[0].channels[2]"),
    ({"streams": [{"modality": "eeg", "sampling_rate": 32, "data": [[0.0] * 100] * 3}], "window": 3}, "window"),
    ({"streams": []}, "streams"),
    ({"model": LM, "streams": [{"modality": "eeg", "sampling_rate": 32, "data": [[0.0] * 100] * 3}]}, "model"),
]


def test_bad_neuro_requests_get_a_4xx_naming_the_field(server):
    url = server["url"]
    for body, param in BAD_NEURO:
        status, err = post(url + "/v1/neuro/forecast", body)
        assert (status, err["error"]["param"]) == (400, param), (body, err)
    nan = b'{"streams": [{"modality": "eeg", "sampling_rate": 32, "data": [[NaN, 0.0], [0.0, 0.0], [0.0, 0.0]]}]}'
    status, err = post(url + "/v1/neuro/embed", nan)
    assert status == 400 and err["error"]["param"] == "streams[0].data"
    status, err = post(url + "/v1/neuro/embed", b"not arrow", "application/vnd.apache.arrow.stream")
    assert status == 400 and err["error"]["param"] == "body"
    status, err = post(url + "/v1/neuro/embed?sampling_rate=32", b"\x93NUMPY", "application/x-npy")
    assert status == 400 and err["error"]["param"] == "modality"
    status, err = post(url + "/v1/neuro/embed", b"a,b\n1,2", "text/csv")
    assert status == 415 and err["error"]["param"] == "Content-Type"
    assert post(url + "/v1/neuro/embed", {"streams": [{"modality": "eeg", "sampling_rate": 32.0,
                                                        "data": _eeg().tolist()}]})[0] == 200


def test_serve_configs_pass_serves_own_schema_and_build(tmp_path):
    for path in sorted((REPO / "jobs" / "configs").glob("serve_*.yaml")):
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        (app,) = schema.applications
        assert app.import_path == "neuraflex_ray.serving.app:build_app", path
        assert set(app.args) <= {"models", "access", *(f.name for f in dataclasses.fields(ServeOptions))}, path
        AccessConfig.from_args(app.args.get("access"), env={})  # every limit a known setting with a valid value
        deployment = app.deployments[0]
        assert deployment.name == "NeuraFlexServer" and deployment.autoscaling_config["max_replicas"] >= 1
    # Serve calls the builder the way it calls any app builder (one dict argument), and the builder
    # checks its arguments before any replica starts.
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    export = scratch_lm_export(tmp_path / "lm")
    app = call_user_app_builder_with_args_if_necessary(build_app, {"models": {LM: str(export)}, "max_batch_size": 4})
    assert isinstance(app, Application)
    with pytest.raises(FileNotFoundError, match="not a model export"):
        build_app({"models": {LM: str(tmp_path)}})
    with pytest.raises(ValueError, match="unknown key 'batch'"):
        build_app({"models": {LM: str(export)}, "batch": 4})
    # `serve --checkpoint` takes an export or the run directory that holds one, and says what to do otherwise.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "export").symlink_to(export)
    assert find_export(export) == export and find_export(tmp_path / "run") == tmp_path / "run" / "export"
    (tmp_path / "train" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neuraflex-ray export"):
        find_export(tmp_path / "train")
