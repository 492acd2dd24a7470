"""Every error the server answers, as OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``.

``code`` is never null and ``param`` names the request field at fault (``input``, ``layer``, ...) or is null
when no field is. Messages may quote what the client sent, so every string is made valid UTF-8 first (a lone
surrogate would otherwise break the JSON encoder and turn a 400 into a 500).

This module knows nothing of the web framework: :class:`APIError` is raised by the request checks
(:mod:`~matryoshka2d.serve.request`), :func:`error_body` and :func:`raw_response` are the bytes the app and
the connection layer (:mod:`~matryoshka2d.serve.http`) send.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
         408: "request_timeout", 413: "request_too_large", 422: "invalid_request", 429: "queue_full",
         431: "headers_too_large", 500: "internal_error", 503: "service_unavailable"}

SHUTTING_DOWN = ("the server is shutting down and this request was not finished within its graceful timeout "
                 "(--graceful-timeout); retry on another replica")

# documented in the OpenAPI schema of POST /v1/embeddings
DESCRIPTIONS = {
    400: "bad request: a value out of range, empty or invalid text, more inputs than --max-client-batch, an input "
         "over the token limit, or a precision that base64 cannot carry",
    401: "missing or wrong API key", 404: "unknown model", 408: "the body did not arrive in time",
    413: "a request body over the size limit", 429: "the queue is full; retry later",
    500: "the model failed on this request", 503: "the server is shutting down",
}


def clean(text: str) -> str:
    """``text`` as valid UTF-8 (lone surrogates written as ``\\udXXX`` escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered as OpenAI's error JSON.

    Args:
        status: the HTTP status.
        message: one line naming the value, the allowed range and the fix.
        param: the request field at fault (``None``: none is).
        code: OpenAI-style machine-readable code (default: one per status, :data:`CODES`).
        headers: extra response headers (e.g. ``connection: close``).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or CODES.get(status, "error")
        self.headers = headers

    def body(self) -> bytes:
        """The JSON body."""
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error JSON for ``status`` as UTF-8 bytes."""
    error = {"message": clean(message), "type": TYPES.get(status, "invalid_request_error"),
             "param": None if param is None else clean(param), "code": code or CODES.get(status, "error")}
    return json.dumps({"error": error}, ensure_ascii=False).encode("utf-8")


def raw_response(status: int, message: str, *, code: str | None = None) -> bytes:
    """A whole HTTP/1.1 response (JSON error, ``connection: close``), for the connection layer to write before
    any request reached the app (a header timeout, headers too large, an unparsable request)."""
    body = error_body(status, message, code=code)
    reason = HTTPStatus(status).phrase
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


def validation_error(problems: Sequence[dict[str, Any]]) -> APIError:
    """The 400 of a body that does not fit the request schema (FastAPI's validation problems): ``param`` is the
    top-level field at fault (``None`` when the body is not JSON or not an object), the message names its path
    and the first problem."""
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = str(first.get("type", ""))
    if kind.startswith("json") or not loc:  # not JSON, or not an object: the body itself is at fault
        param = None
        message = f"the body is not a JSON object of the request schema ({first.get('msg', 'invalid JSON')})"
    else:
        param = loc[0]
        given = first.get("input")
        shown = f", got {given!r}" if isinstance(given, (str, int, float, bool)) and len(repr(given)) <= 80 else ""
        message = f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}{shown}"
    extra = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    code = "unknown_parameter" if kind == "extra_forbidden" else "invalid_value"
    return APIError(400, f"{message}{extra}; see the schema at /docs", param=param, code=code)
