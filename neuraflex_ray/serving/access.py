"""Who may call the Serve app, and how much: API keys and per-key limits shared by every replica.

Keys come from a file (one per line: `KEY` or `KEY NAME`; `#` starts a comment), re-read when it
changes, so keys rotate without a restart, and/or from NEURAFLEX_API_KEYS (the same entries,
comma-separated). Only SHA-256 digests of keys are kept, compared with `hmac.compare_digest`
against every stored digest (no early exit), and a key is known in logs and counters by its name,
or by `key-<first 8 hex of its digest>` when it has none: never by the key itself.

With keys set, every route but `/health` (unless `protect_health`) needs `Authorization: Bearer
<key>`: `/v1/*`, the tokenizer routes, `/docs` and `/openapi.json`. A missing or wrong key is a 401
in OpenAI's error shape. The limits, per key and across all replicas of the deployment:

    max_body_bytes          request body size (413), checked on Content-Length and on the bytes read
    max_prompt_tokens       prompt length (400 naming prompt/messages); 0: the model's context
    requests_per_minute     requests in any 60 s window (429 with Retry-After)
    tokens_per_minute       generated tokens in any 60 s window (429 with Retry-After once spent)
    max_concurrent_streams  open SSE streams (429 until one ends)

The window counts live in one small named actor per app (`Ledger`), so N replicas enforce the
limit once, not N times. If a replica cannot reach it within a second (the head node it lived on
is down), that replica goes on with a local ledger of its own and says so once: limits then hold
per replica until the shared one answers again. Without keys the rate limits have no key to
count against and are off; the size limits hold for everyone.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from neuraflex_ray.serving.errors import RequestError

ENV_KEYS = "NEURAFLEX_API_KEYS"
WINDOW_S = 60.0
STREAM_LEASE_S = 3600.0  # a stream a dead replica never closed stops counting after this long
OPEN_PATHS = ("/health",)

log = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclasses.dataclass
class AccessConfig:
    """The Serve config's `args.access` section, and `neuraflex-ray serve --api-key-file ...`."""

    api_key_file: str = ""  # one key per line, optionally followed by a name; re-read when it changes
    key_digests: dict[str, str] = dataclasses.field(default_factory=dict)  # {sha256 hex: name}: keys given
    # through NEURAFLEX_API_KEYS where the app was built (filled in by from_args, never the keys)
    protect_health: bool = False
    max_body_bytes: int = 4 * 1024 * 1024  # a NeuroFM .npy window fits; a runaway upload does not
    max_prompt_tokens: int = 0  # 0: the model's context window
    requests_per_minute: int = 600
    tokens_per_minute: int = 100_000
    max_concurrent_streams: int = 16

    @classmethod
    def from_args(cls, args: dict[str, Any] | None, env: dict[str, str] | None = None) -> AccessConfig:
        """Checked before any replica starts; each problem names its key (ValueError)."""
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"serve args: access.{unknown[0]} is not a setting; known: {sorted(known)}")
        for f in dataclasses.fields(cls):
            if f.name in args and f.type == "int" and (not isinstance(args[f.name], int) or args[f.name] < 0):
                raise ValueError(f"serve args: access.{f.name} must be an integer >= 0, got {args[f.name]!r}")
        cfg = cls(**args)
        if cfg.api_key_file:
            path = Path(cfg.api_key_file).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"serve args: access.api_key_file {path} does not exist: write one key per line "
                                 f"(optionally followed by a name) there, on every node that runs a replica")
            cfg.api_key_file = str(path)
            parse_keys(path.read_text(), str(path))
        entries = (env if env is not None else os.environ).get(ENV_KEYS, "")
        cfg.key_digests = {**cfg.key_digests, **parse_keys(entries.replace(",", "\n"), ENV_KEYS)}
        return cfg

    @property
    def keyed(self) -> bool:
        return bool(self.api_key_file or self.key_digests)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, where: str) -> dict[str, str]:
    """{digest: name} from `KEY [NAME]` lines (blank lines and # comments skipped)."""
    out = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(f"{where}, entry {n}: expected `KEY` or `KEY NAME`, got {len(parts)} words")
        d = digest(parts[0])
        out[d] = parts[1] if len(parts) == 2 else f"key-{d[:8]}"
    return out


class KeyRing:
    """The digests a replica accepts: the file's (re-read when its mtime changes) and the fixed ones."""

    def __init__(self, cfg: AccessConfig):
        self.path = Path(cfg.api_key_file) if cfg.api_key_file else None
        self.fixed = dict(cfg.key_digests)
        self._file: dict[str, str] = {}
        self._mtime: float | None = None
        self._checked = 0.0

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                self._file, self._mtime = parse_keys(self.path.read_text(), str(self.path)), mtime
        except (OSError, ValueError) as e:  # keep the last good set: a half-written file must not lock everyone out
            log.warning("api key file %s unreadable (%s); keeping the %d keys read before", self.path, e, len(self._file))

    def identify(self, authorization: str | None) -> str | None:
        """The caller's key name, or None. Every stored digest is compared, whatever matches first."""
        self._refresh()
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = digest(authorization[len("Bearer "):].strip())
        found = None
        for d, name in {**self._file, **self.fixed}.items():
            if hmac.compare_digest(d, presented):
                found = name
        return found


class Ledger:
    """Per-key sliding windows and open streams. A Ray actor shared by a deployment's replicas (and,
    as a plain object, a replica's own fallback)."""

    def __init__(self) -> None:
        self.requests: dict[str, deque[float]] = {}
        self.tokens: dict[str, deque[tuple[float, int]]] = {}
        self.streams: dict[str, dict[str, float]] = {}

    def admit(self, key: str, rpm: int, tpm: int, now: float | None = None) -> tuple[bool, float, str]:
        """(admitted, retry_after_s, which limit) for one request of `key`."""
        now = time.time() if now is None else now
        reqs = self.requests.setdefault(key, deque())
        toks = self.tokens.setdefault(key, deque())
        while reqs and reqs[0] <= now - WINDOW_S:
            reqs.popleft()
        while toks and toks[0][0] <= now - WINDOW_S:
            toks.popleft()
        if rpm and len(reqs) >= rpm:
            return False, reqs[0] + WINDOW_S - now, "requests_per_minute"
        if tpm and sum(n for _, n in toks) >= tpm:
            return False, toks[0][0] + WINDOW_S - now, "tokens_per_minute"
        reqs.append(now)
        return True, 0.0, ""

    def open_stream(self, key: str, limit: int, now: float | None = None) -> str | None:
        """A lease id, or None when `key` already has `limit` streams open."""
        now = time.time() if now is None else now
        open_ = {lease: t for lease, t in self.streams.get(key, {}).items() if now - t < STREAM_LEASE_S}
        self.streams[key] = open_
        if limit and len(open_) >= limit:
            return None
        lease = uuid.uuid4().hex
        open_[lease] = now
        return lease

    def finish(self, key: str, tokens: int, lease: str | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if tokens:
            self.tokens.setdefault(key, deque()).append((now, tokens))
        if lease:
            self.streams.get(key, {}).pop(lease, None)


@dataclasses.dataclass
class Grant:
    """One admitted request: what the route handlers report back (tokens made, a stream opened)."""

    access: Access
    key: str
    tokens: int = 0
    lease: str | None = None

    async def open_stream(self) -> None:
        lease = await self.access.call("open_stream", self.key, self.access.cfg.max_concurrent_streams)
        if lease is None:
            raise RequestError(f"this key already has {self.access.cfg.max_concurrent_streams} streams open "
                               f"(max_concurrent_streams): wait for one to end", "stream", status=429,
                               code="rate_limit_exceeded")
        self.lease = lease


_grant: contextvars.ContextVar[Grant | None] = contextvars.ContextVar("neuraflex_access_grant", default=None)


def current() -> Grant | None:
    """The grant of the request being handled (None when the app runs without keys)."""
    return _grant.get()


def prompt_limit(context: int) -> int:
    """The most prompt tokens a request may send to a model with this context window."""
    a = _installed
    return min(context, a.cfg.max_prompt_tokens) if a is not None and a.cfg.max_prompt_tokens else context


class Access:
    """A replica's side: its key ring, the shared ledger's handle, and the local fallback."""

    def __init__(self, cfg: AccessConfig, ledger_name: str | None):
        self.cfg, self.keys = cfg, KeyRing(cfg)
        self.local = Ledger()
        self.shared: Any = None
        if ledger_name and cfg.keyed:
            import ray

            self.shared = ray.remote(Ledger).options(
                name=ledger_name, namespace="serve", lifetime="detached", get_if_exists=True, num_cpus=0,
                max_restarts=-1, max_concurrency=1).remote()
        self._warned = False

    async def call(self, method: str, *args: Any) -> Any:
        if self.shared is not None:
            try:
                return await asyncio.wait_for(getattr(self.shared, method).remote(*args), timeout=1.0)
            except Exception as e:  # noqa: BLE001 - the head (and the ledger) may be down: go on locally
                if not self._warned:
                    log.warning("the shared access ledger did not answer (%s): limits hold per replica until it "
                                "does", type(e).__name__)
                    self._warned = True
        return getattr(self.local, method)(*args)


_installed: Access | None = None


def install(cfg: AccessConfig, ledger_name: str | None) -> Access:
    """Called by the deployment's constructor: the middleware of this replica process reads it.

    (serve.ingress pickles the FastAPI app when the class is defined, so the replica's copy of the
    app cannot be handed the deployment's arguments; one replica is one process, so a process-wide
    setting is the replica's own.)"""
    global _installed
    _installed = Access(cfg, ledger_name)
    return _installed


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(RequestError(message, param, status=status, code=code).body()).encode()
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, hs


class AccessMiddleware:
    """ASGI middleware: authenticate, bound the body, admit against the key's limits, and report what the
    request used once its response (a stream included) has ended or its client has gone."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        a = _installed
        if scope["type"] != "http" or a is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > a.cfg.max_body_bytes:
            return await _reply(send, *_error(413, f"the request body is {int(length)} bytes; this server takes at most "
                                                   f"{a.cfg.max_body_bytes} (max_body_bytes)", "request_too_large"))
        if not a.cfg.keyed or (path in OPEN_PATHS and not a.cfg.protect_health):
            return await self.app(scope, _bounded(receive, a.cfg.max_body_bytes), send)
        auth = headers.get("authorization")
        key = a.keys.identify(auth)
        if key is None:
            msg = ("You didn't provide an API key: send it as `Authorization: Bearer <key>`" if not auth else
                   "Incorrect API key provided")
            return await _reply(send, *_error(401, msg, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        ok, retry, which = await a.call("admit", key, a.cfg.requests_per_minute, a.cfg.tokens_per_minute)
        if not ok:
            limit = getattr(a.cfg, which)
            return await _reply(send, *_error(429, f"key {key!r} reached {which}={limit}: retry after "
                                                   f"{math.ceil(retry)} s", "rate_limit_exceeded",
                                              headers={"Retry-After": str(max(1, math.ceil(retry)))}))
        grant = Grant(a, key)
        token = _grant.set(grant)
        try:
            await self.app(scope, _bounded(receive, a.cfg.max_body_bytes), send)
        finally:
            _grant.reset(token)
            await a.call("finish", key, grant.tokens, grant.lease)


def _bounded(receive: Any, limit: int) -> Any:
    """`receive`, raising 413 once more than `limit` body bytes have come (a chunked upload has no length)."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestError(f"the request body exceeds {limit} bytes (max_body_bytes)", None, status=413,
                                   code="request_too_large")
        return message

    return wrapped


async def _reply(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
