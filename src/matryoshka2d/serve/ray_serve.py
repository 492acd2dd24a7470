"""``m2d serve MODEL --replicas N``: the same app as a Ray Serve deployment (the ``ray-serve`` extra).

Each replica is a Ray actor that builds the app from the same :class:`~matryoshka2d.serve.launch.ServeSpec` as a
single ``m2d serve`` process (:func:`~matryoshka2d.serve.launch.build_app`): its own model, runner, batcher and
``--threads`` (the actor reserves that many CPUs), the same API, limits, metrics and errors. Ray Serve's proxy
listens on ``--host:--port`` and spreads requests over the replicas; the app's lifespan (the batcher) runs in
each replica, and a replica's shutdown drains its batcher. ``/metrics`` answers for the replica that took the
request; every response names it in the :data:`REPLICA_HEADER` header.

SIGTERM / Ctrl-C deletes the application (Ray Serve lets each replica finish its requests in flight, within
``--graceful-timeout``), then stops Serve and, when the CLI started it, the local Ray cluster.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
from typing import Any

from matryoshka2d.serve.launch import ServeSpec

logger = logging.getLogger(__name__)

APP_NAME = "m2d"
REPLICA_HEADER = "x-m2d-replica"
TARGET_ONGOING = 32  # autoscaling: requests in flight per replica that Ray Serve aims at (a replica batches them)


def require_ray_serve() -> None:
    """Raises: ImportError naming the ``ray-serve`` extra when Ray Serve is missing."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ImportError("--replicas runs on Ray Serve, which is not installed: pip install "
                          "'matryoshka2d[serve,ray-serve]'")


class ReplicaHeader:
    """ASGI middleware: every response carries :data:`REPLICA_HEADER` with this replica's name."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.name = app, name.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.name)]}
            await send(message)

        await self.app(scope, receive, named)


def replica_app(spec: ServeSpec) -> Any:
    """The app of one replica, built in the replica's process (its temporary folders live as long as it)."""
    import contextlib

    from ray import serve

    from matryoshka2d.serve.launch import build_app

    stack = contextlib.ExitStack()
    app = build_app(spec, stack)
    app.state.resources = stack  # temporary export folders: kept until the replica's process ends
    try:
        name = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - the name is informative only
        name = f"pid-{os.getpid()}"
    app.add_middleware(ReplicaHeader, name=str(name))
    return app


def deployment(spec: ServeSpec, *, replicas: int, autoscale: tuple[int, int] | None = None,
               graceful_timeout: float = 30.0) -> Any:
    """The bound Ray Serve application: ``replicas`` (or ``autoscale`` MIN..MAX) replicas of the app of ``spec``.

    Raises:
        ImportError: Ray Serve missing (the ``ray-serve`` extra).
    """
    require_ray_serve()
    from ray import serve

    def build() -> Any:  # a plain function: Ray Serve calls it in each replica (cloudpickled with ``spec``)
        return replica_app(spec)

    scaling: dict[str, Any] = {"num_replicas": replicas}
    if autoscale is not None:
        scaling = {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                          "initial_replicas": replicas, "target_ongoing_requests": TARGET_ONGOING}}

    class Replica:
        """One ``m2d serve`` app (the class body is empty: the app is built by ``build``)."""

    cls = serve.ingress(build)(Replica)
    resources: dict[str, Any] = {"num_cpus": spec.threads or 1}
    if spec.device.startswith("cuda"):
        resources["num_gpus"] = 1  # one GPU per replica (untested: no GPU here)
    return serve.deployment(
        cls, name="m2d-serve", ray_actor_options=resources,
        max_ongoing_requests=spec.config.max_queue,  # the app's own queue limit (429) is the one that binds
        graceful_shutdown_timeout_s=graceful_timeout, health_check_period_s=10, **scaling,
    ).bind()


def serve_replicas(spec: ServeSpec, *, replicas: int, autoscale: tuple[int, int] | None = None,
                   host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                   graceful_timeout: float = 30.0, stop: threading.Event | None = None) -> None:
    """Deploy on Ray Serve and block until SIGTERM / SIGINT (or ``stop``), then drain and shut down.

    Args:
        spec: what each replica serves.
        replicas: replicas to start with.
        autoscale: ``(MIN, MAX)`` replicas for Ray Serve's autoscaler (``None``: a fixed count).
        host, port: where Ray Serve's HTTP proxy listens.
        address: the Ray cluster to join (``None``: start a local one on this machine).
        graceful_timeout: seconds a replica may take to finish its requests in flight at shutdown.
        stop: set it to stop (for tests and embedding); signals also stop.

    Raises:
        ImportError: Ray Serve missing (the ``ray-serve`` extra).
    """
    require_ray_serve()
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:  # a local cluster is this machine's alone: every Ray process on 127.0.0.1
        local = {"_node_ip_address": "127.0.0.1"} if address is None else {}
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **local)
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(spec, replicas=replicas, autoscale=autoscale, graceful_timeout=graceful_timeout),
                  name=APP_NAME, route_prefix="/")
        logger.info("serving %s on http://%s:%d with %s replicas on Ray Serve (%s)", spec.config.model_name, host,
                    port, f"{autoscale[0]}..{autoscale[1]}" if autoscale else replicas,
                    address or "a local Ray cluster")
        print(f"ready: http://{host}:{port} ({replicas} replicas)", flush=True)
        stop.wait()
        logger.info("stopping: the replicas finish their requests in flight")
        serve.delete(APP_NAME)  # graceful: each replica drains (its lifespan stops its batcher) before it ends
    finally:
        serve.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            ray.shutdown()  # a local cluster stops; a joined one is only left
