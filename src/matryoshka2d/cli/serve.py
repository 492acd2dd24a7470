"""``m2d serve MODEL``: the OpenAI-compatible embeddings server (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from matryoshka2d.cli.common import add_model_args, load_model

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve embeddings over an OpenAI-compatible HTTP API, any exit and width")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                   help="auto (default: openvino where installed, else torch), torch (one mixed-depth pass per "
                        "batch, any --device), onnx or openvino (every exit exported at start-up, kept in "
                        "--export-dir; the onnx / openvino extras)")
    p.add_argument("--export-dir", "--onnx-dir", dest="export_dir", default=None,
                   help="onnx / openvino: keep the exported exits here and reuse them on the next start when they "
                        "still match the model (default: a temporary folder, removed at exit)")
    p.add_argument("--precision", default="auto", choices=["auto", "f32", "bf16"],
                   help="openvino: auto (default: bf16 where the CPU runs it natively and every exit's recorded "
                        "bf16 checks hold, STS-B within 0.2 of fp32 where the data is found; else f32), f32 or bf16")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="torch backend's backbone dtype (default fp32; fp16 on a GPU)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; cuda for a GPU, torch backend)")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads of the model, per replica (default: the runtime's)")
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
    r = p.add_argument_group("replicas on Ray Serve (the ray-serve extra; docs/serving.md)")
    r.add_argument("--replicas", type=int, default=None,
                   help="serve the same app as N Ray Serve replicas, each with its own batcher and --threads")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto); default: a local one")
    r.add_argument("--autoscale", default=None,
                   help="MIN,MAX: let Ray Serve scale the replicas between MIN and MAX (--replicas is the start)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 - checked here, used by serve_app

        from matryoshka2d.serve.app import create_app  # noqa: F401 - the serve extra, checked before any work
    except ImportError as e:
        raise ImportError(f"m2d serve needs the serve extra ({e}); pip install 'matryoshka2d[serve]'") from None
    import torch

    from matryoshka2d.serve.config import ServeConfig
    from matryoshka2d.serve.launch import ServeSpec, build_app, check_spec, default_backend, prepare_model

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is out of range 0..65535; pass e.g. 8000")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1; pass e.g. 2")
    backend, why = (default_backend(device=args.device, dtype=args.dtype) if args.backend == "auto"
                    else (args.backend, "asked for (--backend)"))
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    config = ServeConfig(model_name=name, max_batch_tokens=args.max_batch_tokens,
                         max_batch_requests=args.max_batch_requests, batch_wait_ms=args.batch_wait_ms,
                         max_queue=args.max_queue, max_client_batch=args.max_client_batch,
                         max_body_bytes=args.max_body_bytes, truncate=args.truncate, api_key=args.api_key,
                         dtype=args.dtype, backend=backend, trim_interval_s=args.trim_interval_s)
    spec = ServeSpec(model=str(args.model), config=config, pooling=args.pooling,
                     trust_remote_code=args.trust_remote_code, max_seq_length=args.max_seq_length,
                     device=args.device, threads=args.threads, precision=args.precision,
                     export_dir=args.export_dir, backend_why=why)
    check_spec(spec)
    replicas = replica_options(args)
    logger.info("backend %s (%s)", backend, why)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)  # checks the folder and --max-seq-length before anything starts
    if replicas is not None:
        from matryoshka2d.serve.ray_serve import serve_replicas

        del model  # each replica loads its own
        serve_replicas(spec, host=args.host, port=args.port, address=args.ray_address,
                       graceful_timeout=args.graceful_timeout, **replicas)
        return 0
    with contextlib.ExitStack() as stack:
        serve_app(build_app(spec, stack, model=prepare_model(model, spec)), args)
    return 0


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
