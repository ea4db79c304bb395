"""The Ray Serve application: exported models behind HTTP.

One deployment, `NeuraFlexServer` (FastAPI ingress), holds every model it was given (each replica
loads them all; scale with replicas or autoscaling). Routes:

    GET  /health                     liveness and each LM engine's load
    GET  /v1/models                  OpenAI model list
    GET  /v1/models/{id}             model card: config, training run, parameter counts, calibration,
                                     quantisation, speculative decoding
    POST /v1/completions             OpenAI completions (NeuralFlex-MoE): logprobs, echo, best_of,
                                     streaming with SSE, the uncertainty extension (openai_api.py)
    POST /v1/chat/completions        OpenAI chat completions (template in openai_api.py), logprobs
    POST /tokenize, /detokenize      vLLM's tokenizer routes; GET /tokenizer_info
    GET  /openapi.json, /docs        every request and response body with its bounds (openapi.py)
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
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from neuraflex_ray.serving import generation
from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving import openapi as api_doc
from neuraflex_ray.serving.access import AccessConfig, AccessMiddleware, install
from neuraflex_ray.serving.errors import RequestError
from neuraflex_ray.serving.logprobs import token_text
from neuraflex_ray.serving.memory import check_datastores
from neuraflex_ray.serving.models import (
    OPENAI,
    LMModel,
    NeuroModel,
    ServeOptions,
    check_adapters,
    check_draft,
    load_model,
    resolve_models,
    serves,
)
from neuraflex_ray.serving.neuro import NeuroRequest
from pipelines.text import EOS

app = FastAPI(title="NeuraFlex-Ray", description=__doc__)
app.add_middleware(AccessMiddleware)  # API keys and per-key limits (access.py); off until args.access sets keys


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


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------


# Before serve.ingress, which freezes a copy of the app.
api_doc.install(app, {
    "/v1/completions": (oai.CompletionRequest, api_doc.CompletionResponse),
    "/v1/chat/completions": (oai.ChatRequest, api_doc.ChatCompletionResponse),
    "/tokenize": (api_doc.TokenizeRequest, api_doc.TokenizeResponse),
    "/detokenize": (api_doc.DetokenizeRequest, api_doc.DetokenizeResponse),
    "/v1/neuro/embed": (NeuroRequest, None),
    "/v1/neuro/forecast": (NeuroRequest, None),
}, title=app.title, description=__doc__ or "")


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class NeuraFlexServer:
    def __init__(self, models: dict[str, str], options: dict[str, Any] | None = None,
                 access: dict[str, Any] | None = None):
        # Limits shared by the app's replicas live in one ledger actor named after the app.
        install(AccessConfig(**(access or {})), f"neuraflex-access-{serve.get_replica_context().app_name}")
        opts = ServeOptions.from_args(options or {})
        self.models = {name: load_model(name, Path(p), opts) for name, p in resolve_models(models).items()}
        self.created = int(time.time())

    def check_health(self) -> None:  # Serve restarts a replica whose engine thread died
        for m in self.models.values():
            if isinstance(m, LMModel):
                m.engine.check_alive()

    # ---- metadata ------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        self.check_health()
        return {"status": "ok", "replica": serve.get_replica_context().replica_id.unique_id, "models": {
            n: m.engine.load() if isinstance(m, LMModel) else {"model_type": m.meta["model_type"]}
            for n, m in self.models.items()}}

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        names = list(self.models)
        for n, m in self.models.items():
            if isinstance(m, LMModel):
                bases = [n, *(f"{n}:{a}" for a in m.adapter_names())]
                names += bases[1:] + [f"{b}+{d}" for b in bases for d in m.datastore_names()]
        return {"object": "list", "data": [self._model_object(n) for n in names]}

    @app.get("/v1/models/{model_id}")
    async def model_card(self, model_id: str) -> dict[str, Any]:
        m, adapter, datastore = self._route(model_id)
        if adapter is not None or datastore is not None:
            return {**self._model_object(model_id), "base": model_id.split("+", 1)[0].split(":", 1)[0],
                    "adapter": m.engine.adapters.meta[adapter] if adapter else None,
                    "datastore": m.engine.memories.card(datastore) if datastore else None}
        training = {k: m.meta.get(k) for k in ("source_checkpoint", "run_dir", "steps") if k in m.meta}
        return {**self._model_object(model_id), **m.card(), "export": str(m.path), "training": training}

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "neuraflex-ray"}

    def _route(self, name: str) -> tuple[LMModel | NeuroModel, str | None, str | None]:
        """`base[:adapter][+datastore]`: the model, the LoRA adapter and the retrieval memory a request names."""
        if "+" not in name or name in self.models:
            return (*self._get_adapted(name), None)
        head, store = name.rsplit("+", 1)
        m, adapter = self._get_adapted(head)
        if not isinstance(m, LMModel):
            self._get(head, LMModel)  # the error naming the right route
        if store not in m.datastore_names():
            raise RequestError(f"model {name!r}: {head} has no datastore {store!r}; its datastores are "
                               f"{m.datastore_names()}", "model", status=404, code="model_not_found")
        return m, adapter, store

    def _get_adapted(self, name: str) -> tuple[LMModel | NeuroModel, str | None]:
        """`base` or `base:adapter` (a LoRA adapter of an LM, chosen per request)."""
        if ":" not in name or name in self.models:
            return self._get(name), None
        base, adapter = name.split(":", 1)
        m = self._get(base, LMModel)
        if adapter not in m.adapter_names():
            raise RequestError(f"model {name!r}: {base} has no adapter {adapter!r}; its adapters are "
                               f"{m.adapter_names()}", "model", status=404, code="model_not_found")
        return m, adapter

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
        lm, adapter, datastore = self._lm_for(req.model)
        prompts = req.prompts()
        ids = [lm.encode(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]") for i, p in enumerate(prompts)]
        return await generation.run("text", lm, req, ids, req.max_tokens, adapter, datastore)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        req = oai.parse(oai.ChatRequest, await _json(request))
        lm, adapter, datastore = self._lm_for(req.model)
        text = oai.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        return await generation.run("chat", lm, req, [lm.encode(text, "messages")], req.limit(), adapter, datastore)

    def _lm_for(self, name: str) -> tuple[LMModel, str | None, str | None]:
        m, adapter, datastore = self._route(name)
        if not isinstance(m, LMModel):
            self._get(name, LMModel)  # the error naming the right route
        return m, adapter, datastore

    # ---- tokenizer (vLLM's routes: evaluation clients look for a server-side tokenizer) ---------

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        req = oai.parse(api_doc.TokenizeRequest, await _json(request))
        lm = self._lm(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            msgs = oai.parse(oai.ChatRequest, {"model": lm.name, "messages": req.messages}).messages
            text = oai.apply_chat_template([{"role": m.role, "content": m.text()} for m in msgs])
            if not req.add_generation_prompt:
                text = text.removesuffix("<|assistant|>\n")
        else:
            text = req.prompt
        ids = lm.tokenizer.encode(text).ids
        out = {"count": len(ids), "max_model_len": lm.context, "tokens": ids, "token_unit": lm.token_unit}
        if req.return_token_strs:
            out["token_strs"] = [token_text(lm.tokenizer, i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, Any]:
        req = oai.parse(api_doc.DetokenizeRequest, await _json(request))
        lm = self._lm(req.model)
        vocab = lm.engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"tokens: ids must be in [0, {vocab}), got {bad[:5]}", "tokens")
        return {"prompt": lm.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(self, model: str | None = None) -> dict[str, Any]:
        lm = self._lm(model)
        return {"model": lm.name, "tokenizer_class": lm.tokenizer_class, "token_unit": lm.token_unit,
                "vocab_size": lm.tokenizer.get_vocab_size(), "model_max_length": lm.context,
                "eos_token": EOS if lm.eos is not None else None, "bos_token": None,
                "chat_template": oai.apply_chat_template([{"role": "user", "content": "{content}"}])}

    def _lm(self, name: str | None) -> LMModel:
        if name is None:
            lms = [n for n, m in self.models.items() if isinstance(m, LMModel)]
            if len(lms) != 1:
                raise RequestError(f"model is required: this server holds {len(lms)} LMs ({lms})", "model")
            name = lms[0]
        return self._get(name, LMModel)

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

    args: models ({name: export dir}, or a path / list of paths), access (API keys and per-key limits:
    `serving/access.py:AccessConfig`), and the fields of `serving/models.py:ServeOptions` (max_batch_size,
    kv_cache, device, batch_invariant, quantize, speculative, draft, num_speculative_tokens, adapters,
    datastores, datastore_index, datastore_gate).
    Serve calls an app builder with exactly this one
    argument; deployment options (replicas, ray_actor_options, autoscaling) come from the config's
    `deployments:` section.
    """
    return bind_app(args)


def bind_app(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """build_app's arguments checked (paths made absolute, a draft's tokenizer compared, before any
    replica starts) and bound, with `options` for the deployment when called from Python (deploy.py)."""
    if "models" not in args:
        raise ValueError("serve config args: `models` is required ({name: export dir})")
    access = AccessConfig.from_args(args.get("access"))  # NEURAFLEX_API_KEYS: only their digests go on
    serving = ServeOptions.from_args({k: v for k, v in args.items() if k not in ("models", "access")})
    models = {n: str(p) for n, p in resolve_models(args["models"]).items()}
    if serving.adapters:
        check_adapters(serving.adapters, [p for p in models.values() if _is_lm(p)])
    if serving.datastores:
        check_datastores(serving.datastores, [p for p in models.values() if _is_lm(p)])
    if serving.draft:
        for path in models.values():
            if _is_lm(path):
                check_draft(Path(serving.draft), Path(path))
    return NeuraFlexServer.options(**(options or {})).bind(models, dataclasses.asdict(serving),
                                                           dataclasses.asdict(access))


def _is_lm(path: str) -> bool:
    return serves(path) == OPENAI
