"""How the benchmark measures: interleaved timed rounds, peak memory, and the records they give.

Every configuration (implementation x dtype x layer x dim) of one batch size runs once per round, all of them
interleaved (the order reverses every round), so load from other processes hits them alike; ratios are
medians of per-round ratios. Wall time is the headline; process CPU time is recorded beside it. The first
call of each configuration also yields its embeddings, compared across dtypes and with the peer.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matryoshka2d.bench.settings import BenchmarkSettings
from matryoshka2d.evaluation.metrics import correlations, pair_cosines
from matryoshka2d.truncation import cosine
from matryoshka2d.vocab import COMPILED, OURS, PEER

if TYPE_CHECKING:
    from matryoshka2d.data.datasets import ScoredPairs

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak resident memory (MB) of this process inside the block (psutil polled every 2 ms; without psutil
    the process high-water mark, ru_maxrss), and the CUDA allocator's peak on GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak_rss_mb = self.cuda_mb = float("nan")
        self._stop, self._peak = threading.Event(), 0
        try:
            import psutil

            self._proc: Any = psutil.Process()
            self.method = "psutil"
        except ImportError:
            self._proc, self.method = None, "ru_maxrss"

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if self._proc is not None:
            self._peak = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._stop.set()
            self._thread.join()
            self.peak_rss_mb = max(self._peak, self._proc.memory_info().rss) / 2**20
        else:
            import resource

            self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        if self.cuda:
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20


# ----------------------------------------------------------------------------------- timed rounds
@dataclass
class TimedConfig:
    """One timed configuration: what it runs, and what its rounds measured."""

    impl: str
    dtype: str
    layer: int
    dim: int
    run: Callable[[list[str], int], np.ndarray]
    depth: int
    attn: str | None = None
    external: bool = False  # runs in a worker process: its CPU time comes from the runner, no memory figure
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    output: np.ndarray | None = None
    memory: PeakMemory | None = None


def time_all(configs: list[TimedConfig], texts: list[str], batch_size: int, settings: BenchmarkSettings) -> None:
    """Warm-up rounds, then timed rounds; a round runs every config once, in alternating order. The first
    call of each config is watched for peak memory and keeps its output (for the cosine checks)."""
    gc.collect()
    gc.freeze()  # the models' objects leave the collector's view, so the collect before each call is cheap
    try:
        rounds = settings.warmup + settings.repeats
        for r in range(rounds):
            timed = r >= settings.warmup
            logger.info("batch %d: %s round %d/%d", batch_size, "timed" if timed else "warm-up", r + 1, rounds)
            for c in configs if r % 2 == 0 else reversed(configs):
                gc.collect()
                memory = PeakMemory(settings.device) if c.output is None and not c.external else None
                with memory or contextlib.nullcontext():
                    wall, cpu = time.perf_counter(), time.process_time()
                    out = c.run(texts, batch_size)
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if c.external:
                    cpu = float(getattr(c.run, "last_cpu", None) or cpu)  # the worker's own CPU seconds
                if c.output is None:
                    c.output, c.memory = out, memory
                if timed:
                    c.wall.append(wall)
                    c.cpu.append(cpu)
    finally:
        gc.unfreeze()


# ----------------------------------------------------------------------------------- records
def records_of(configs: list[TimedConfig], count: int, batch_size: int, n_full: int) -> list[dict[str, Any]]:
    """One record per config; ratios are medians of per-round ratios (configs of a round ran together)."""
    wall = {(c.impl, c.dtype, c.layer, c.dim): count / np.asarray(c.wall) for c in configs}
    cpu = {(c.impl, c.dtype, c.layer, c.dim): count / np.maximum(np.asarray(c.cpu), 1e-9) for c in configs}
    out = []
    for c in configs:
        rate, per_cpu = wall[(c.impl, c.dtype, c.layer, c.dim)], cpu[(c.impl, c.dtype, c.layer, c.dim)]
        full = (c.impl, c.dtype, n_full, c.dim)
        rec: dict[str, Any] = {
            "impl": c.impl, "layer": c.layer, "dim": c.dim, "dtype": c.dtype, "batch_size": batch_size,
            "blocks_run": c.depth, "attn_implementation": c.attn, "sentences": count, "repeats": len(rate),
            "sentences_per_s": float(np.median(rate)), "sentences_per_s_min": float(rate.min()),
            "sentences_per_s_max": float(rate.max()), "sentences_per_s_rounds": [round(float(x), 2) for x in rate],
            "speedup_vs_full": float(np.median(rate / wall[full])),
            "ideal_speedup": n_full / c.layer, "sentences_per_cpu_s": float(np.median(per_cpu)),
            "speedup_vs_full_cpu": float(np.median(per_cpu / cpu[full])),
            "peak_rss_mb": round(c.memory.peak_rss_mb, 1) if c.memory else None,
        }
        if c.memory is not None and c.memory.cuda:
            rec["cuda_max_allocated_mb"] = round(c.memory.cuda_mb, 1)
        for suffix, peer_dtype in (("", c.dtype), ("_fp32", "fp32")):
            peer = (PEER, peer_dtype, c.layer, c.dim)
            if c.impl != PEER and peer in wall and (suffix == "" or c.dtype != "fp32" or c.impl == COMPILED):
                rec[f"ratio_vs_peer{suffix}"] = float(np.median(rate / wall[peer]))
                rec[f"ratio_vs_peer{suffix}_cpu"] = float(np.median(per_cpu / cpu[peer]))
        out.append(rec)
    return out


def add_quality(records: list[dict[str, Any]], configs: list[TimedConfig], texts: list[str], batch_size: int,
                 stsb: ScoredPairs | None) -> None:
    """Cosine of each config's embeddings to fp32 (ours on torch when timed, else the same impl's) and to the
    peer; STS-B Spearman of every implementation and its change from that fp32 reference."""
    outputs = {(c.impl, c.dtype, c.layer, c.dim): c.output for c in configs}

    def reference(rec: dict[str, Any]) -> tuple[str, str, int, int] | None:
        key = (rec["impl"], rec["dtype"], rec["layer"], rec["dim"])
        for ref in ((OURS, "fp32", *key[2:]), (rec["impl"], "fp32", *key[2:])):
            if ref != key and ref in outputs:
                return ref  # type: ignore[return-value]
        return None

    current = [r for r in records if r["batch_size"] == batch_size]
    for rec in current:
        key = (rec["impl"], rec["dtype"], rec["layer"], rec["dim"])
        emb, ref = outputs[key], reference(rec)
        if ref is not None:
            rec["cosine_to_fp32_mean"] = _cosine(emb, outputs[ref])
            rec["cosine_to_fp32_min"] = _cosine(emb, outputs[ref], np.min)
            rec["fp32_reference"] = f"{ref[0]} {ref[1]}"
        if rec["impl"] != PEER and (PEER, *key[1:]) in outputs:
            rec["cosine_to_peer_mean"] = _cosine(emb, outputs[(PEER, *key[1:])])
        if stsb is not None:
            rec["stsb_spearman"] = _spearman(emb, texts, stsb)
    by_key = {(r["impl"], r["dtype"], r["layer"], r["dim"]): r for r in current}
    for rec in current:
        ref = reference(rec)
        base = by_key.get(ref) if ref is not None else None  # type: ignore[arg-type]
        if base is not None and rec.get("stsb_spearman") is not None and base.get("stsb_spearman") is not None:
            rec["stsb_spearman_delta"] = rec["stsb_spearman"] - base["stsb_spearman"]


def _cosine(a: np.ndarray | None, b: np.ndarray | None, reduce: Callable[..., Any] = np.mean) -> float:
    return float(reduce(cosine(a, b)))  # type: ignore[arg-type]


def _spearman(emb: np.ndarray | None, texts: list[str], pairs: ScoredPairs) -> float | None:
    """Spearman x100 of cosine vs gold on ``pairs``, if every pair sentence is among ``texts``."""
    cosines = None if emb is None else pair_cosines(emb, texts, pairs)
    return None if cosines is None else correlations(np.asarray(pairs.scores, dtype=np.float64), cosines)[0]
