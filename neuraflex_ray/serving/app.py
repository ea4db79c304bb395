"""The Ray Serve application: exported models behind HTTP.

One deployment, `NeuraFlexServer` (FastAPI ingress), holds every model it was given (each replica
loads them all; scale with replicas or autoscaling). Routes:

    GET  /health                     liveness and each LM engine's load
    GET  /v1/models                  OpenAI model list
    GET  /v1/models/{id}             model card: config, training run, parameter counts
    POST /v1/completions             OpenAI completions (NeuralFlex-MoE), streaming with SSE
    POST /v1/chat/completions        OpenAI chat completions (template in openai_api.py)
    POST /v1/neuro/embed             NeuroFM window embedding (JSON, Arrow IPC or .npy body)
    POST /v1/neuro/forecast          NeuroFM forecasts per channel and horizon

Every bad request is a 4xx with an OpenAI-style error body naming the field (errors.py); nothing
a request sends can take the replica down. LM requests go through the replica's continuous-
batching engine (engine.py); the loaded models are in models.py, one choice's text stream in
generation.py.

Deploy with `neuraflex-ray serve --checkpoint <export>`, or `serve run`/`serve deploy` with a Serve
config whose import path is `neuraflex_ray.serving.app:build_app` (jobs/configs/serve_*.yaml).
"""

# No `from __future__ import annotations`: FastAPI (through serve.ingress) reads the handlers' annotations.

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from neuraflex_ray.serving import generation
from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving.engine import SamplingParams
from neuraflex_ray.serving.errors import RequestError
from neuraflex_ray.serving.models import LMModel, NeuroModel, load_model, resolve_models

app = FastAPI(title="NeuraFlex-Ray", description=__doc__)


@app.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in the same error shape as everything else.
    return JSONResponse(RequestError(str(e.detail), None, status=e.status_code).body(), status_code=e.status_code)


@app.exception_handler(Exception)
async def _server_error(_: Request, e: Exception) -> JSONResponse:
    body = RequestError(f"internal error: {type(e).__name__}: {e}", None, type="server_error").body()
    return JSONResponse(body, status_code=500)


# Helpers sit above the deployment class: serve.ingress captures the class when it is defined.

async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", None) from None


async def _neuro_request(request: Request) -> Any:
    """A NeuroFM body: JSON, an Arrow IPC stream (one row per stream) or one .npy array [C, T] whose
    modality, sampling_rate (and channels, comma-separated) come as query parameters."""
    from neuraflex_ray.serving import neuro

    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    query = request.query_params
    if kind == "application/json":
        return oai.parse(neuro.NeuroRequest, await _json(request))
    if kind in ("application/vnd.apache.arrow.stream", "application/x-npy"):
        raw = await request.body()
        if kind == "application/x-npy":
            missing = [q for q in ("modality", "sampling_rate") if q not in query]
            if missing:
                raise RequestError(f"a .npy body needs the query parameters {missing} "
                                   f"(?modality=eeg&sampling_rate=160[&channels=C3,C4])", missing[0])
            try:
                rate = float(query["sampling_rate"])
            except ValueError:
                raise RequestError(f"sampling_rate must be a number, got {query['sampling_rate']!r}",
                                   "sampling_rate") from None
            channels = query["channels"].split(",") if query.get("channels") else None
            req = neuro.parse_npy(raw, query["modality"], rate, channels)
        else:
            req = neuro.parse_arrow(raw)
        return req.model_copy(update={"model": query.get("model")})
    raise RequestError(f"unsupported Content-Type {kind!r}: send application/json, application/vnd.apache.arrow.stream "
                       f"or application/x-npy", "Content-Type", status=415)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class NeuraFlexServer:
    def __init__(self, models: dict[str, str], max_batch_size: int = 16, kv_cache: bool = True,
                 device: str = "auto", batch_invariant: bool = True):
        self.models = {name: load_model(name, Path(p), max_batch_size, kv_cache, device, batch_invariant)
                       for name, p in resolve_models(models).items()}
        self.created = int(time.time())

    def check_health(self) -> None:  # Serve restarts a replica whose engine thread died
        for m in self.models.values():
            if isinstance(m, LMModel):
                m.engine.check_alive()

    # ---- metadata ------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        self.check_health()
        return {"status": "ok", "models": {n: (m.engine.load() if isinstance(m, LMModel) else {"model_type": "neurofm"})
                                           for n, m in self.models.items()}}

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_object(n) for n in self.models]}

    @app.get("/v1/models/{model_id}")
    async def model_card(self, model_id: str) -> dict[str, Any]:
        m = self._get(model_id)
        training = {k: m.meta.get(k) for k in ("source_checkpoint", "run_dir", "steps") if k in m.meta}
        return {**self._model_object(model_id), **m.card(), "export": str(m.path), "training": training}

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "neuraflex-ray"}

    def _get(self, name: str, kind: type | None = None) -> LMModel | NeuroModel:
        if name not in self.models:
            raise RequestError(f"model {name!r} does not exist; this server has {sorted(self.models)}", "model",
                               status=404, code="model_not_found")
        m = self.models[name]
        if kind is not None and not isinstance(m, kind):
            route = "/v1/completions or /v1/chat/completions" if isinstance(m, LMModel) else "/v1/neuro/embed or /forecast"
            raise RequestError(f"model {name!r} is a {m.meta.get('model_type', 'moe_lm')} model: use {route}", "model")
        return m

    # ---- LM ------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req = oai.parse(oai.CompletionRequest, await _json(request))
        lm = self._get(req.model, LMModel)
        prompts = req.prompts()
        ids = [lm.encode(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]") for i, p in enumerate(prompts)]
        return await self._generate("text", lm, req, ids, req.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        req = oai.parse(oai.ChatRequest, await _json(request))
        lm = self._get(req.model, LMModel)
        text = oai.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        return await self._generate("chat", lm, req, [lm.encode(text, "messages")], req.limit())

    async def _generate(self, kind: Literal["text", "chat"], lm: LMModel, req: Any, prompts: list[list[int]],
                        max_tokens: int | None) -> Any:
        longest = max(len(p) for p in prompts)
        if max_tokens is not None and longest + max_tokens > lm.context:
            field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise RequestError(f"{field}={max_tokens} plus the prompt's {longest} tokens exceed this model's "
                               f"{lm.context}-token context window: lower {field}", field,
                               code="context_length_exceeded")
        stops = req.stop + (list(oai.CHAT_STOP) if kind == "chat" else [])
        # Choice i*n + j is prompt i's j-th sample; with a seed, sample j uses seed + j so that
        # the n choices differ from each other yet each is reproducible.
        jobs = [(i * req.n + j, ids, SamplingParams(
            max_tokens=max_tokens or lm.context - len(ids), temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k, 0), seed=None if req.seed is None else req.seed + j,  # the engine wraps it
            stop_ids=(lm.eos,) if lm.eos is not None and not req.ignore_eos else ()))
            for i, ids in enumerate(prompts) for j in range(req.n)]
        rid = oai.new_id("cmpl" if kind == "text" else "chatcmpl")
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(kind, lm, req.model, rid, jobs, stops, prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await asyncio.gather(*(generation.collect(lm, ids, params, stops) for _, ids, params in jobs))
        choices = [oai.choice(kind, index, text, finish) for (index, _, _), (text, finish, _) in zip(jobs, results, strict=True)]
        return oai.response(kind, rid, req.model, choices, oai.usage(prompt_tokens, sum(r[2] for r in results)))

    async def _stream(self, kind: Literal["text", "chat"], lm: LMModel, model: str, rid: str, jobs: list[tuple],
                      stops: list[str], prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`. Choices stream
        side by side; if the client goes away the tasks are cancelled and the slots freed."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
            try:
                async for delta, finish, n in generation.deltas(lm, ids, params, stops):
                    await queue.put((index, delta, finish, n))
            except Exception as e:  # noqa: BLE001 - reported to the client in the stream
                await queue.put((index, e, "error", 0))

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        started: set[int] = set()
        open_, completion_tokens = len(jobs), 0
        try:
            while open_:
                index, delta, finish, n = await queue.get()
                if finish == "error":
                    yield _sse({"error": {"message": f"generation failed: {delta}", "type": "server_error",
                                          "param": None, "code": None}})
                    return
                first = index not in started
                started.add(index)
                if finish is not None:
                    open_ -= 1
                    completion_tokens += n
                if delta or first or finish:
                    choice = oai.choice(kind, index, delta, finish, chunk=True, first=first)
                    yield _sse(oai.response(kind, rid, model, [choice], None, chunk=True))
            if include_usage:  # OpenAI's final usage chunk: no choices
                yield _sse(oai.response(kind, rid, model, [], oai.usage(prompt_tokens, completion_tokens), chunk=True))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    # ---- NeuroFM -------------------------------------------------------------------------------

    @app.post("/v1/neuro/embed")
    async def neuro_embed(self, request: Request) -> dict[str, Any]:
        return await self._neuro(request, "embed")

    @app.post("/v1/neuro/forecast")
    async def neuro_forecast(self, request: Request) -> dict[str, Any]:
        return await self._neuro(request, "forecast")

    async def _neuro(self, request: Request, task: Literal["embed", "forecast"]) -> dict[str, Any]:
        req = await _neuro_request(request)
        name = req.model or self._default_neuro()
        if name is None:
            raise RequestError("model is required: this server has several NeuroFM models or none "
                               f"({sorted(self.models)})", "model")
        m = self._get(name, NeuroModel)
        # Model compute off the event loop: health checks and LM streams go on meanwhile.
        out = await asyncio.to_thread(getattr(m.predictor, task), req)
        return {"object": f"neuro.{task}", "model": name, **out}

    def _default_neuro(self) -> str | None:
        names = [n for n, m in self.models.items() if isinstance(m, NeuroModel)]
        return names[0] if len(names) == 1 else None


# ---------------------------------------------------------------------------------------------
# Building the application
# ---------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve config entry point (`import_path: neuraflex_ray.serving.app:build_app`).

    args: models ({name: export dir}, or a path / list of paths), max_batch_size (16; 1 turns
    batching off), kv_cache (true), device (auto: the replica's GPU if it has one), batch_invariant
    (true: a request's text never depends on its batch-mates; false: faster at low load).
    Serve calls an app builder with exactly this one argument; deployment options (replicas,
    ray_actor_options, autoscaling) come from the config's `deployments:` section.
    """
    return bind_app(args)


def bind_app(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """build_app's arguments checked (paths made absolute, before any replica starts) and bound,
    with `options` for the deployment when called from Python (deploy.py)."""
    known = {"models", "max_batch_size", "kv_cache", "device", "batch_invariant"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"serve config args: unknown keys {unknown}; known: {sorted(known)}")
    if "models" not in args:
        raise ValueError("serve config args: `models` is required ({name: export dir})")
    models = {n: str(p) for n, p in resolve_models(args["models"]).items()}
    return NeuraFlexServer.options(**(options or {})).bind(
        models, int(args.get("max_batch_size", 16)), bool(args.get("kv_cache", True)), str(args.get("device", "auto")),
        bool(args.get("batch_invariant", True)))
