"""The FastAPI application: ``POST /v1/embeddings``, ``GET /v1/models``, ``/health``, ``/ready``, ``/info``,
``/metrics``. Every error is OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``.

A request is checked and tokenised in the event loop (before it can join a batch, so a bad request never
reaches the model), its rows go to the :class:`~matryoshka2d.serve.batcher.Batcher`, and the vectors that
come back are truncated, normalised, quantised and encoded (:mod:`~matryoshka2d.serve.output`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matryoshka2d import truncation
from matryoshka2d._version import __version__
from matryoshka2d.encoder.tokenization import tokenize_unpadded
from matryoshka2d.serve import schemas
from matryoshka2d.serve.batcher import Batcher, QueueFullError, StoppedError
from matryoshka2d.serve.config import ServeConfig
from matryoshka2d.serve.metrics import Metrics
from matryoshka2d.serve.output import encode_rows, quantize

try:  # optional: about 10x faster JSON for embedding vectors
    import orjson
except ImportError:  # pragma: no cover - the serve extra installs it
    orjson = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": description} for status, description in (
        (400, "bad request: a value out of range, empty input, more inputs than --max-client-batch, an input "
              "over the token limit"),
        (401, "missing or wrong API key"), (404, "unknown model"),
        (413, "a request body over the size limit"), (429, "the queue is full; retry later"),
        (500, "the model failed on this request"), (503, "the server is shutting down"))
}
THREADED_TOKENIZE = 16  # requests with more inputs are tokenised in a worker thread (the event loop stays free)


def json_response(payload: dict[str, Any]) -> Response:
    """A JSON response; with orjson, numpy rows are written directly (float32 in its shortest exact form)."""
    if orjson is None:
        return JSONResponse(payload)
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's ``{"error": {...}}`` JSON with ``status``."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware, before anything else: the API key (401) on ``/v1/*`` and ``/info``, then the body size
    limit (413 before the app reads the body).
    """

    def __init__(self, app: ASGIApp, limit: int, api_key: str | None = None) -> None:
        self.app, self.limit = app, limit
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.key is not None and (path.startswith("/v1/") or path == "/info"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                          "<key>' with the key the server was started with (--api-key)",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:  # read the whole body first (bounded by the limit), then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(scope, receive, send, size)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = error_response(413, f"the request body has {'at least ' if size > self.limit else ''}{size} "
                                  f"bytes, over the limit of {self.limit}; send fewer or shorter inputs per "
                                  "request", code="request_too_large", headers={"connection": "close"})
        await response(scope, receive, send)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's tokens (e.g. ``[CLS]`` and ``[SEP]``).

    Raises:
        ValueError: the tokenizer's special tokens cannot be located around a probe token.
    """
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            return list(full[:start]), list(full[start + len(probe):])
    raise ValueError("cannot tell where this tokenizer puts its special tokens, so token-id inputs cannot be "
                     "served; use a standard BERT/MPNet/DistilBERT tokenizer")


def tighten_schema(properties: dict[str, Any], *, layers: int, dims: int, vocab: int, max_items: int) -> None:
    """Write this model's bounds into the ``EmbeddingRequest`` JSON schema (layer 1..N, dimensions 1..D, token
    ids 0..vocab-1, non-empty inputs, at most ``max_items`` of them), so the schema says what the server accepts.
    """
    text, texts, ids, id_lists = properties["input"]["anyOf"]
    text["minLength"] = 1
    texts.update(minItems=1, maxItems=max_items)
    texts["items"]["minLength"] = 1
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    ids.update(minItems=1, items=dict(token))
    id_lists.update(minItems=1, maxItems=max_items, items={"type": "array", "minItems": 1, "items": dict(token)})
    for name, upper in (("layer", layers), ("dimensions", dims)):
        for option in properties[name]["anyOf"]:
            if option.get("type") == "integer":
                option.update(minimum=1, maximum=upper)


def create_app(model: MatryoshkaEncoder, config: ServeConfig, *, threads: int | None = None,
               runner: Any = None) -> FastAPI:
    """The application serving ``model`` under ``config`` (the batcher starts with the app's lifespan).

    Args:
        model: the encoder, on its device, in eval mode (only the batcher thread runs it); its tokenizer,
            limits and exits are what the server checks requests against.
        config: limits and options.
        threads: torch threads of the batcher thread.
        runner: what runs the batches (:mod:`matryoshka2d.serve.runners`; ``None``: the torch model itself).
            Pass an :class:`~matryoshka2d.serve.runners.OnnxRunner` with ``config.backend = "onnx"``.
    """
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=config.max_batch_tokens, max_batch_requests=config.max_batch_requests,
                      batch_wait_ms=config.batch_wait_ms, max_queue=config.max_queue, on_batch=metrics.on_batch,
                      threads=threads, trim_interval=config.trim_interval_s or None, on_trim=metrics.on_trim,
                      runner=runner)
    tokenizer = model.tokenizer
    max_len = model.max_seq_length
    prefix, suffix = special_tokens(tokenizer)
    specials = len(prefix) + len(suffix)
    vocab = len(tokenizer)
    created = int(time.time())
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        state["ready"] = True
        logger.info("serving %s: %d layers, %d dims, limits %s", config.model_name, model.num_layers,
                    model.hidden_size, config.limits())
        try:
            yield
        finally:
            state["ready"] = False
            await asyncio.to_thread(batcher.stop)  # finishes every queued row first
            logger.info("batcher stopped")

    app = FastAPI(title="matryoshka2d embeddings", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible embeddings where each request picks its exit layer and width.")
    app.add_middleware(Guard, limit=config.max_body_bytes, api_key=config.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        extra = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}{extra}; see the schema at "
                              "/docs", param=loc[0] if loc else None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}; the server keeps running, see its log")

    def token_rows(body: schemas.EmbeddingRequest, truncate: bool) -> list[list[int]]:
        """Token ids (special tokens included) of every input, checked against the limits."""
        items: Any = body.input
        if isinstance(items, str):
            items = [items]
        if len(items) == 0:
            raise APIError(400, "input is empty: send a string, a non-empty list of strings or of token ids",
                           param="input", code="empty_input")
        if isinstance(items[0], int):
            items = [items]
        if len(items) > config.max_client_batch:
            raise APIError(400, f"input has {len(items)} items, over the limit of {config.max_client_batch} per "
                           "request (--max-client-batch); split it into several requests", param="input",
                           code="too_many_inputs")
        if isinstance(items[0], str):
            for i, text in enumerate(items):
                if not text:
                    raise APIError(400, f"input[{i}] is an empty string; send text with at least one character",
                                   param="input", code="empty_input")
            tokens = tokenize_unpadded(tokenizer, items, max_len if truncate else max_len + 1)
            rows = tokens.input_ids
            if not truncate:
                for i, ids in enumerate(rows):
                    if len(ids) > max_len:
                        raise APIError(400, f"input[{i}] has more than {max_len} tokens, the model's limit, and "
                                       "truncation is off; shorten it or send truncate=true", param="input",
                                       code="context_length_exceeded")
            return [list(ids) for ids in rows]
        rows = []
        for i, ids in enumerate(items):
            if len(ids) == 0:
                raise APIError(400, f"input[{i}] is an empty token list; send at least one token id",
                               param="input", code="empty_input")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"input[{i}] holds token id {bad}, out of range: this model's vocabulary has "
                               f"ids 0..{vocab - 1}", param="input", code="invalid_token_id")
            if len(ids) + specials > max_len:
                if not truncate:
                    raise APIError(400, f"input[{i}] has {len(ids) + specials} tokens with the special tokens, "
                                   f"over the model's limit of {max_len}, and truncation is off; shorten it or "
                                   "send truncate=true", param="input", code="context_length_exceeded")
                ids = ids[: max_len - specials]
            rows.append([*prefix, *ids, *suffix])
        return rows

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, responses=_ERRORS)
    async def embeddings(body: schemas.EmbeddingRequest, request: Request) -> Response:
        began = time.perf_counter()
        layer_label = "invalid"  # the label set stays bounded: 1..N or "invalid"
        status = 500
        try:
            if body.model is not None and body.model != config.model_name:
                raise APIError(404, f"model {body.model!r} does not exist here; this server serves "
                               f"{config.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
            try:
                layer = model.check_layer(body.layer)
            except ValueError as e:
                raise APIError(400, str(e), param="layer", code="invalid_layer") from None
            try:
                dim = model.check_dim(body.dimensions)
            except ValueError as e:
                raise APIError(400, str(e).replace("dim ", "dimensions ", 1), param="dimensions",
                               code="invalid_dimensions") from None
            layer_label = str(layer)
            truncate = config.truncate if body.truncate is None else body.truncate
            t0 = time.perf_counter()
            n_items = 1 if isinstance(body.input, str) else len(body.input)
            if n_items > THREADED_TOKENIZE:
                rows = await asyncio.to_thread(token_rows, body, truncate)
            else:
                rows = token_rows(body, truncate)
            metrics.tokenize_seconds.observe(time.perf_counter() - t0)
            try:
                future = batcher.submit(rows, layer)
            except QueueFullError as e:
                raise APIError(429, str(e), code="queue_full") from None
            except StoppedError as e:
                raise APIError(503, str(e), code="shutting_down") from None
            metrics.queue_rows.set(batcher.queued_rows)
            try:
                vectors = await future
            except Exception as e:
                logger.exception("request failed in the model")
                raise APIError(500, f"the model failed on this request ({type(e).__name__}: {e}); other "
                               "requests are unaffected", code="model_error") from None
            finally:
                metrics.queue_rows.set(batcher.queued_rows)
            out = quantize(truncation.truncate(vectors, dim), body.precision)
            data = [{"object": "embedding", "index": i, "embedding": e}
                    for i, e in enumerate(encode_rows(out, body.encoding_format, as_lists=orjson is None))]
            tokens = sum(len(r) for r in rows)
            status = 200
            return json_response({"object": "list", "data": data, "model": config.model_name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        except APIError as e:
            status = e.status
            return e.response()
        finally:
            metrics.requests.labels(status=str(status), layer=layer_label).inc()
            metrics.request_seconds.observe(time.perf_counter() - began)

    @app.get("/v1/models", response_model=schemas.ModelList, responses={401: _ERRORS[401]})
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "matryoshka2d"}]}

    @app.get("/health", response_model=schemas.Status)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=schemas.Status, responses={503: _ERRORS[503]})
    async def ready() -> Response:
        if state["ready"] and batcher.running:
            return JSONResponse({"status": "ready"})
        return error_response(503, "not ready: the model is loading or the server is shutting down",
                              code="not_ready")

    @app.get("/info", responses={401: _ERRORS[401]})
    async def info(request: Request) -> dict[str, Any]:
        return {
            "model": config.model_name, "version": __version__, "architecture": model.backbone.config.model_type,
            "layers": model.num_layers, "hidden_size": model.hidden_size, "exits": list(range(1, model.num_layers + 1)),
            "default_layer": model.default_layer, "default_dim": model.default_dim,
            "heads": {"kind": model.exit_head_kind, "layers": model.exit_head_layers} if model.exit_head_layers
            else None,
            "pooling": model.pooling, "max_seq_length": max_len, "dtype": config.dtype, "backend": config.backend,
            "precisions": ["float32", "int8", "uint8", "binary", "ubinary"], "limits": config.limits(),
        }

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        metrics.queue_rows.set(batcher.queued_rows)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            tighten_schema(schema["components"]["schemas"]["EmbeddingRequest"]["properties"],
                           layers=model.num_layers, dims=model.hidden_size, vocab=vocab,
                           max_items=config.max_client_batch)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.batcher, app.state.metrics = batcher, metrics
    return app

