"""Encoding-speed benchmark: throughput of every exit on a physically truncated model, against a peer.

Every configuration (implementation x dtype x layer x dim) of one batch size runs once per round, all of them
interleaved (the order reverses every round), so load from other processes hits them alike; ratios are
medians of per-round ratios. Wall time is the headline; process CPU time is recorded beside it (with one
thread it barely moves when other processes share the cores).

This module owns the run and the truncated copies it times; :mod:`matryoshka2d.bench.settings` says what is
run (and which dtypes the device supports), :mod:`matryoshka2d.bench.peers` loads the peer,
:mod:`matryoshka2d.bench.timing` measures and :mod:`matryoshka2d.bench.result` holds the records, the
markdown table and the speed targets.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matryoshka2d.bench.peers import load_peer, peer_runner, truncate_peer
from matryoshka2d.bench.result import BenchmarkResult, impl_name
from matryoshka2d.bench.settings import DTYPES, BenchmarkSettings, cpu_info, resolve_dtypes
from matryoshka2d.bench.timing import TimedConfig, add_quality, records_of, time_all
from matryoshka2d.encoder import architectures
from matryoshka2d.encoder.tokenization import tokenize_unpadded
from matryoshka2d.io.manifest import library_versions
from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import COMPILED, OURS, PEER, Attention

if TYPE_CHECKING:
    from matryoshka2d.data.datasets import ScoredPairs
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)


def run_benchmark(
    model: MatryoshkaEncoder,
    sentences: Sequence[str],
    settings: BenchmarkSettings,
    *,
    peer_source: str | None = None,
    stsb: ScoredPairs | None = None,
    meta: dict[str, Any] | None = None,
) -> BenchmarkResult:
    """Time ``encode`` of every requested exit, each on a copy of ``model`` truncated to that depth.

    Args:
        model: the full model (left unchanged: truncated copies are timed).
        sentences: what every timed call encodes.
        settings: layers, dims, batch sizes, dtypes, repeats, peer, threads.
        peer_source: model folder or alias the peer loads (the same model as ``model``).
        stsb: STS-B test pairs; when all their sentences are in ``sentences``, each exit of ours gets its
            Spearman x100 (and, for a dtype other than fp32, the change from fp32).
        meta: extra facts to record (e.g. the command line).

    Returns:
        The records and the run's facts (device, CPU, threads, versions, load average, date).

    Raises:
        ValueError: no sentences, a layer/dim out of range, or a dtype the device cannot run.
        ImportError: the peer library is missing.
    """
    texts = [str(t) for t in sentences]
    if not texts:
        raise ValueError("no sentences to encode; pass a file with at least one sentence, or 'stsb'")
    n_full, width = model.num_layers, model.hidden_size
    layers = sorted({model.check_layer(n) for n in (settings.layers or range(1, n_full + 1))} | {n_full})
    dims = sorted({model.check_dim(d) for d in (settings.dims or [width])})
    dtypes = resolve_dtypes(settings)
    peer = load_peer(peer_source or "minilm", model, settings.device) if PEER in settings.peers else None
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    records: list[dict[str, Any]] = []
    stack = contextlib.ExitStack()
    peer_versions: dict[str, str] = {}
    try:
        configs = _build_configs(model, peer, layers, dims, [u for _, u in dtypes], settings) \
            if "torch" in settings.backends else []
        if peer is not None and "torch" not in settings.backends:
            configs = [c for c in _build_configs(model, peer, layers, dims, [u for _, u in dtypes], settings)
                       if c.impl == PEER]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m2d-bench-")))
        configs += _backend_configs(model, layers, dims, settings, workdir)
        configs += _worker_configs(model, texts, layers, dims, settings, workdir, stack, peer_versions)
        for batch_size in settings.batch_sizes:
            for c in configs:
                c.wall, c.cpu, c.output, c.memory = [], [], None, None
            time_all(configs, texts, int(batch_size), settings)
            records += records_of(configs, len(texts), int(batch_size), n_full)
            add_quality(records, configs, texts, int(batch_size), stsb)
    finally:
        torch.set_num_threads(threads)
        stack.close()
    device = torch.device(settings.device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.metadata.get("source"), "num_layers": n_full, "hidden_size": width,
        "pooling": model.pooling, "max_seq_length": model.max_seq_length,
        "attn_implementation": getattr(model.backbone.config, "_attn_implementation", None),
        "device": settings.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()["model"],
        "cpu": cpu_info(), "threads": settings.threads or threads,
        "dtypes": [{"requested": r, "used": u} for r, u in dtypes], "layers": layers, "dims": dims,
        "batch_sizes": [int(b) for b in settings.batch_sizes], "repeats": settings.repeats,
        "warmup": settings.warmup, "peer": settings.peer, "peers": settings.peers, "backends": settings.backends,
        "implementations": list(dict.fromkeys(impl_name(c.impl, c.dtype) for c in configs)),
        "peer_worker_versions": peer_versions or None, "compile": settings.compile,
        "sentences": _sentence_stats(model, texts),
        "memory_method": configs[0].memory.method if configs and configs[0].memory else None,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "library_versions": _versions(), "python": platform.python_version(), "platform": platform.platform(),
        "settings": asdict(settings), **(meta or {}),
    }
    return BenchmarkResult(info, records)


def _backend_configs(model: MatryoshkaEncoder, layers: list[int], dims: list[int], settings: BenchmarkSettings,
                     workdir: Path) -> list[TimedConfig]:
    """Our exits exported to ONNX / OpenVINO (one folder per layer, full width; narrower dims cut the output)."""
    wanted = [b for b in settings.backends if b != "torch"]
    if not wanted:
        return []
    from matryoshka2d.export.exporter import export_model
    from matryoshka2d.export.runtime import OnnxEncoder, OpenVinoEncoder

    threads, width = settings.threads or torch.get_num_threads(), model.hidden_size
    configs: list[TimedConfig] = []
    for n in layers:
        folders: dict[str, Path] = {}
        if any(b.startswith("onnx") for b in wanted):
            folders["onnx"] = export_model(model, workdir / f"onnx-{n}", layer=n, dim=width, format="onnx",
                                           quantize="int8" if "onnx-int8" in wanted else None)
        if any(b.startswith("openvino") for b in wanted):
            folders["openvino"] = export_model(model, workdir / f"openvino-{n}", layer=n, dim=width,
                                               format="openvino")
        for backend in wanted:
            name, streamed = backend.removesuffix("-streams"), backend.endswith("-streams")
            runtime, _, precision = name.partition("-")
            if runtime == "onnx":
                encoder: Any = OnnxEncoder(folders["onnx"], file="model_int8.onnx" if precision else "model.onnx",
                                           threads=threads)
            else:  # -streams: one stream per thread, batches in flight at once
                encoder = OpenVinoEncoder(folders["openvino"], precision=precision or "f32", threads=threads,
                                          streams=threads if streamed else 1)
            label = f"{OURS}:{runtime}" + ("-streams" if streamed else "")
            configs += [TimedConfig(label, precision or "fp32", n, d, _exported_runner(encoder, d), depth=n)
                        for d in dims]
    return configs


def _worker_configs(model: MatryoshkaEncoder, texts: list[str], layers: list[int], dims: list[int],
                    settings: BenchmarkSettings, workdir: Path, stack: contextlib.ExitStack,
                    versions: dict[str, str]) -> list[TimedConfig]:
    """sentence-transformers' ONNX / OpenVINO backends in the peer venv, on our exits exported to its format."""
    wanted = [p.partition(":")[2] for p in settings.peers if p != PEER]
    if not wanted:
        return []
    from matryoshka2d.bench.peer_env import PeerWorker, ensure_peer_venv
    from matryoshka2d.export.exporter import export_model

    worker = PeerWorker(ensure_peer_venv(), texts)
    stack.callback(worker.close)
    threads, width = settings.threads or torch.get_num_threads(), model.hidden_size
    configs: list[TimedConfig] = []
    for n in layers:
        for backend in wanted:  # a folder each: the int8 peer writes its graphs into its folder
            folder = export_model(model, workdir / f"st-{backend}-{n}", layer=n, dim=width,
                                  format="sentence-transformers", verify=False)
            key = f"{backend}-{n}"
            worker.load(key, backend, folder, width=width, threads=threads, max_seq_length=model.max_seq_length)
            runtime, _, precision = backend.partition("-")
            # OpenVINO runs at its own default precision ("auto": bf16 on CPUs with AMX / AVX-512 bf16)
            label = precision or ("auto" if runtime == "openvino" else "fp32")
            configs += [TimedConfig(f"{PEER}:{runtime}", label, n, d, worker.runner(key, d), depth=n, external=True)
                        for d in dims]
    versions.update(worker.versions)
    return configs


def _exported_runner(encoder: Any, dim: int) -> Callable[[list[str], int], np.ndarray]:
    """``run(texts, batch_size)`` of an exported exit at ``dim``: a prefix of its output, normalised again."""
    def run(texts: list[str], batch_size: int) -> np.ndarray:
        emb = encoder.encode(texts, batch_size=batch_size)
        if dim < emb.shape[1]:
            emb = truncate(emb, dim)
        return emb
    return run


def _build_configs(model: MatryoshkaEncoder, peer: Any, layers: list[int], dims: list[int], dtypes: list[str],
                   settings: BenchmarkSettings) -> list[TimedConfig]:
    configs: list[TimedConfig] = []
    for dtype in dtypes:
        for n in layers:
            variants = [(OURS, fast_copy(model, n, dtype, settings.device, settings.attention))]
            if settings.compile:
                compiled = fast_copy(model, n, dtype, settings.device, settings.attention)
                compiled.backbone.compile(dynamic=True)  # compiles on the first (warm-up) call
                variants.append((COMPILED, compiled))
            for impl, ours in variants:
                if ours.num_layers != n or architectures.get_depth(ours.backbone) != n:
                    raise RuntimeError(f"truncate({n}) returned a model of {ours.num_layers} blocks")
                attn = getattr(ours.backbone.config, "_attn_implementation", None)
                configs += [TimedConfig(impl, dtype, n, d, _ours_runner(ours, n, d), depth=n, attn=attn) for d in dims]
            if peer is not None:
                theirs = truncate_peer(peer, n).to(DTYPES[dtype])
                depth = architectures.get_depth(theirs[0].auto_model)
                if depth != n:
                    raise RuntimeError(f"the peer truncated to {n} blocks holds {depth}")
                attn = getattr(theirs[0].auto_model.config, "_attn_implementation", None)
                configs += [TimedConfig(PEER, dtype, n, d, peer_runner(theirs, d, model.hidden_size), depth=depth,
                                    attn=attn) for d in dims]
    return configs


def fast_copy(model: MatryoshkaEncoder, layers: int, dtype: str, device: str,
              attention: Attention = "auto") -> MatryoshkaEncoder:
    """A copy of ``model`` truncated to ``layers`` blocks, in ``dtype`` on ``device``, with the attention kernel
    that is fastest there (see :class:`BenchmarkSettings`); pooling, the exit head (the copy keeps head
    ``layers``, its last exit's) and normalisation stay float32."""
    out = model.truncate(layers).to(device=device, dtype=DTYPES[dtype]).eval()
    out.exit_heads.float()
    if attention == "auto":
        slow_sdpa = dtype != "fp32" and torch.device(device).type == "cpu"
        attention = "eager" if slow_sdpa else getattr(out.backbone.config, "_attn_implementation", "sdpa")
    if getattr(out.backbone.config, "_attn_implementation", None) != attention:
        out.backbone.set_attn_implementation(attention)
    return out


def _ours_runner(model: MatryoshkaEncoder, layer: int, dim: int) -> Callable[[list[str], int], np.ndarray]:
    return lambda texts, bs: model.encode(texts, layer=layer, dim=dim, batch_size=bs, show_progress_bar=False)


def _sentence_stats(model: MatryoshkaEncoder, texts: list[str]) -> dict[str, Any]:
    lengths = np.array([len(ids) for ids in tokenize_unpadded(model.tokenizer, texts, model.max_seq_length).input_ids])
    return {"count": len(texts), "mean_tokens": round(float(lengths.mean()), 2), "max_tokens": int(lengths.max())}


def _versions() -> dict[str, str]:
    versions = {**library_versions(), "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import sentence_transformers

        versions["sentence-transformers"] = sentence_transformers.__version__
    return versions
