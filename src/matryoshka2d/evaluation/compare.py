"""Comparing evaluation results: matching checks, paired bootstrap of Spearman differences, reports.

The bootstrap resamples the pairs of a set with replacement (the same resample for both models, hence
"paired") and recomputes each model's Spearman correlation on it. It is vectorised: a resample is a vector
of counts ``w`` over the original pairs, the tie-averaged rank of a value in the resample follows from
cumulative counts over the values sorted once, and Spearman is the ``w``-weighted Pearson correlation of
those ranks (identical to ``scipy.stats.spearmanr`` on the explicitly resampled arrays).
"""

from __future__ import annotations

import itertools
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from matryoshka2d.evaluation.grid import AVG, GridResult

logger = logging.getLogger(__name__)


class PairedBootstrap:
    """Resamples of one set's pairs, shared by every prediction vector scored on that set.

    Args:
        gold: gold scores of the ``n`` pairs.
        draws: number of resamples.
        seed: seed of the ``numpy.random.Generator`` that draws them.
    """

    def __init__(self, gold: np.ndarray, *, draws: int = 1000, seed: int | Sequence[int] = 0) -> None:
        gold = np.asarray(gold, dtype=np.float64).reshape(-1)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws {draws!r} must be a positive integer; pass e.g. 1000")
        if len(gold) < 3:
            raise ValueError(f"bootstrap needs at least 3 pairs, got {len(gold)}")
        n = len(gold)
        idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
        counts = np.bincount((idx + (np.arange(draws) * n)[:, None]).ravel(), minlength=draws * n)
        # (n, draws) float32: counts and half-integer ranks are exact; rows gather contiguously
        self.counts = np.ascontiguousarray(counts.reshape(draws, n).T, dtype=np.float32)
        self.n, self.draws = n, draws
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
    return _summarise(float(observed), diffs, confidence)


def _summarise(observed: float, diffs: np.ndarray, confidence: float) -> dict[str, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} must be in (0, 1); pass e.g. 0.95")
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(diffs, [tail, 100 - tail]) if np.isfinite(diffs).any() else (math.nan,) * 2
    return {"delta": observed, "low": float(low), "high": float(high), "p_le_0": float(np.mean(diffs <= 0))}


def check_compatible(results: Sequence[GridResult], labels: Sequence[str]) -> None:
    """Raise unless every result covers the same sets, layers, dims and pairs.

    Raises:
        ValueError: names what differs and in which file.
    """
    if len(results) < 2:
        raise ValueError(f"compare needs at least 2 results, got {len(results)}")
    ref, ref_label = results[0], labels[0]
    for res, label in zip(results[1:], labels[1:], strict=True):
        for what in ("sets", "layers", "dims"):
            a, b = getattr(ref, what), getattr(res, what)
            if sorted(map(str, a)) != sorted(map(str, b)):
                only_a = [x for x in a if x not in b]
                only_b = [x for x in b if x not in a]
                raise ValueError(f"results do not match: {what} differ between {ref_label} ({a}) and "
                                 f"{label} ({b}); "
                                 f"only in {ref_label}: {only_a}, only in {label}: {only_b}; "
                                 f"re-run m2d eval with the same --sets/--layers/--dims")
        for s in ref.sets:
            if ref.n_pairs(s) != res.n_pairs(s):
                raise ValueError(f"results do not match: set {s!r} has {ref.n_pairs(s)} pairs in {ref_label} "
                                 f"but {res.n_pairs(s)} in {label} (different split, subset or data?)")
            if s in ref.gold and s in res.gold and not np.array_equal(ref.gold[s], res.gold[s]):
                raise ValueError(f"results do not match: set {s!r} has different gold scores in "
                                 f"{ref_label} and {label} (different split, variant or data?)")


@dataclass
class Comparison:
    """Side-by-side correlations of several results and paired bootstrap CIs of their differences.

    ``cis[(i, j)][(set, layer, dim)]`` holds the summary of ``results[j] - results[i]``.
    """

    labels: list[str]
    results: list[GridResult]
    draws: int
    seed: int
    confidence: float
    cis: dict[tuple[int, int], dict[tuple[str, int, int], dict[str, float]]] = field(default_factory=dict)

    @property
    def sets(self) -> list[str]:
        base = self.results[0].sets
        return base + ([AVG] if self.results[0].has_average() else [])

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for (i, j), per_exit in self.cis.items():
            for (s, n, d), ci in per_exit.items():
                rows.append({"a": self.labels[i], "b": self.labels[j], "set": s, "layer": n, "dim": d,
                             "a_spearman": self.results[i].spearman(s, n, d),
                             "b_spearman": self.results[j].spearman(s, n, d), **ci})
        return {"labels": self.labels, "draws": self.draws, "seed": self.seed, "confidence": self.confidence,
                "differences": rows}

    def to_markdown(self) -> str:
        pairs = list(self.cis) or list(itertools.combinations(range(len(self.results)), 2))
        pct = f"{100 * self.confidence:g}%"
        lines = [f"# Comparison of {', '.join(self.labels)}", "",
                 f"Spearman x100. Δ = later − earlier model; {pct} CI: paired bootstrap over pairs "
                 f"({self.draws} draws, seed {self.seed}); * = the CI excludes 0." if self.cis else
                 "Spearman x100. Δ = later − earlier model (no bootstrap: draws = 0).", ""]
        for s in self.sets:
            res0 = self.results[0]
            title = "average of the 7 STS sets" if s == AVG else f"{s} (n={res0.n_pairs(s)})"
            header = ["layer", "dim", *self.labels]
            for i, j in pairs:
                header += [f"Δ {self.labels[j]}−{self.labels[i]}"] + ([f"{pct} CI"] if self.cis else [])
            lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
            for n in res0.layers:
                for d in res0.dims:
                    cells = [str(n), str(d), *(f"{r.score(s, n, d):.2f}" for r in self.results)]
                    for i, j in pairs:
                        delta = self.results[j].score(s, n, d) - self.results[i].score(s, n, d)
                        ci = self.cis.get((i, j), {}).get((s, n, d))
                        star = "*" if ci and (ci["low"] > 0 or ci["high"] < 0) else ""
                        cells.append(f"{delta:+.2f}{star}")
                        if self.cis:
                            cells.append(f"[{ci['low']:+.2f}, {ci['high']:+.2f}]" if ci else "")
                    lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


def compare_results(results: Sequence[GridResult], labels: Sequence[str] | None = None, *, draws: int = 1000,
                    seed: int = 0, confidence: float = 0.95, show_progress_bar: bool = False) -> Comparison:
    """Check that ``results`` match and bootstrap every pairwise Spearman difference at every exit.

    Args:
        results: two or more grid results over the same sets and exits.
        labels: a short name per result (default: the model names).
        draws: bootstrap resamples per set (0 skips the bootstrap).
        seed: base seed; each set gets its own stream derived from it and the set name.
        confidence: central interval mass.
        show_progress_bar: a tqdm bar over sets.

    Raises:
        ValueError: mismatched results, or per-pair predictions missing when ``draws > 0``.
    """
    from tqdm.auto import tqdm

    labels = list(labels) if labels is not None else [r.model for r in results]
    check_compatible(results, labels)
    comp = Comparison(labels, list(results), draws, seed, confidence)
    if draws == 0:
        return comp
    for res, label in zip(results, labels, strict=True):
        missing = [s for s in res.sets if s not in res.predictions]
        if missing:
            raise ValueError(f"{label} has no per-pair predictions for {missing} (its .preds.npz sidecar is "
                             f"missing); re-run m2d eval --output, or pass --draws 0 to skip the bootstrap")
    res0 = results[0]
    pairs = list(itertools.combinations(range(len(results)), 2))
    exits = [(n, d) for n in res0.layers for d in res0.dims]
    diff_draws: dict[tuple[int, int], dict[tuple[int, int], list[np.ndarray]]] = {p: {} for p in pairs}
    comp.cis = {p: {} for p in pairs}
    for s in tqdm(res0.sets, desc="bootstrap", disable=not show_progress_bar):
        boot = PairedBootstrap(res0.gold[s], draws=draws, seed=[seed, zlib.crc32(s.encode())])
        cells = [{(n, d): _pred(r, s, n, d) for n, d in exits} for r in results]
        sp = [{e: boot.spearman_draws(c[e]) for e in exits} for c in cells]
        for i, j in pairs:
            for n, d in exits:
                diff = sp[j][(n, d)] - sp[i][(n, d)]
                diff_draws[(i, j)].setdefault((n, d), []).append(diff)
                observed = results[j].spearman(s, n, d) - results[i].spearman(s, n, d)
                comp.cis[(i, j)][(s, n, d)] = _summarise(observed, diff, confidence)
    if res0.has_average():  # sets are resampled independently, so the mean of their draws is an avg draw
        from matryoshka2d.data.datasets import STS_SETS

        positions = [res0.sets.index(s) for s in STS_SETS]
        for (i, j), per_exit in diff_draws.items():
            for n, d in exits:
                mean_diff = np.mean([per_exit[(n, d)][k] for k in positions], axis=0)
                observed = results[j].score(AVG, n, d) - results[i].score(AVG, n, d)
                comp.cis[(i, j)][(AVG, n, d)] = _summarise(observed, mean_diff, confidence)
    return comp


def _pred(result: GridResult, set_name: str, layer: int, dim: int) -> np.ndarray:
    layers, dims = result.layers, result.dims
    return result.predictions[set_name][layers.index(layer), dims.index(dim)]
