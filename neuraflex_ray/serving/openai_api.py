"""The OpenAI wire format for NeuralFlex-MoE: request schemas, the chat template, text streaming.

Nothing here touches Ray or the model: `app.py` validates a body with these schemas, turns it into
token ids and `SamplingParams`, runs the engine and shapes its tokens into these responses.

Fields follow OpenAI's completions and chat completions APIs, logprobs and echo included (their
shapes: serving/logprobs.py). `top_k` and `ignore_eos` are extensions, as in vLLM (send them with
`extra_body={"top_k": 40}` from the `openai` client), and so are `uncertainty`,
`confidence_threshold` and `low_confidence` (the calibrated confidence of each token, below).
Fields OpenAI has and this server does not implement (penalties, logit_bias, suffix, tools...) are
accepted only at their neutral value, so a client that relies on one gets a 400 naming it instead
of a silently different answer; a field OpenAI does not have is a 400 too.

Uncertainty (extension): `uncertainty: true` adds to each choice `uncertainty: {token_entropy,
token_confidence, confidence, calibration_temperature}`, where a token's confidence is the
probability of the model's most likely token under the temperature fitted on the validation split
at export time, and `confidence` is the mean over the choice's tokens. `confidence_threshold: c`
(0 < c < 1) acts where a token's confidence falls below c: `low_confidence: "stop"` (the default)
ends the choice before that token (finish_reason "stop", `uncertainty.stopped_low_confidence`
true); `"flag"` keeps generating and lists such tokens in `uncertainty.low_confidence_tokens`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from neuraflex_ray.serving.errors import RequestError

# The chat template. A model trained on plain text has no chat tokens, so the roles are plain
# text markers; generation stops when the model starts a new turn.
#
#   <|system|>\n{system content}\n<|user|>\n{user content}\n<|assistant|>\n{assistant content}\n ...
#   <|assistant|>\n            <- the model continues from here
CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOP = ("\n<|user|>", "\n<|system|>", "\n<|assistant|>")
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
MAX_LOGPROBS = 5  # completions' logprobs: OpenAI's bound
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs: OpenAI's bound
MAX_CHOICES = 64  # prompts x n in one request: one client cannot queue thousands of sequences


def apply_chat_template(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


# The same template in Jinja, for tokenizer_config.json of a Hugging Face export (a test checks the two
# agree): transformers' apply_chat_template(messages, add_generation_prompt=True) renders what the
# function above does.
CHAT_TEMPLATE_JINJA = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON's NaN/Infinity: a 400, not a NaN

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1 (vLLM's spelling): no top-k cut
    stop: str | list[str] | None = Field(None, validate_default=True)  # always a list once validated
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks want fixed lengths)
    # Extensions: calibrated uncertainty (module docstring).
    uncertainty: bool = False
    confidence_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    low_confidence: Literal["stop", "flag"] = "stop"
    # OpenAI fields accepted only at their neutral value (checked in `unsupported`).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise RequestError(f"{name} is not supported by this server; leave it unset or 0", name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server; leave it unset", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", "stream_options")


    def want_scores(self) -> bool:
        """Whether the engine must score each token (log-probs or uncertainty asked for)."""
        return bool(self.uncertainty or self.confidence_threshold is not None)

    def best_of_count(self) -> int:
        return self.n

    def n_top(self) -> int:
        return 0


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo (scores the prompt alone)")
    # The n most likely tokens at each position (0: the chosen token's log-prob only), OpenAI's bound.
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    echo: bool = False  # the prompt comes back before the completion (with its log-probs, if asked)
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="samples per prompt, >= n; the n with the "
                                "highest mean token log-prob are returned; not with stream when > n")
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise RequestError("suffix (insertion) is not supported by this server; leave it unset", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens=0 generates nothing; it is allowed only with echo=true (to score the "
                               "prompt): set max_tokens >= 1 or echo", "max_tokens")
        if self.best_of is not None and self.best_of < self.n:
            raise RequestError(f"best_of={self.best_of} must be >= n={self.n}: it is how many samples the n "
                               f"returned choices are picked from", "best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise RequestError("best_of > n cannot stream: the best samples are known only at the end; set "
                               "stream=false or best_of=n", "best_of")

    def want_scores(self) -> bool:
        return self.logprobs is not None or super().want_scores()

    def best_of_count(self) -> int:
        return self.best_of or self.n

    def n_top(self) -> int:
        return self.logprobs or 0

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, a list of strings, token ids, or a list of token id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if len(p) * self.best_of_count() > MAX_CHOICES:
            raise RequestError(f"{len(p)} prompts x {self.best_of_count()} samples is {len(p) * self.best_of_count()} "
                               f"sequences; one request may ask for at most {MAX_CHOICES}: split it", "prompt")
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients send this instead of max_tokens
    logprobs: bool = Field(False, strict=True)  # each token's log-prob in choices[].logprobs.content
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True,
                                     description="needs logprobs: true")

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true; set logprobs or drop top_logprobs", "top_logprobs")

    def want_scores(self) -> bool:
        return self.logprobs or super().want_scores()

    def n_top(self) -> int:
        return self.top_logprobs or 0

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(schema: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", None)
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    if hasattr(req, "unsupported"):
        req.unsupported()
    return req


def validation_error(e: ValidationError) -> RequestError:
    err = e.errors()[0]
    param = error_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return RequestError(f"unknown field {param!r}: this server does not accept it (check the spelling)", param)
    if err["type"] == "missing":
        return RequestError(f"missing required field {param!r}", param)
    if param in _EXPECTED and err["type"].endswith("_type"):  # a union: pydantic names only its first member
        return RequestError(f"{param} must be {_EXPECTED[param]}, got {err.get('input')!r}", param)
    return RequestError(f"{param}: {err['msg']} (got {err.get('input')!r})", param)


_EXPECTED = {"prompt": "a string, a list of strings, a list of token ids or a list of such lists",
             "stop": "a string or a list of up to 4 strings"}


def error_path(loc: tuple[Any, ...]) -> str | None:
    """("messages", 0, "role") -> "messages[0].role". A union adds its member's type to the path
    ("prompt", "list[int]", 0): the path ends before the first such tag."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x.isidentifier() and x not in {"str", "int", "float", "bool"}:
            out += f".{x}" if out else x
        else:
            break
    return out or None


# ---------------------------------------------------------------------------------------------
# Text out
# ---------------------------------------------------------------------------------------------


class TextStream:
    """Token ids in, text deltas out.

    Holds back a trailing incomplete UTF-8 character (byte-level BPE splits characters across
    tokens) and any tail that could be the start of a stop sequence; cuts the text at the first
    stop sequence and then reports `stopped`.
    """

    def __init__(self, decode: Any, stop: list[str]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        whole = text.rstrip("\ufffd")  # a trailing partial character waits for its next bytes
        cut = self._cut(whole)
        if cut is not None:
            return self._take(whole, cut)
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if whole.endswith(s[:n])), default=0)
        return self._take(whole, len(whole) - hold)

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        return self._take(text, self._cut(text))

    def _cut(self, text: str) -> int | None:
        """Where the first stop sequence starts (and mark the stream stopped), or None."""
        found = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if not found:
            return None
        self.stopped = True
        return min(found)

    def _take(self, text: str, end: int | None) -> str:
        out = text[self.sent:end]
        self.sent += len(out)
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: Literal["text", "chat"], rid: str, model: str, choices: list[dict[str, Any]],
             use: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
    """A whole response or one streamed chunk, for completions ("text") or chat."""
    obj = {"text": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}[kind]
    out: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        out["usage"] = use
    return out


def choice(kind: Literal["text", "chat"], index: int, text: str | None, finish: str | None,
           chunk: bool = False, first: bool = False) -> dict[str, Any]:
    if kind == "text":
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if not chunk:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
