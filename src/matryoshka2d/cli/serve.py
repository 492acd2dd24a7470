"""``m2d serve MODEL``: the OpenAI-compatible embeddings server (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from matryoshka2d.cli.common import add_model_args, load_model
from matryoshka2d.vocab import SERVE_BACKENDS, SERVE_DTYPES, install_hint

if TYPE_CHECKING:
    from fastapi import FastAPI

    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.serve.config import ServeConfig

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve embeddings over an OpenAI-compatible HTTP API, any exit and width")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", choices=["auto", *SERVE_BACKENDS],
                   help="auto (default: openvino where installed, else torch), torch (one mixed-depth pass per "
                        "batch, any --device), onnx or openvino (every exit exported at start-up, kept in "
                        "--export-dir; the onnx / openvino extras)")
    p.add_argument("--export-dir", "--onnx-dir", dest="export_dir", default=None,
                   help="onnx / openvino: keep the exported exits here and reuse them on the next start when they "
                        "still match the model; a new or empty folder, or one m2d serve wrote (default: a temporary "
                        "folder, removed at exit)")
    p.add_argument("--precision", default="auto", choices=["auto", "f32", "bf16"],
                   help="openvino: auto (default: bf16 where the CPU runs it natively and every exit's recorded "
                        "bf16 checks hold, STS-B within 0.2 of fp32 where the data is found; else f32), f32 or bf16")
    p.add_argument("--dtype", default="fp32", choices=SERVE_DTYPES,
                   help="torch backend's backbone dtype (default fp32; fp16 on a GPU)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; cuda for a GPU, torch backend)")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads of the model, per replica (default: the runtime's)")
    p.add_argument("--served-model-name", default=None,
                   help="the id clients pass as model (default: the model's own name from its metadata, e.g. "
                        "its source model, else the MODEL argument's last path part)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per batch (default 16384)")
    p.add_argument("--max-batch-requests", type=int, default=256, help="inputs per batch (default 256)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="longest wait for more requests before a batch that is not full runs (default 2)")
    p.add_argument("--max-queue", type=int, default=4096, help="inputs that may wait; beyond: 429 (default 4096)")
    p.add_argument("--max-client-batch", type=int, default=2048, help="inputs per request (default 2048)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit (default 4 MiB)")
    p.add_argument("--trim-interval-s", type=float, default=2.0,
                   help="hand the free C heap back to the OS after a batch at most this often, so resident memory "
                        "stays flat (default 2; 0: never)")
    p.add_argument("--no-truncation", dest="truncate", action="store_false",
                   help="reject inputs over the model's token limit (400) instead of cutting them")
    p.add_argument("--api-key", default=os.environ.get("M2D_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $M2D_API_KEY, else no key)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight; those not answered by then get 503 and the "
                        "process exits (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request's body has to arrive after its headers (default 30)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections; beyond it the oldest idle or half-open one is closed (default: what the "
                        "process's file limit allows)")
    r = p.add_argument_group("replicas on Ray Serve (the ray-serve extra; docs/serving.md)")
    r.add_argument("--replicas", type=int, default=None,
                   help="serve the same app as N Ray Serve replicas, each with its own batcher and --threads")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto); default: a local one")
    r.add_argument("--autoscale", default=None,
                   help="MIN,MAX: let Ray Serve scale the replicas between MIN and MAX (--replicas is the start)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the flags, take the port, load the model, serve; after SIGTERM, end the process (exit 0)."""
    try:
        import uvicorn  # noqa: F401 - checked here, used by serve_app

        from matryoshka2d.serve import http
        from matryoshka2d.serve.app import create_app  # noqa: F401 - the serve extra, checked before any work
    except ImportError as e:
        raise ImportError(f"m2d serve needs the serve extra ({e}): {install_hint('serve')}") from None
    import torch

    from matryoshka2d.encoder.devices import check_device
    from matryoshka2d.serve.config import ServeConfig
    from matryoshka2d.serve.exports import claim_folder
    from matryoshka2d.serve.launch import ServeSpec, build_app, check_spec, default_backend, prepare_model

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is out of range 0..65535; pass e.g. 8000")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1; pass e.g. 2")
    backend, why = (default_backend(device=args.device, dtype=args.dtype) if args.backend == "auto"
                    else (args.backend, "asked for (--backend)"))
    config = ServeConfig(model_name=args.served_model_name or "model", max_batch_tokens=args.max_batch_tokens,
                         max_batch_requests=args.max_batch_requests, batch_wait_ms=args.batch_wait_ms,
                         max_queue=args.max_queue, max_client_batch=args.max_client_batch,
                         max_body_bytes=args.max_body_bytes, truncate=args.truncate, api_key=args.api_key,
                         dtype=args.dtype, backend=backend, trim_interval_s=args.trim_interval_s,
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                         keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
                         graceful_timeout_s=args.graceful_timeout)
    spec = ServeSpec(model=str(args.model), config=config, pooling=args.pooling,
                     trust_remote_code=args.trust_remote_code, max_seq_length=args.max_seq_length,
                     device=args.device, threads=args.threads, precision=args.precision,
                     export_dir=args.export_dir, backend_why=why)
    check_spec(spec)
    check_device(args.device)
    replicas = replica_options(args)
    if args.export_dir and backend != "torch":
        claim_folder(args.export_dir, flag="--export-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    if replicas is not None:
        from matryoshka2d.serve.ray_serve import serve_replicas

        http.bind(args.host, args.port).close()  # a busy port fails before the model loads; Ray's proxy takes it
        logger.info("backend %s (%s)", backend, why)
        model = load_model(args)  # checks the folder and --max-seq-length before anything starts
        spec = dataclasses.replace(spec, config=named(config, args, model))
        del model  # each replica loads its own
        serve_replicas(spec, host=args.host, port=args.port, address=args.ray_address,
                       graceful_timeout=args.graceful_timeout, **replicas)
        return 0
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(http.bind(args.host, args.port))  # before the model loads: a busy port fails fast
        logger.info("backend %s (%s)", backend, why)
        model = load_model(args)
        spec = dataclasses.replace(spec, config=named(config, args, model))
        app = build_app(spec, stack, model=prepare_model(model, spec))
        terminated = serve_app(app, args, sock, spec.config)
    if terminated:
        # SIGTERM stopped the server and every request was answered (200 or 503). End the process now: threads
        # still tokenising or running a batch for requests already answered 503 must not hold the exit past
        # --graceful-timeout, nor must the interpreter's final garbage collection.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def named(config: ServeConfig, args: argparse.Namespace, model: MatryoshkaEncoder) -> ServeConfig:
    """``config`` with the served id: ``--served-model-name``, else the model's own name
    (:func:`~matryoshka2d.serve.config.default_model_name`)."""
    from matryoshka2d.serve.config import default_model_name

    if args.served_model_name:
        return config
    return dataclasses.replace(config, model_name=default_model_name(model.metadata, str(args.model)))


def replica_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--replicas`` / ``--autoscale`` checked (``None``: one process, no Ray).

    Raises:
        ValueError: a count out of range, a malformed ``--autoscale``, Ray flags without ``--replicas``.
    """
    if args.replicas is None:
        if args.ray_address is not None or args.autoscale is not None:
            raise ValueError("--ray-address and --autoscale deploy on Ray Serve; pass --replicas N as well")
        return None
    if not 1 <= args.replicas <= 1024:
        raise ValueError(f"--replicas {args.replicas} is out of range 1..1024; pass e.g. 2")
    autoscale = None
    if args.autoscale is not None:
        parts = args.autoscale.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--autoscale {args.autoscale!r} is not MIN,MAX; pass e.g. 1,4")
        low, high = (int(p) for p in parts)
        if not 1 <= low <= args.replicas <= high:
            raise ValueError(f"--autoscale {low},{high} with --replicas {args.replicas}: need 1 <= MIN <= "
                             "--replicas <= MAX; pass e.g. --replicas 2 --autoscale 1,4")
        autoscale = (low, high)
    return {"replicas": args.replicas, "autoscale": autoscale}


def serve_app(app: FastAPI, args: argparse.Namespace, sock: socket.socket, config: ServeConfig) -> bool:
    """Run ``app`` under uvicorn on ``sock`` until SIGTERM / Ctrl-C (graceful: requests in flight are finished,
    those not finished within ``--graceful-timeout`` get 503); return whether SIGTERM stopped it."""
    from matryoshka2d.serve import http

    state = app.state.server
    quiet = getattr(args, "quiet", False) and args.log_level == "info"
    # uvicorn handles SIGTERM itself (stop accepting, finish requests in flight, run the lifespan shutdown),
    # then re-raises the signal to the handler that was installed before it started. With this no-op handler
    # the graceful stop ends in exit code 0 instead of death by SIGTERM.
    signal.signal(signal.SIGTERM, _after_graceful_stop)
    return http.run(app, sock, header_timeout=config.header_timeout_s, keep_alive=config.keep_alive_s,
                    max_connections=config.max_connections or http.connection_budget(),
                    graceful_timeout=config.abort_after_s, log_level="warning" if quiet else args.log_level,
                    on_signal=state.shut_down, on_response=state.metrics.on_response)


def _after_graceful_stop(signum: int, frame: object) -> None:
    logger.info("stopped on signal %d after a graceful shutdown", signum)
