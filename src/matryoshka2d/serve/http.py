"""The connection layer: what stands between a socket and the routes.

- :class:`Shield` (outermost ASGI middleware): every response is counted by status; an exception a route did
  not turn into an error becomes a 500 JSON (the connection stays usable), and a request the server cancels
  on shutdown gets a 503 JSON with ``connection: close``, never uvicorn's plain-text 500 and a traceback.
- :class:`Guard` (ASGI middleware): the API key (401) on ``/v1/*`` and ``/info``, then the body: 413 over the
  size limit, 408 when it does not arrive within ``body_timeout`` seconds (both with ``connection: close``).
- :func:`protocol_class`: uvicorn's HTTP protocol (httptools) with what uvicorn lacks: a header timeout (a
  connection that opens, or finishes a response, must send the next request's headers within
  ``header_timeout`` seconds), a header size limit (431), JSON for unparsable requests (400), and a
  connection limit that sheds the oldest connection without a request in progress, so half-open
  connections cannot use up the file limit and lock new clients out.
- :func:`bind` takes the port before the model loads (one line when it is in use), :func:`run` serves the
  app on it and turns SIGTERM into a graceful shutdown that ends within the graceful timeout.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from typing import Any

from matryoshka2d.serve.errors import SHUTTING_DOWN, APIError, raw_response

logger = logging.getLogger(__name__)

BACKLOG = 64  # connections the kernel queues before accept; also the most accepted in one burst
HEADER_BYTES = 64 * 1024  # request line + headers
TOO_LONG = f"the request line and headers are over {HEADER_BYTES} bytes; send shorter headers"
RESERVED_FILES = 32  # files kept free for the process itself (model files, logs, threads' pipes)

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


async def send_error(send: Send, error: APIError) -> None:
    """Send ``error`` as a whole ASGI response."""
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Shield:
    """ASGI middleware, outermost: counts every response by status and answers what escaped the routes.

    Args:
        app: the application.
        on_response: called with the status of every response.
    """

    def __init__(self, app: Any, on_response: Callable[[int], None]) -> None:
        self.app, self.on_response = app, on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:  # the server gave up on this request (shutdown past its timeout)
            if not status:
                await send_error(tracked, APIError(503, SHUTTING_DOWN, code="shutting_down",
                                                   headers={"connection": "close"}))
        except Exception as error:  # a bug: one 500 JSON, the log says what, the connection stays usable
            logger.exception("unexpected error on %s", scope.get("path", "?"))
            if not status:
                await send_error(tracked, APIError(500, f"internal error: {type(error).__name__}; the server keeps "
                                                   "running, see its log", code="internal_error"))
        finally:
            if status:
                self.on_response(status[0])


class Guard:
    """ASGI middleware: the API key (401) on ``/v1/*`` and ``/info``, then the body size limit (413 before the
    app reads it) and the body timeout (408).

    Args:
        app: the application.
        limit: the most bytes a body may have.
        api_key: the key ``Authorization: Bearer`` must carry (``None``: no key needed).
        body_timeout: seconds the whole body may take to arrive after the headers.
    """

    def __init__(self, app: Any, limit: int, api_key: str | None = None, body_timeout: float = 30.0) -> None:
        self.app, self.limit, self.body_timeout = app, limit, body_timeout
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
                await send_error(send, APIError(401, "missing or wrong API key: send the header 'Authorization: "
                                                "Bearer <key>' with the key the server was started with "
                                                "(--api-key)", code="invalid_api_key"))
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_error(send, self.too_large(int(declared)))
            return
        body = await self.read_body(receive, send)
        if body is None:
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # type: ignore[no-any-return]

        await self.app(scope, replay, send)

    async def read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body (bounded by the limit and the timeout), or ``None`` when the request was answered (413,
        408) or the client left."""
        chunks, size, more = [], 0, True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await send_error(send, APIError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s of its headers; send the "
                    "whole body at once", code="request_timeout", headers={"connection": "close"}))
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, self.too_large(size))
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body has {'at least ' if size > self.limit else ''}{size} bytes, over the "
                        f"limit of {self.limit}; send fewer or shorter inputs per request", code="request_too_large",
                        headers={"connection": "close"})


def connection_budget() -> int:
    """How many connections the process's file limit leaves room for: the soft ``RLIMIT_NOFILE`` minus the
    files open now, one accept burst (:data:`BACKLOG`) and :data:`RESERVED_FILES`; at least 8."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        used = 64
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(8, int(soft) - used - BACKLOG - RESERVED_FILES)


def protocol_class(*, header_timeout: float, max_connections: int,
                   on_response: Callable[[int], None] | None = None) -> type:
    """uvicorn's httptools protocol with a header timeout, a header size limit, JSON for bad requests, and a
    connection limit that sheds idle connections first (see the module's docstring).

    Raises:
        ImportError: httptools is missing (the serve extra installs it).
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as e:
        raise ImportError(f"m2d serve needs httptools ({e}); pip install -e '.[serve]'") from None

    class GuardedProtocol(HttpToolsProtocol):  # type: ignore[misc]
        """One connection; ``waiting`` is the header timer, set while no request is in progress."""

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.opened, self.head_bytes, self.waiting = self.loop.time(), 0, None
            self.arm()
            if len(self.connections) > max_connections:
                self.shed()

        def arm(self) -> None:
            self.disarm()
            self.head_bytes = self.parsed_head = 0
            self.waiting = self.loop.call_later(header_timeout, self.header_timeout)

        def disarm(self) -> None:
            if getattr(self, "waiting", None) is not None:
                self.waiting.cancel()
                self.waiting = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.waiting is not None and not self.transport.is_closing():
                self.head_bytes += len(data)  # headers trickling in without an end
                if self.head_bytes > HEADER_BYTES:
                    self.refuse(431, TOO_LONG)

        def on_url(self, url: bytes) -> None:
            self.count_head(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.count_head(name + value)
            super().on_header(name, value)

        def count_head(self, part: bytes) -> None:
            """Count the request line and headers as the parser sees them; past the limit, stop the parser (its
            error comes back as :meth:`send_400_response`, which answers 431)."""
            self.parsed_head = getattr(self, "parsed_head", 0) + len(part)
            if self.parsed_head > HEADER_BYTES:
                raise ValueError(TOO_LONG)

        def on_headers_complete(self) -> None:
            self.disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self.arm()  # the next request's headers must come in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def header_timeout(self) -> None:
            self.waiting = None
            if self.head_bytes:
                self.refuse(408, f"the request headers did not arrive within {header_timeout:g} s; send the whole "
                            "request at once")
            elif not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            if getattr(self, "parsed_head", 0) > HEADER_BYTES:
                self.refuse(431, TOO_LONG)
            else:
                self.refuse(400, f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); check the client")

        def refuse(self, status: int, message: str) -> None:
            self.disarm()
            if not self.transport.is_closing():
                self.transport.write(raw_response(status, message))
                self.transport.close()
            if on_response is not None:
                on_response(status)

        def shed(self) -> None:
            idle = [c for c in self.connections
                    if c is not self and getattr(c, "waiting", None) is not None and not c.transport.is_closing()]
            if idle:
                oldest = min(idle, key=lambda c: c.opened)
                oldest.disarm()
                oldest.transport.close()
                return
            self.refuse(503, f"the server has {max_connections} connections open, all with a request in progress "
                        "(--max-connections); retry in a moment")

    return GuardedProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, taken before the model loads.

    Raises:
        ValueError: the port is in use, or the address is not one of this machine's.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({e.strerror}); pass e.g. "
                         "127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port} on {host} is in use (another server?); pass another --port or stop "
                             "the process that holds it") from None
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --host or --port") from None
    sock.set_inheritable(True)
    return sock


def run(app: Any, sock: socket.socket, *, header_timeout: float, keep_alive: float, max_connections: int,
        graceful_timeout: float, log_level: str = "info", on_signal: Callable[[], None] | None = None,
        on_response: Callable[[int], None] | None = None) -> bool:
    """Serve ``app`` on ``sock`` under uvicorn until SIGTERM / Ctrl-C; return whether SIGTERM stopped it.

    On the first signal, ``on_signal`` runs in the event loop (the app's graceful shutdown, which answers what
    it has not finished after ``graceful_timeout`` s with 503); uvicorn stops accepting, waits for the requests
    in flight (at most ``graceful_timeout`` s, then cancels them: :class:`Shield` answers 503), then runs the
    app's lifespan shutdown.
    """
    import uvicorn

    terminated: list[int] = []

    class Server(uvicorn.Server):  # type: ignore[misc]
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            if sig == signal.SIGTERM:
                terminated.append(sig)
            super().handle_exit(sig, frame)
            if first and on_signal is not None:
                asyncio.get_event_loop().call_soon_threadsafe(on_signal)

    protocol = protocol_class(header_timeout=header_timeout, max_connections=max_connections,
                              on_response=on_response)
    logger.info("at most %d connections (file limit %d), headers within %g s, idle keep-alive %g s; on SIGTERM, "
                "requests unanswered after %g s get 503", max_connections,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0], header_timeout, keep_alive, graceful_timeout)
    config = uvicorn.Config(app, http=protocol, log_level=log_level, timeout_keep_alive=keep_alive,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=graceful_timeout, backlog=BACKLOG,
                            access_log=log_level == "debug")
    Server(config).run(sockets=[sock])
    return bool(terminated)
