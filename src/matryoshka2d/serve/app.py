"""The FastAPI application: routes over state. ``POST /v1/embeddings``, ``GET /v1/models``, ``/health``,
``/ready``, ``/info``, ``/metrics``.

:func:`create_app` builds the :class:`ServerState` (model, limits, batcher, metrics) and puts it on
``app.state.server``; each route reads it from there. A request is parsed and checked by
:mod:`~matryoshka2d.serve.request` (tokenised in a worker thread, so the event loop stays free), its rows go
to the :class:`~matryoshka2d.serve.batcher.Batcher`, and the vectors that come back are truncated, normalised,
quantised and encoded (:mod:`~matryoshka2d.serve.output`). Every error is OpenAI's JSON
(:mod:`~matryoshka2d.serve.errors`); the connection layer (API key, body limit and timeout, a catch-all that
answers JSON and keeps the connection usable) is :mod:`~matryoshka2d.serve.http`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from matryoshka2d._version import __version__
from matryoshka2d.serve import schemas
from matryoshka2d.serve.batcher import Batcher, QueueFullError, StoppedError
from matryoshka2d.serve.config import ServeConfig
from matryoshka2d.serve.errors import DESCRIPTIONS, SHUTTING_DOWN, APIError, validation_error
from matryoshka2d.serve.http import Guard, Shield
from matryoshka2d.serve.metrics import Metrics
from matryoshka2d.serve.output import encode_rows, quantize
from matryoshka2d.serve.request import Parsed, Tokens, parse, token_rows
from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import PRECISIONS

try:  # optional: about 10x faster JSON for embedding vectors
    import orjson
except ImportError:  # pragma: no cover - the serve extra installs it
    orjson = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

STOP_WAIT = 0.2  # seconds shutdown waits for the batch the worker is running (its results are dropped)
TOKENIZE_THREADS = 4  # requests tokenised at once, off the event loop
INLINE = 1024  # a request with at most this many characters (or token ids) in all is tokenised on the event
# loop (under 1 ms for MiniLM's tokenizer; 40 characters take 0.04 ms), which saves the thread hop; longer ones
# go to a worker thread

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": text} for status, text in DESCRIPTIONS.items()
}


@dataclass
class ServerState:
    """What the routes share: the model, its limits, the batcher and the metrics."""

    model: MatryoshkaEncoder
    config: ServeConfig
    batcher: Batcher
    metrics: Metrics
    tokens: Tokens
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    aborted: bool = False
    pool: concurrent.futures.ThreadPoolExecutor = field(default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
        TOKENIZE_THREADS, thread_name_prefix="m2d-tokenize"))
    tokenizing: set[asyncio.Future[Any]] = field(default_factory=set)

    async def tokenize(self, parsed: Parsed) -> list[list[int]]:
        """The token rows of ``parsed`` (:func:`~matryoshka2d.serve.request.token_rows`): in a worker thread,
        unless the request is small (:data:`INLINE`).

        Raises:
            APIError: the request's own 400, or 503 when the server aborts it on shutdown.
        """
        if sum(len(item) for item in parsed.items) <= INLINE:
            return token_rows(parsed.items, parsed.truncate, self.tokens)
        if self.aborted:  # the pool is shut down
            raise APIError(503, SHUTTING_DOWN, code="shutting_down")
        future = asyncio.get_running_loop().run_in_executor(self.pool, token_rows, parsed.items, parsed.truncate,
                                                            self.tokens)
        self.tokenizing.add(future)
        try:
            return await future
        except asyncio.CancelledError:
            if self.aborted:
                raise APIError(503, SHUTTING_DOWN, code="shutting_down") from None
            raise
        finally:
            self.tokenizing.discard(future)

    def shut_down(self) -> None:
        """Begin a graceful shutdown (call in the event loop): ``/ready`` says 503, requests in flight still
        run; after ``config.abort_after_s`` every request not yet answered gets a 503 and its rows are dropped,
        so the server exits within its graceful timeout."""
        self.ready = False
        asyncio.get_running_loop().call_later(self.config.abort_after_s, self.abort)

    def abort(self) -> None:
        """Answer every request still waiting for the tokenizer or the model with a 503 and stop computing them."""
        self.aborted = True
        answered = self.batcher.abort(StoppedError(SHUTTING_DOWN))
        for future in list(self.tokenizing):
            answered += future.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if answered:
            logger.warning("shutting down: %d request(s) not finished in time were answered 503", answered)


def state_of(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request``."""
    return request.app.state.server  # type: ignore[no-any-return]


def json_response(payload: dict[str, Any]) -> Response:
    """A JSON response; with orjson, numpy rows are written directly (float32 in its shortest exact form)."""
    if orjson is None:
        return JSONResponse(payload)
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def error_response(error: APIError) -> Response:
    """``error`` as a response."""
    return Response(error.body(), status_code=error.status, media_type="application/json", headers=error.headers)


router = APIRouter()


@router.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, responses=ERRORS)
async def embeddings(body: schemas.EmbeddingRequest, request: Request) -> Response:
    state = state_of(request)
    began = time.perf_counter()
    layer_label = "invalid"  # the label set stays bounded: 1..N or "invalid"
    status = 500
    try:
        parsed = parse(body, state.model, state.config)
        layer_label = str(parsed.layer)
        t0 = time.perf_counter()
        rows = await state.tokenize(parsed)
        state.metrics.tokenize_seconds.observe(time.perf_counter() - t0)
        try:
            future = state.batcher.submit(rows, parsed.route)
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full") from None
        except StoppedError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        state.metrics.queue_rows.set(state.batcher.queued_rows)
        try:
            vectors = await future
        except StoppedError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except Exception as e:
            logger.error("a request failed in the model: %s: %s", type(e).__name__, e)
            raise APIError(500, f"the model failed on this request ({type(e).__name__}: {e}); other requests are "
                           "unaffected", code="model_error") from None
        finally:
            state.metrics.queue_rows.set(state.batcher.queued_rows)
        out = quantize(truncate(vectors, parsed.dim), parsed.precision)  # type: ignore[arg-type]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in
                enumerate(encode_rows(out, parsed.encoding_format, as_lists=orjson is None))]  # type: ignore[arg-type]
        tokens = sum(len(r) for r in rows)
        status = 200
        return json_response({"object": "list", "data": data, "model": state.config.model_name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    except APIError as e:
        status = e.status
        return error_response(e)
    finally:
        state.metrics.requests.labels(status=str(status), layer=layer_label).inc()
        state.metrics.request_seconds.observe(time.perf_counter() - began)


@router.get("/v1/models", response_model=schemas.ModelList, responses={401: ERRORS[401]})
async def models(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": state.created,
                                        "owned_by": "matryoshka2d"}]}


@router.get("/health", response_model=schemas.Status)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=schemas.Status, responses={503: ERRORS[503]})
async def ready(request: Request) -> Response:
    state = state_of(request)
    if state.ready and state.batcher.running:
        return JSONResponse({"status": "ready"})
    return error_response(APIError(503, "not ready: the model is loading or the server is shutting down",
                                   code="not_ready"))


@router.get("/info", responses={401: ERRORS[401]})
async def info(request: Request) -> dict[str, Any]:
    state = state_of(request)
    model, config = state.model, state.config
    return {
        "model": config.model_name, "version": __version__, "architecture": model.backbone.config.model_type,
        "layers": model.num_layers, "hidden_size": model.hidden_size, "exits": list(range(1, model.num_layers + 1)),
        "default_layer": model.default_layer, "default_dim": model.default_dim,
        "heads": {"kind": model.exit_head_kind, "layers": model.exit_head_layers} if model.exit_head_layers else None,
        "pooling": model.pooling, "max_seq_length": state.tokens.max_len, "dtype": config.dtype,
        "backend": config.backend, "precisions": list(PRECISIONS), "limits": config.limits(),
        "document_space": model.document_space,  # which exits an index built at the document exit serves
        "runner": state.batcher.runner.describe() if hasattr(state.batcher.runner, "describe") else None,
    }


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def prometheus(request: Request) -> Response:
    state = state_of(request)
    state.metrics.queue_rows.set(state.batcher.queued_rows)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def invalid_body(request: Request, error: Exception) -> Response:
    """A body that does not fit the schema: 400 naming the field."""
    return error_response(validation_error(error.errors()))  # type: ignore[attr-defined]


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (404 unknown path, 405 wrong method) as OpenAI's JSON."""
    status = getattr(error, "status_code", 500)
    return error_response(APIError(status, str(getattr(error, "detail", error)),
                                   headers=getattr(error, "headers", None)))


def create_app(model: MatryoshkaEncoder, config: ServeConfig, *, threads: int | None = None,
               runner: Any = None) -> FastAPI:
    """The application serving ``model`` under ``config`` (the batcher starts with the app's lifespan).

    Args:
        model: the encoder, on its device, in eval mode (only the batcher thread runs it); its tokenizer,
            limits and exits are what the server checks requests against.
        config: limits and options.
        threads: torch threads of the batcher thread.
        runner: what runs the batches (:mod:`matryoshka2d.serve.runners`; ``None``: the torch model itself).
            Pass an :class:`~matryoshka2d.serve.runners.OnnxRunner` with ``config.backend = "onnx"``, an
            :class:`~matryoshka2d.serve.runners.OpenVinoRunner` with ``"openvino"``
            (:func:`~matryoshka2d.serve.launch.build_app` picks it from the backend).
    """
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=config.max_batch_tokens, max_batch_requests=config.max_batch_requests,
                      batch_wait_ms=config.batch_wait_ms, max_queue=config.max_queue, on_batch=metrics.on_batch,
                      threads=threads, trim_interval=config.trim_interval_s or None, on_trim=metrics.on_trim,
                      runner=runner)
    state = ServerState(model, config, batcher, metrics, Tokens.of(model, config.max_client_batch))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        state.ready = True
        logger.info("serving %s: %d layers, %d dims, limits %s", config.model_name, model.num_layers,
                    model.hidden_size, config.limits())
        try:
            yield
        finally:
            state.ready = False
            state.abort()  # requests still waiting now were cancelled by the server: compute none of them
            await asyncio.to_thread(batcher.stop, STOP_WAIT)
            logger.info("batcher stopped")

    app = FastAPI(title="matryoshka2d embeddings", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible embeddings where each request picks its exit layer and width.")
    app.state.server = state
    app.include_router(router)
    app.add_middleware(Guard, limit=config.max_body_bytes, api_key=config.api_key,
                       body_timeout=config.body_timeout_s)
    app.add_middleware(Shield, on_response=metrics.on_response)  # outermost: sees every response
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schemas.tighten_schema(schema["components"]["schemas"]["EmbeddingRequest"]["properties"],
                                   layers=model.num_layers, dims=model.hidden_size, vocab=state.tokens.vocab,
                                   max_items=config.max_client_batch)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
