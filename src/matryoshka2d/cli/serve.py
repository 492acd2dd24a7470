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
import tempfile
from typing import TYPE_CHECKING

from matryoshka2d.cli.common import add_model_args, load_model

if TYPE_CHECKING:
    from fastapi import FastAPI

    from matryoshka2d.serve.config import ServeConfig

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve embeddings over an OpenAI-compatible HTTP API, any exit and width")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch (default: one mixed-depth pass per batch) or onnx (every exit exported to ONNX at "
                        "start-up and run with onnxruntime; needs the onnx extra)")
    p.add_argument("--onnx-dir", default=None,
                   help="--backend onnx: keep the exported exits here and reuse them on the next start when they "
                        "still match the model; a new or empty folder, or one m2d serve wrote (default: a temporary "
                        "folder, removed at exit)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the model (default: torch's)")
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
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the flags, take the port, load the model, serve; after SIGTERM, end the process (exit 0)."""
    try:
        import uvicorn  # noqa: F401 - checked here, used by serve_app

        from matryoshka2d.serve import http
        from matryoshka2d.serve.app import create_app
    except ImportError as e:
        raise ImportError(f"m2d serve needs the serve extra ({e}); pip install -e '.[serve]'") from None
    import torch

    from matryoshka2d.encoder.devices import check_device
    from matryoshka2d.serve.config import ServeConfig, default_model_name
    from matryoshka2d.serve.runners import claim_folder

    if getattr(args, "quiet", False):
        quiet_libraries()
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is out of range 0..65535; pass e.g. 8000")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1; pass e.g. 2")
    config = ServeConfig(model_name=args.served_model_name or "model", max_batch_tokens=args.max_batch_tokens,
                         max_batch_requests=args.max_batch_requests, batch_wait_ms=args.batch_wait_ms,
                         max_queue=args.max_queue, max_client_batch=args.max_client_batch,
                         max_body_bytes=args.max_body_bytes, truncate=args.truncate, api_key=args.api_key,
                         dtype=args.dtype, backend=args.backend, trim_interval_s=args.trim_interval_s,
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                         keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
                         graceful_timeout_s=args.graceful_timeout)
    if args.backend == "onnx":
        from matryoshka2d.export.runtime import require_onnx

        require_onnx()
        if args.device != "cpu":
            raise ValueError(f"--device {args.device}: the onnx backend runs on the CPU; pass --device cpu or "
                             "--backend torch")
        if args.onnx_dir:
            claim_folder(args.onnx_dir, flag="--onnx-dir")
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(http.bind(args.host, args.port))  # before the model loads: a busy port fails fast
        model = load_model(args).eval().to(args.device)
        if args.dtype == "bf16":
            model.backbone.to(torch.bfloat16)
        if not args.served_model_name:
            config = dataclasses.replace(config, model_name=default_model_name(model.metadata, str(args.model)))
        runner = None
        if args.backend == "onnx":
            from matryoshka2d.serve.runners import OnnxRunner

            folder = args.onnx_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="m2d-serve-onnx-"))
            logger.info("exporting the %d exits to ONNX in %s", model.num_layers, folder)
            runner = OnnxRunner.from_model(model, folder, threads=args.threads)
        terminated = serve_app(create_app(model, config, threads=args.threads, runner=runner), args, sock, config)
    if terminated:
        # SIGTERM stopped the server and every request was answered (200 or 503). End the process now: threads
        # still tokenising or running a batch for requests already answered 503 must not hold the exit past
        # --graceful-timeout, nor must the interpreter's final garbage collection.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


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


def quiet_libraries() -> None:
    """``-q``: no progress bars (tqdm, Hugging Face) and no known library warnings (numba's deprecations)."""
    import warnings

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    warnings.filterwarnings("ignore", module=r"numba(\.|$)")
    warnings.filterwarnings("ignore", message=r".*numba.*")


def _after_graceful_stop(signum: int, frame: object) -> None:
    logger.info("stopped on signal %d after a graceful shutdown", signum)
