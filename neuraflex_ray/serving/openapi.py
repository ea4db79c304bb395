"""The OpenAPI document (`/openapi.json`, `/docs`): every request and response body, with its bounds.

The routes read their bodies themselves (so every bad request gets this server's OpenAI-shaped 400
naming the field, not FastAPI's 422), which leaves FastAPI nothing to describe. `install` adds the
request schemas generated from the very pydantic models `openai_api.py` validates with, so the
bounds in the document are the bounds the server enforces, plus response models for documentation.
Checks that span fields (max_tokens 0 only with echo, best_of >= n, top_logprobs needs logprobs)
are stated in the field descriptions.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

# ---------------------------------------------------------------------------------------------
# Tokenizer routes (vLLM's): their request bodies are validated with these models too
# ---------------------------------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    model_config = {"extra": "forbid"}
    model: str | None = Field(None, description="an LM this server holds; optional when it holds one")
    prompt: str | None = Field(None, description="text to tokenize (or messages)")
    messages: list[dict[str, Any]] | None = Field(None, description="chat messages, rendered by the chat template")
    add_generation_prompt: bool = Field(True, description="with messages: end with the assistant turn's header")
    add_special_tokens: bool = Field(True, description="accepted for vLLM clients; the tokenizer adds none")
    return_token_strs: bool = Field(False, description="also return each token as text")


class DetokenizeRequest(BaseModel):
    model_config = {"extra": "forbid"}
    model: str | None = None
    tokens: list[int] = Field(description="token ids, each in [0, vocab_size)")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model: str
    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    eos_token: str | None
    bos_token: str | None
    chat_template: str


# ---------------------------------------------------------------------------------------------
# Responses (documentation: the handlers build plain dicts of these shapes)
# ---------------------------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token under echo")
    top_logprobs: list[dict[str, float] | None] = Field(description="the `logprobs` most likely tokens, and the chosen one")
    text_offset: list[int] = Field(description="character offset of each token in the choice's text")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class Uncertainty(BaseModel):
    """Extension (request `uncertainty: true` or `confidence_threshold`)."""

    token_entropy: list[float] = Field(description="nats, under the calibration temperature")
    token_confidence: list[float] = Field(description="calibrated probability of the most likely token")
    confidence: float = Field(description="the mean of token_confidence (1.0 for an empty completion)")
    calibration_temperature: float = Field(description="fitted on the validation split at export")
    threshold: float | None = None
    low_confidence_tokens: list[int] | None = None
    stopped_low_confidence: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="every sample's tokens, best_of included")
    total_tokens: int


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"] | None
    uncertainty: Uncertainty | None = None


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None


class CompletionResponse(_Response):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(_Choice):
    message: ChatMessageOut
    logprobs: ChatLogprobs | None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


STREAM_NOTE = ("With `stream: true` the response is `text/event-stream`: `data: {chunk}` lines of the same "
               "shape (object `text_completion` / `chat.completion.chunk`, chat choices carrying `delta`), "
               "then `data: [DONE]`.")


def install(app: FastAPI, bodies: dict[str, tuple[type[BaseModel], type[BaseModel] | None]], title: str,
            description: str) -> None:
    """Give each POST route in `bodies` its request body schema and response model in the document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=title, version="1", description=description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in [ErrorResponse, *(m for pair in bodies.values() for m in pair if m is not None)]:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        for path, (request, response) in bodies.items():
            op = doc["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request.__name__}"}}}}
            ok: dict[str, Any] = {"description": "OK"}
            if response is not None:
                ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{response.__name__}"}}}
                if path in ("/v1/completions", "/v1/chat/completions"):
                    ok["description"] = STREAM_NOTE
                    ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
            error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            op["responses"] = {"200": ok, "400": {"description": "a bad request, naming the field", **error},
                               "404": {"description": "unknown model", **error}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
