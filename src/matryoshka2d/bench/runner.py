"""Encoding-speed benchmark: throughput of every exit on a physically truncated model, against a peer.

Every configuration (implementation x dtype x layer x dim) of one batch size runs once per round, all of them
interleaved (the order reverses every round), so load from other processes hits them alike; ratios are
medians of per-round ratios. Wall time is the headline; process CPU time is recorded beside it (with one
thread it barely moves when other processes share the cores).

This module owns what is run (settings, dtypes the device supports, the peer, truncated copies) and the run
itself; :mod:`matryoshka2d.bench.timing` measures and :mod:`matryoshka2d.bench.result` holds the
records, the markdown table and the speed targets.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from matryoshka2d.bench.result import COMPILED, MAX_SPEARMAN_DROP, MIN_COSINE, OURS, PEER, BenchmarkResult
from matryoshka2d.bench.timing import PeakMemory, _add_quality, _Config, _records, _time_all
from matryoshka2d.encoder import architectures
from matryoshka2d.encoder.tokenization import tokenize_unpadded
from matryoshka2d.io.manifest import library_versions

if TYPE_CHECKING:
    from matryoshka2d.data.datasets import ScoredPairs
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

__all__ = [  # the result and the measurement are defined in benchmark_result / benchmark_timing
    "COMPILED", "DTYPES", "MAX_SPEARMAN_DROP", "MIN_COSINE", "OURS", "PEER", "PEERS", "ST_POOLING", "Attention",
    "BenchmarkResult", "BenchmarkSettings", "PeakMemory", "Peer", "cpu_info", "dtype_problem", "fast_copy",
    "load_peer", "require_peer", "resolve_dtypes", "run_benchmark", "truncate_peer",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Peer = Literal["sentence-transformers"]
Attention = Literal["auto", "sdpa", "eager"]
PEERS: tuple[str, ...] = get_args(Peer)
ST_POOLING = {"cls": "cls", "mean": "mean", "max": "max", "last": "lasttoken"}


@dataclass
class BenchmarkSettings:
    """What to time. ``layers`` / ``dims`` ``None`` mean every layer / the full width; ``compile`` adds
    ``torch.compile``d copies of our models (impl ``matryoshka2d+compile``); ``attention`` is our models'
    attention kernel (``auto``: plain matmul attention for bf16/fp16 on CPU, where it beats SDPA on short
    sentences, the model's default otherwise). The peer always runs its defaults.

    Raises:
        ValueError: a value out of range (named with the allowed range).
    """

    layers: list[int] | None = None
    dims: list[int] | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    peer: Peer | None = None
    device: str = "cpu"
    allow_fallback: bool = False
    compile: bool = False
    attention: Attention = "auto"

    def __post_init__(self) -> None:
        for name, low in (("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value!r} must be an integer >= {low}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes {self.batch_sizes!r} must be positive integers, e.g. 32,128")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads {self.threads!r} must be >= 1 (or None for torch's default)")
        if self.attention not in get_args(Attention):
            raise ValueError(f"attention {self.attention!r} is not one of {', '.join(get_args(Attention))}")
        if self.peer is not None and self.peer not in PEERS:
            raise ValueError(f"unknown peer {self.peer!r}; valid peers: {', '.join(PEERS)}")
        bad = [name for name in self.dtypes if name not in DTYPES] or ([] if self.dtypes else ["(none)"])
        if bad:
            raise ValueError(f"unknown dtype {bad[0]!r}; valid dtypes: {', '.join(DTYPES)}")


def cpu_info() -> dict[str, Any]:
    """CPU model name and the SIMD flags that decide fp32 / bf16 / fp16 speed."""
    model, flags = "unknown", []
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16")
    return {"model": model if model != "unknown" else platform.processor() or model,
            "flags": [f for f in wanted if f in flags], "count": os.cpu_count()}


def dtype_problem(name: str, device: str | torch.device) -> str | None:
    """Why ``device`` cannot run dtype ``name`` natively, or ``None`` if it can."""
    dev = torch.device(device)
    if name == "fp32" or dev.type not in ("cpu", "cuda"):
        return None
    if dev.type == "cuda":
        ok = name != "bf16" or torch.cuda.is_bf16_supported()
        return None if ok else f"{torch.cuda.get_device_name(dev)} has no bf16 support"
    native = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}[name]
    if set(cpu_info()["flags"]) & native:
        return None
    return (f"this CPU ({cpu_info()['model']}) has no {' or '.join(sorted(native))} instructions, so {name} "
            "would be emulated, slower than fp32")


def resolve_dtypes(settings: BenchmarkSettings) -> list[tuple[str, str]]:
    """``(requested, used)`` dtype names; one the device cannot run falls back to fp32 only if allowed.

    Raises:
        ValueError: a dtype the device cannot run, without ``allow_fallback``.
    """
    out: list[tuple[str, str]] = []
    for name in dict.fromkeys(settings.dtypes):
        problem = dtype_problem(name, settings.device)
        if problem and not settings.allow_fallback:
            raise ValueError(f"dtype {name} cannot run on {settings.device}: {problem}; pass --dtype fp32, "
                             "or --allow-fallback to measure fp32 in its place")
        if problem:
            logger.warning("dtype %s falls back to fp32: %s", name, problem)
        used = "fp32" if problem else name
        if all(used != u for _, u in out):
            out.append((name, used))
    return out


# ----------------------------------------------------------------------------------- the peer
def require_peer() -> Any:
    """The ``SentenceTransformer`` class.

    Raises:
        ImportError: sentence-transformers is not installed (the message says how to install it).
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError('--peer sentence-transformers needs the sentence-transformers library; '
                          'pip install "matryoshka2d[st]"') from None
    return SentenceTransformer


def load_peer(source: str, model: MatryoshkaEncoder, device: str) -> Any:
    """sentence-transformers' model of the same folder, with the same pooling and max_seq_length.

    Raises:
        ImportError: sentence-transformers is not installed.
        ValueError: our pooling has no sentence-transformers equivalent.
    """
    sentence_transformer = require_peer()
    from matryoshka2d.io.folder import resolve_model_path

    folder = Path(resolve_model_path(source))
    if (folder / "modules.json").is_file():
        st = sentence_transformer(str(folder), device=device)
    else:
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Normalize, Pooling, Transformer
        if model.pooling not in ST_POOLING:
            raise ValueError(f"pooling {model.pooling!r} has no sentence-transformers equivalent "
                             f"({', '.join(ST_POOLING)} do); run without --peer")
        pooling = Pooling(model.hidden_size, ST_POOLING[model.pooling])
        st = sentence_transformer(modules=[Transformer(str(folder)), pooling, Normalize()], device=device)
    st.max_seq_length = model.max_seq_length
    return st.eval()


def truncate_peer(st: Any, layers: int) -> Any:
    """A copy of the sentence-transformers model holding only blocks ``1..layers`` (config updated)."""
    with architectures.running_blocks(st[0].auto_model, layers):
        out = copy.deepcopy(st)
    architectures.set_depth_in_config(out[0].auto_model.config, layers)
    return out


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
    peer = load_peer(peer_source or "minilm", model, settings.device) if settings.peer else None
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    records: list[dict[str, Any]] = []
    try:
        configs = _build_configs(model, peer, layers, dims, [u for _, u in dtypes], settings)
        for batch_size in settings.batch_sizes:
            for c in configs:
                c.wall, c.cpu, c.output, c.memory = [], [], None, None
            _time_all(configs, texts, int(batch_size), settings)
            records += _records(configs, len(texts), int(batch_size), n_full)
            _add_quality(records, configs, texts, int(batch_size), stsb)
    finally:
        torch.set_num_threads(threads)
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
        "warmup": settings.warmup, "peer": settings.peer, "compile": settings.compile,
        "sentences": _sentence_stats(model, texts),
        "memory_method": configs[0].memory.method if configs and configs[0].memory else None,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "library_versions": _versions(), "python": platform.python_version(), "platform": platform.platform(),
        "settings": asdict(settings), **(meta or {}),
    }
    return BenchmarkResult(info, records)


def _build_configs(model: MatryoshkaEncoder, peer: Any, layers: list[int], dims: list[int], dtypes: list[str],
                   settings: BenchmarkSettings) -> list[_Config]:
    configs: list[_Config] = []
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
                configs += [_Config(impl, dtype, n, d, _ours_runner(ours, n, d), depth=n, attn=attn) for d in dims]
            if peer is not None:
                theirs = truncate_peer(peer, n).to(DTYPES[dtype])
                depth = architectures.get_depth(theirs[0].auto_model)
                if depth != n:
                    raise RuntimeError(f"the peer truncated to {n} blocks holds {depth}")
                attn = getattr(theirs[0].auto_model.config, "_attn_implementation", None)
                configs += [_Config(PEER, dtype, n, d, _peer_runner(theirs, d, model.hidden_size), depth=depth,
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


def _peer_runner(st: Any, dim: int, width: int) -> Callable[[list[str], int], np.ndarray]:
    return lambda texts, bs: np.asarray(st.encode(
        texts, batch_size=bs, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True,
        truncate_dim=dim if dim < width else None), dtype=np.float32)


def _sentence_stats(model: MatryoshkaEncoder, texts: list[str]) -> dict[str, Any]:
    lengths = np.array([len(ids) for ids in tokenize_unpadded(model.tokenizer, texts, model.max_seq_length).input_ids])
    return {"count": len(texts), "mean_tokens": round(float(lengths.mean()), 2), "max_tokens": int(lengths.max())}


def _versions() -> dict[str, str]:
    versions = {**library_versions(), "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import sentence_transformers

        versions["sentence-transformers"] = sentence_transformers.__version__
    return versions
