"""Comparing evaluation results of any task: matching checks, a paired bootstrap over units, reports.

A resample draws a set's units (sentence pairs or queries) with replacement, the same resample for every
model (hence "paired"), and recomputes each model's metric on it; the differences over resamples give a
percentile interval. Resamples are count vectors ``w`` over the units (:func:`unit_resamples`), so a metric
on a resample is a weighted statistic of the per-unit values, and each task says which (:data:`BOOTSTRAPS`):

- STS, :class:`PairedBootstrap`: Spearman is the ``w``-weighted Pearson correlation of tie-averaged ranks that
  follow from cumulative counts over the values sorted once (identical to ``scipy.stats.spearmanr`` on the
  explicitly resampled arrays).
- retrieval, :class:`MeanBootstrap`: a metric is the ``w``-weighted mean of the queries' values, one matrix
  product per exit.
"""

from __future__ import annotations

import itertools
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from matryoshka2d.data.datasets import STS_SETS
from matryoshka2d.evaluation.result import AVG, GridResult, metric_label

logger = logging.getLogger(__name__)


def unit_resamples(n: int, *, draws: int = 1000, seed: int | Sequence[int] = 0, min_units: int = 2,
                   unit: str = "units") -> np.ndarray:
    """``(draws, n)`` float32 counts: how often each of ``n`` units is drawn in each resample.

    Raises:
        ValueError: ``draws`` is not a positive integer, or fewer than ``min_units`` units (named ``unit``).
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws {draws!r} must be a positive integer; pass e.g. 1000")
    if n < min_units:
        raise ValueError(f"bootstrap needs at least {min_units} {unit}, got {n}")
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    counts = np.bincount((idx + (np.arange(draws) * n)[:, None]).ravel(), minlength=draws * n)
    return counts.reshape(draws, n).astype(np.float32)


def query_resamples(n: int, *, draws: int = 1000, seed: int | Sequence[int] = 0) -> np.ndarray:
    """:func:`unit_resamples` of ``n`` queries (at least 2)."""
    return unit_resamples(n, draws=draws, seed=seed, unit="queries")


def set_seed(set_name: str, seed: int) -> list[int]:
    """The seed of one set's resamples: its own stream from ``seed`` and its name (every comparison of that set,
    here or in a study report, draws the same resamples)."""
    return [seed, zlib.crc32(set_name.encode())]


def set_resamples(set_name: str, n: int, *, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """:func:`query_resamples` of one set's ``n`` queries, on the set's own stream (:func:`set_seed`)."""
    return query_resamples(n, draws=draws, seed=set_seed(set_name, seed))


class Bootstrap(Protocol):
    """Resamples of one set's units, shared by every model scored on that set."""

    def resample(self, values: np.ndarray) -> np.ndarray:
        """The metric of per-unit ``values`` on every resample, shape ``(draws,)``."""
        ...


class PairedBootstrap:
    """Resamples of one STS set's pairs: Spearman x100 of each prediction vector on each of them.

    Args:
        gold: gold scores of the ``n`` pairs.
        draws: number of resamples.
        seed: seed of the ``numpy.random.Generator`` that draws them.
    """

    def __init__(self, gold: np.ndarray, *, draws: int = 1000, seed: int | Sequence[int] = 0) -> None:
        gold = np.asarray(gold, dtype=np.float64).reshape(-1)
        counts = unit_resamples(len(gold), draws=draws, seed=seed, min_units=3, unit="pairs")
        # (n, draws) float32: counts and half-integer ranks are exact; rows gather contiguously
        self.counts = np.ascontiguousarray(counts.T)
        self.n, self.draws = len(gold), draws
        order, ranks = self._sorted_ranks(gold)
        self._gold = np.empty_like(ranks)
        self._gold[order] = ranks
        self._gold_var = np.einsum("ij,ij,ij->j", self.counts, self._gold, self._gold, dtype=np.float64)

    def _sorted_ranks(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``order`` sorting ``values`` and, in that order, each value's tie-averaged rank inside every
        resample minus the mean rank ``(n + 1) / 2``; shape ``(n, draws)``."""
        order = np.argsort(values, kind="stable")
        v, w = values[order], self.counts[order]
        new_group = np.r_[True, v[1:] != v[:-1]]
        if new_group.all():  # no ties: a value's copies take positions before+1 .. before+w
            ranks = np.cumsum(w, axis=0) - (w - 1) / 2
        else:
            per_group = np.add.reduceat(w, np.flatnonzero(new_group), axis=0)
            ranks = (np.cumsum(per_group, axis=0) - (per_group - 1) / 2)[np.cumsum(new_group) - 1]
        ranks -= (self.n + 1) / 2
        return order, ranks

    def spearman_draws(self, pred: np.ndarray) -> np.ndarray:
        """Spearman x100 of ``pred`` against the gold scores on every resample, shape ``(draws,)``."""
        pred = np.asarray(pred, dtype=np.float64).reshape(-1)
        if len(pred) != self.n:
            raise ValueError(f"pred has {len(pred)} values, the gold scores {self.n}")
        order, x = self._sorted_ranks(pred)
        w, g = self.counts[order], self._gold[order]
        cov = np.einsum("ij,ij,ij->j", w, x, g, dtype=np.float64)
        var = np.einsum("ij,ij,ij->j", w, x, x, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100 * cov / np.sqrt(var * self._gold_var)

    resample = spearman_draws


class MeanBootstrap:
    """Resamples of one retrieval set's queries: the mean of each per-query value vector on each of them.

    Args:
        n: number of queries.
        draws: number of resamples.
        seed: seed of the ``numpy.random.Generator`` that draws them.
    """

    def __init__(self, n: int, *, draws: int = 1000, seed: int | Sequence[int] = 0) -> None:
        self.counts = query_resamples(n, draws=draws, seed=seed)
        self.n, self.draws = n, draws

    def resample(self, values: np.ndarray) -> np.ndarray:
        """The mean of ``values`` (one per query) on every resample, shape ``(draws,)``."""
        return self.counts @ np.asarray(values, dtype=np.float64) / self.n


def _sts_bootstrap(result: GridResult, set_name: str, metric: str, draws: int, seed: Sequence[int]) -> Bootstrap:
    if metric != "spearman":
        raise ValueError(f"the bootstrap of STS results is over Spearman; metric {metric!r} has none (pass "
                         "--metric spearman, or --draws 0 for the table alone)")
    return PairedBootstrap(result.units[set_name], draws=draws, seed=seed)


def _retrieval_bootstrap(result: GridResult, set_name: str, metric: str, draws: int,
                         seed: Sequence[int]) -> Bootstrap:
    return MeanBootstrap(result.n_units(set_name), draws=draws, seed=seed)


# each task's bootstrap: (a result holding the set, set name, metric, draws, seed) -> its resamples
BOOTSTRAPS: dict[str, Callable[[GridResult, str, str, int, Sequence[int]], Bootstrap]] = {
    "sts": _sts_bootstrap, "retrieval": _retrieval_bootstrap}


def paired_bootstrap(gold: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, draws: int = 1000,
                     seed: int | Sequence[int] = 0, confidence: float = 0.95) -> dict[str, float]:
    """Paired bootstrap CI of ``spearman(b) - spearman(a)`` (x100).

    Returns:
        ``{"delta", "low", "high", "p_le_0"}``: the observed difference, the percentile interval and the
        share of resamples where B is not better than A.
    """
    from scipy import stats

    boot = PairedBootstrap(gold, draws=draws, seed=seed)
    diffs = boot.spearman_draws(pred_b) - boot.spearman_draws(pred_a)
    observed = 100 * (stats.spearmanr(gold, pred_b)[0] - stats.spearmanr(gold, pred_a)[0])
    return summarise(float(observed), diffs, confidence)


def summarise(observed: float, diffs: np.ndarray, confidence: float) -> dict[str, float]:
    """``{"delta", "low", "high", "p_le_0"}`` of a difference and its resampled draws (NaN draws left out).

    Raises:
        ValueError: ``confidence`` outside ``(0, 1)``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} must be in (0, 1); pass e.g. 0.95")
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(diffs, [tail, 100 - tail]) if np.isfinite(diffs).any() else (math.nan,) * 2
    return {"delta": observed, "low": float(low), "high": float(high), "p_le_0": float(np.mean(diffs <= 0))}


def check_compatible(results: Sequence[GridResult], labels: Sequence[str]
                     ) -> tuple[list[str], list[int], list[int], list[str]]:
    """The sets, layers and dims to compare ``results`` on, and what some results had beyond them.

    Results must be of one task and agree on each compared set's units (their number, and the gold scores or
    query ids). Retrieval results compare on what they all have (e.g. a separately trained 2-layer model against
    a 6-layer one: layers 1-2); STS results must have the same sets, layers and dims.

    Returns:
        ``(sets, layers, dims, left_out)``, in the first result's order; ``left_out`` lines such as
        ``"layers [3, 4, 5, 6] of dense"``.

    Raises:
        ValueError: fewer than 2 results, results of different tasks, or results that do not match (the message
            names what differs and in which result).
    """
    if len(results) < 2:
        raise ValueError(f"compare needs at least 2 results, got {len(results)}")
    tasks = {r.task for r in results}
    if len(tasks) > 1:
        have = ", ".join(f"{label}: {r.task}" for r, label in zip(results, labels, strict=True))
        raise ValueError(f"cannot compare results of different tasks ({have}); compare each task separately "
                         "(m2d eval writes mixed runs to res.json and res.retrieval.json)")
    spec = results[0].spec
    ref, ref_label = results[0], labels[0]
    common: dict[str, list[Any]] = {}
    left_out: list[str] = []
    for what in ("sets", "layers", "dims"):
        shared = set.intersection(*(set(getattr(r, what)) for r in results))
        common[what] = [v for v in getattr(ref, what) if v in shared]
        a = getattr(ref, what)
        for r, label in zip(results, labels, strict=True):
            b, extra = getattr(r, what), [v for v in getattr(r, what) if v not in shared]
            if set(a) != set(b) and not spec.common_exits:
                only_a, only_b = [x for x in a if x not in b], [x for x in b if x not in a]
                raise ValueError(f"results do not match: {what} differ between {ref_label} ({a}) and {label} ({b}); "
                                 f"only in {ref_label}: {only_a}, only in {label}: {only_b}; "
                                 f"re-run m2d eval with the same --sets/--layers/--dims")
            if extra:
                left_out.append(f"{what} {extra} of {label}")
        if not common[what]:
            have = "; ".join(f"{label} {getattr(r, what)}" for r, label in zip(results, labels, strict=True))
            raise ValueError(f"results do not match: no {what[:-1]} is in all of them ({have}); re-run m2d eval "
                             f"with --sets/--layers/--dims they share")
    for res, label in zip(results[1:], labels[1:], strict=True):
        for s in common["sets"]:
            if ref.n_units(s) != res.n_units(s):
                raise ValueError(f"results do not match: set {s!r} has {ref.n_units(s)} {spec.units} in {ref_label} "
                                 f"but {res.n_units(s)} in {label} (different split, subset or data?)")
            if s in ref.units and s in res.units and not np.array_equal(ref.units[s], res.units[s]):
                raise ValueError(f"results do not match: set {s!r} has different {spec.labels[0]} in {ref_label} "
                                 f"and {label} (different split, variant or data?)")
    return common["sets"], common["layers"], common["dims"], left_out


@dataclass
class Comparison:
    """Side-by-side metric of several results of one task and paired bootstrap CIs of their differences.

    ``cis[(i, j)][(set, layer, dim)]`` summarises ``results[j] - results[i]`` (``set`` may be ``"avg"``: the
    seven STS sets). ``sets`` / ``layers`` / ``dims`` are the ones compared; ``left_out`` says what some results
    had beyond them.
    """

    labels: list[str]
    results: list[GridResult]
    metric: str
    draws: int
    seed: int
    confidence: float
    cis: dict[tuple[int, int], dict[tuple[str, int, int], dict[str, float]]] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.results[0].task

    @property
    def tables(self) -> list[str]:
        """The sets of the report: the compared sets, and ``"avg"`` when every result has the 7-set average."""
        return self.sets + ([AVG] if all(r.has_average() for r in self.results) else [])

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for (i, j), per_exit in self.cis.items():
            for (s, n, d), ci in per_exit.items():
                rows.append({"a": self.labels[i], "b": self.labels[j], "set": s, "layer": n, "dim": d,
                             f"a_{self.metric}": self.results[i].score(s, n, d, self.metric),
                             f"b_{self.metric}": self.results[j].score(s, n, d, self.metric), **ci})
        return {"kind": self.task, "labels": self.labels, "metric": self.metric, "draws": self.draws,
                "seed": self.seed, "confidence": self.confidence, "sets": self.sets, "layers": self.layers,
                "dims": self.dims, "left_out": self.left_out, "differences": rows}

    def to_markdown(self) -> str:
        pairs = list(self.cis) or list(itertools.combinations(range(len(self.results)), 2))
        pct = f"{100 * self.confidence:g}%"
        label, spec = metric_label(self.metric), self.results[0].spec
        lines = [f"# Comparison of {', '.join(self.labels)}", "",
                 f"{label}. Δ = later − earlier model; {pct} CI: paired bootstrap over {spec.units} "
                 f"({self.draws} draws, seed {self.seed}); * = the CI excludes 0." if self.cis else
                 f"{label}. Δ = later − earlier model (no bootstrap: draws = 0).", ""]
        if self.left_out:
            lines += ["Compared on the exits every result has; left out: " + "; ".join(self.left_out) + ".", ""]
        res0 = self.results[0]
        for s in self.tables:
            title = "average of the 7 STS sets" if s == AVG else f"{s} ({spec.count.format(n=res0.n_units(s))})"
            header = ["layer", "dim", *self.labels]
            for i, j in pairs:
                header += [f"Δ {self.labels[j]}−{self.labels[i]}"] + ([f"{pct} CI"] if self.cis else [])
            lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
            for n in self.layers:
                for d in self.dims:
                    scores = [r.score(s, n, d, self.metric) for r in self.results]
                    cells = [str(n), str(d), *(f"{v:.2f}" for v in scores)]
                    for i, j in pairs:
                        ci = self.cis.get((i, j), {}).get((s, n, d))
                        star = "*" if ci and (ci["low"] > 0 or ci["high"] < 0) else ""
                        cells.append(f"{scores[j] - scores[i]:+.2f}{star}")
                        if self.cis:
                            cells.append(f"[{ci['low']:+.2f}, {ci['high']:+.2f}]" if ci else "")
                    lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


def compare_results(results: Sequence[GridResult], labels: Sequence[str] | None = None, *, metric: str | None = None,
                    draws: int = 1000, seed: int = 0, confidence: float = 0.95,
                    show_progress_bar: bool = False) -> Comparison:
    """Check that ``results`` match and bootstrap every pairwise difference of ``metric`` at every exit.

    Args:
        results: two or more results of one task (STS or retrieval) over the same sets, exits and units.
        labels: a short name per result (default: the model names).
        metric: the metric compared (default: the first result's headline: Spearman, nDCG@10).
        draws: resamples of each set's units (pairs or queries; 0 skips the bootstrap).
        seed: base seed; each set gets its own stream from it and the set name (:func:`set_seed`).
        confidence: central interval mass.
        show_progress_bar: a tqdm bar over sets.

    Raises:
        ValueError: results of different tasks, mismatched results, an unknown metric, or per-unit values
            missing when ``draws > 0``.
    """
    from tqdm.auto import tqdm

    labels = list(labels) if labels is not None else [r.model for r in results]
    sets, layers, dims, left_out = check_compatible(results, labels)
    metric = metric or results[0].metric
    for res, label in zip(results, labels, strict=True):
        if metric not in res.metrics:
            raise ValueError(f"{label} has no metric {metric!r}; it has {res.metrics}")
    comp = Comparison(labels, list(results), metric, draws, seed, confidence, sets=sets, layers=layers, dims=dims,
                      left_out=left_out)
    if draws == 0:
        return comp
    spec = results[0].spec
    for res, label in zip(results, labels, strict=True):
        missing = [s for s in sets if s not in res.predictions]
        if missing:
            raise ValueError(f"{label} has no per-{spec.unit} {spec.values[0]} for {missing} (its .preds.npz sidecar "
                             f"is missing); re-run m2d eval --output, or pass --draws 0 to skip the bootstrap")
    pairs = list(itertools.combinations(range(len(results)), 2))
    exits = [(n, d) for n in layers for d in dims]
    set_draws: dict[tuple[int, int, int, int], dict[str, np.ndarray]] = {}
    comp.cis = {p: {} for p in pairs}
    for s in tqdm(sets, desc="bootstrap", disable=not show_progress_bar):
        boot = BOOTSTRAPS[results[0].task](results[0], s, metric, draws, set_seed(s, seed))
        for n, d in exits:
            stats = [boot.resample(r.unit_values(s, n, d, metric)) for r in results]
            for i, j in pairs:
                diff = stats[j] - stats[i]
                set_draws.setdefault((i, j, n, d), {})[s] = diff
                observed = results[j].score(s, n, d, metric) - results[i].score(s, n, d, metric)
                comp.cis[(i, j)][(s, n, d)] = summarise(observed, diff, confidence)
    if AVG in comp.tables:  # sets are resampled independently, so the mean of their draws is an avg draw
        for (i, j, n, d), diffs in set_draws.items():
            observed = results[j].score(AVG, n, d, metric) - results[i].score(AVG, n, d, metric)
            mean_diff = np.mean([diffs[k] for k in STS_SETS], axis=0)
            comp.cis[(i, j)][(AVG, n, d)] = summarise(observed, mean_diff, confidence)
    return comp


compare_retrieval = compare_results  # the name retrieval callers use
RetrievalComparison = Comparison
