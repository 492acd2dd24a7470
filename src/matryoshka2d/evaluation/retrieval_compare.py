"""Comparing retrieval results: a paired bootstrap over queries of the difference of a metric's mean.

A resample draws the set's queries with replacement (the same resample for every model, hence "paired");
a model's metric on it is the mean of its per-query values over the drawn queries. Resamples are count
vectors, so every exit of every model costs one matrix product.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from matryoshka2d.evaluation.retrieval_result import RetrievalResult, metric_label

logger = logging.getLogger(__name__)


def query_resamples(n: int, *, draws: int = 1000, seed: int | Sequence[int] = 0) -> np.ndarray:
    """``(draws, n)`` float32 counts: how often each of ``n`` queries is drawn in each resample."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws {draws!r} must be a positive integer; pass e.g. 1000")
    if n < 2:
        raise ValueError(f"bootstrap needs at least 2 queries, got {n}")
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    counts = np.bincount((idx + (np.arange(draws) * n)[:, None]).ravel(), minlength=draws * n)
    return counts.reshape(draws, n).astype(np.float32)


def set_resamples(set_name: str, n: int, *, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """:func:`query_resamples` of one set's ``n`` queries, on the set's own stream from ``seed`` and its name
    (every comparison of that set, here or in a study report, draws the same resamples)."""
    return query_resamples(n, draws=draws, seed=[seed, zlib.crc32(set_name.encode())])


def _summary(observed: float, diffs: np.ndarray, confidence: float) -> dict[str, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} must be in (0, 1); pass e.g. 0.95")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"delta": observed, "low": float(low), "high": float(high), "p_le_0": float(np.mean(diffs <= 0))}


@dataclass
class RetrievalComparison:
    """Side-by-side metric of several retrieval results with bootstrap CIs of their differences.

    ``cis[(i, j)][(set, layer, dim)]`` summarises ``results[j] - results[i]``. ``sets`` / ``layers`` / ``dims``
    are the ones every result has (e.g. a separately trained 2-layer model against a 6-layer one: layers 1-2);
    ``left_out`` says what some results had beyond them.
    """

    labels: list[str]
    results: list[RetrievalResult]
    metric: str
    draws: int
    seed: int
    confidence: float
    cis: dict[tuple[int, int], dict[tuple[str, int, int], dict[str, float]]] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for (i, j), per_exit in self.cis.items():
            for (s, n, d), ci in per_exit.items():
                rows.append({"a": self.labels[i], "b": self.labels[j], "set": s, "layer": n, "dim": d,
                             f"a_{self.metric}": self.results[i].score(s, n, d, self.metric),
                             f"b_{self.metric}": self.results[j].score(s, n, d, self.metric), **ci})
        return {"kind": "retrieval", "labels": self.labels, "metric": self.metric, "draws": self.draws,
                "seed": self.seed, "confidence": self.confidence, "sets": self.sets, "layers": self.layers,
                "dims": self.dims, "left_out": self.left_out, "differences": rows}

    def to_markdown(self) -> str:
        pairs = list(self.cis) or list(itertools.combinations(range(len(self.results)), 2))
        pct = f"{100 * self.confidence:g}%"
        label = metric_label(self.metric)
        lines = [f"# Comparison of {', '.join(self.labels)}", "",
                 f"{label}. Δ = later − earlier model; {pct} CI: paired bootstrap over queries "
                 f"({self.draws} draws, seed {self.seed}); * = the CI excludes 0." if self.cis else
                 f"{label}. Δ = later − earlier model (no bootstrap: draws = 0).", ""]
        if self.left_out:
            lines += ["Compared on the exits every result has; left out: " + "; ".join(self.left_out) + ".", ""]
        res0 = self.results[0]
        for s in self.sets:
            header = ["layer", "dim", *self.labels]
            for i, j in pairs:
                header += [f"Δ {self.labels[j]}−{self.labels[i]}"] + ([f"{pct} CI"] if self.cis else [])
            lines += [f"## {s} (n={res0.n_pairs(s)} queries)", "", "| " + " | ".join(header) + " |",
                      "|" + "---:|" * len(header)]
            for n in self.layers:
                for d in self.dims:
                    cells = [str(n), str(d), *(f"{r.score(s, n, d, self.metric):.2f}" for r in self.results)]
                    for i, j in pairs:
                        delta = self.results[j].score(s, n, d, self.metric) - self.results[i].score(s, n, d,
                                                                                                     self.metric)
                        ci = self.cis.get((i, j), {}).get((s, n, d))
                        star = "*" if ci and (ci["low"] > 0 or ci["high"] < 0) else ""
                        cells.append(f"{delta:+.2f}{star}")
                        if self.cis:
                            cells.append(f"[{ci['low']:+.2f}, {ci['high']:+.2f}]" if ci else "")
                    lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


def check_retrieval_compatible(results: Sequence[RetrievalResult], labels: Sequence[str]
                               ) -> tuple[list[str], list[int], list[int], list[str]]:
    """The sets, layers and dims every result has, and what some had beyond them.

    Returns:
        ``(sets, layers, dims, left_out)``, in the first result's order; ``left_out`` lines such as
        ``"layers [3, 4, 5, 6] of dense"``.

    Raises:
        ValueError: fewer than 2 results, no set / layer / dim in common, or a common set whose queries differ
            (another split or other data).
    """
    if len(results) < 2:
        raise ValueError(f"compare needs at least 2 results, got {len(results)}")
    common: dict[str, list[Any]] = {}
    left_out: list[str] = []
    for what in ("sets", "layers", "dims"):
        shared = set.intersection(*(set(getattr(r, what)) for r in results))
        common[what] = [v for v in getattr(results[0], what) if v in shared]
        if not common[what]:
            have = "; ".join(f"{label} {getattr(r, what)}" for r, label in zip(results, labels, strict=True))
            raise ValueError(f"results do not match: no {what[:-1]} is in all of them ({have}); re-run m2d eval "
                             f"with --sets/--layers/--dims they share")
        for r, label in zip(results, labels, strict=True):
            extra = [v for v in getattr(r, what) if v not in shared]
            if extra:
                left_out.append(f"{what} {extra} of {label}")
    ref, ref_label = results[0], labels[0]
    for res, label in zip(results[1:], labels[1:], strict=True):
        for s in common["sets"]:
            if s in ref.query_ids and s in res.query_ids and ref.query_ids[s] != res.query_ids[s]:
                raise ValueError(f"results do not match: set {s!r} has different queries in {ref_label} and "
                                 f"{label} (different split or data?)")
            if ref.n_pairs(s) != res.n_pairs(s):
                raise ValueError(f"results do not match: set {s!r} has {ref.n_pairs(s)} queries in {ref_label} "
                                 f"but {res.n_pairs(s)} in {label}")
    return common["sets"], common["layers"], common["dims"], left_out


def compare_retrieval(results: Sequence[RetrievalResult], labels: Sequence[str] | None = None, *,
                      metric: str | None = None, draws: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> RetrievalComparison:
    """Check that ``results`` match and bootstrap every pairwise difference of ``metric`` at every exit.

    Args:
        results: two or more retrieval results over the same sets, exits and queries.
        labels: a short name per result (default: the model names).
        metric: the metric compared (default: the first result's headline, nDCG@10).
        draws: resamples of the queries per set (0 skips the bootstrap).
        seed: base seed; each set gets its own stream from it and the set name.
        confidence: central interval mass.

    Raises:
        ValueError: mismatched results, an unknown metric, or per-query scores missing when ``draws > 0``.
    """
    labels = list(labels) if labels is not None else [r.model for r in results]
    sets, layers, dims, left_out = check_retrieval_compatible(results, labels)
    metric = metric or results[0].metric
    for res, label in zip(results, labels, strict=True):
        if metric not in res.metrics:
            raise ValueError(f"{label} has no metric {metric!r}; it has {res.metrics}")
    comp = RetrievalComparison(labels, list(results), metric, draws, seed, confidence, sets=sets, layers=layers,
                               dims=dims, left_out=left_out)
    if draws == 0:
        return comp
    for res, label in zip(results, labels, strict=True):
        missing = [s for s in sets if s not in res.per_query]
        if missing:
            raise ValueError(f"{label} has no per-query scores for {missing} (its .preds.npz sidecar is missing); "
                             f"re-run m2d eval --output, or pass --draws 0 to skip the bootstrap")
    pairs = list(itertools.combinations(range(len(results)), 2))
    comp.cis = {p: {} for p in pairs}
    res0 = results[0]
    for s in sets:
        counts = set_resamples(s, res0.n_pairs(s), draws=draws, seed=seed)
        for n in layers:
            for d in dims:
                values = [r.query_scores(s, n, d, metric).astype(np.float64) for r in results]
                means = [counts @ v / v.size for v in values]
                for i, j in pairs:
                    observed = float(values[j].mean() - values[i].mean())
                    comp.cis[(i, j)][(s, n, d)] = _summary(observed, means[j] - means[i], confidence)
    return comp
