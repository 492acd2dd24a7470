"""``m2d serve MODEL``: the OpenAI-compatible embeddings server (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import tempfile
from pathlib import Path

from matryoshka2d.cli.common import add_model_args, load_model
from matryoshka2d.vocab import SERVE_BACKENDS, SERVE_DTYPES, install_hint

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve embeddings over an OpenAI-compatible HTTP API, any exit and width")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="torch", choices=SERVE_BACKENDS,
                   help="torch (default: one mixed-depth pass per batch) or onnx (every exit exported to ONNX at "
                        "start-up and run with onnxruntime; needs the onnx extra)")
    p.add_argument("--onnx-dir", default=None,
                   help="--backend onnx: keep the exported exits here and reuse them on the next start when they "
                        "still match the model (default: a temporary folder, removed at exit)")
    p.add_argument("--dtype", default="fp32", choices=SERVE_DTYPES, help="backbone dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the model (default: torch's)")
    p.add_argument("--served-model-name", default=None,
                   help="the id clients pass as model (default: the MODEL argument's last path part)")
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
                   help="seconds SIGTERM waits for requests in flight (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 - checked here, used by serve_app

        from matryoshka2d.serve.app import create_app
    except ImportError as e:
        raise ImportError(f"m2d serve needs the serve extra ({e}): {install_hint('serve')}") from None
    import torch

    from matryoshka2d.serve.config import ServeConfig

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is out of range 0..65535; pass e.g. 8000")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1; pass e.g. 2")
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    config = ServeConfig(model_name=name, max_batch_tokens=args.max_batch_tokens,
                         max_batch_requests=args.max_batch_requests, batch_wait_ms=args.batch_wait_ms,
                         max_queue=args.max_queue, max_client_batch=args.max_client_batch,
                         max_body_bytes=args.max_body_bytes, truncate=args.truncate, api_key=args.api_key,
                         dtype=args.dtype, backend=args.backend, trim_interval_s=args.trim_interval_s)
    if args.backend == "onnx":
        from matryoshka2d.export.runtime import require_onnx

        require_onnx()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "onnx" and args.device != "cpu":
        raise ValueError(f"--device {args.device}: the onnx backend runs on the CPU; pass --device cpu or "
                         "--backend torch")
    model = load_model(args).eval().to(args.device)
    if args.dtype == "bf16":
        model.backbone.to(torch.bfloat16)
    with contextlib.ExitStack() as stack:
        runner = None
        if args.backend == "onnx":
            from matryoshka2d.serve.runners import OnnxRunner

            folder = args.onnx_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="m2d-serve-onnx-"))
            logger.info("exporting the %d exits to ONNX in %s", model.num_layers, folder)
            runner = OnnxRunner.from_model(model, folder, threads=args.threads)
        serve_app(create_app(model, config, threads=args.threads, runner=runner), args)
    return 0


def serve_app(app: object, args: argparse.Namespace) -> None:
    """Run ``app`` under uvicorn until SIGTERM / Ctrl-C (graceful: requests in flight are finished)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.graceful_timeout,
                                           access_log=args.log_level == "debug"))
    # uvicorn handles SIGTERM itself (stop accepting, finish requests in flight, run the lifespan shutdown that
    # drains the batcher), then re-raises the signal to the handler that was installed before it started. With
    # this no-op handler the graceful stop ends in exit code 0 instead of death by SIGTERM.
    signal.signal(signal.SIGTERM, _after_graceful_stop)
    server.run()


def _after_graceful_stop(signum: int, frame: object) -> None:
    logger.info("stopped on signal %d after a graceful shutdown", signum)
