"""The one error type every serving route raises for bad input, and its OpenAI-shaped body.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}` and raise on 4xx, so a bad
request surfaces in the client as a clear exception naming the field, while the replica goes on.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the server will not run: 4xx, with the offending field in `param`."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
