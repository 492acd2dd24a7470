"""The similarity and correlation measures every evaluation path uses, once.

Cosines of embedding rows and of sentence pairs (at every Matryoshka prefix in one pass), and Spearman /
Pearson correlations x100. The grid evaluator, the export checks and the benchmark's quality columns all
score with these functions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from scipy import stats

from matryoshka2d.truncation import EPS, cosine


class Pairs(Protocol):
    """Sentence pairs with gold scores (:class:`~matryoshka2d.data.datasets.ScoredPairs` is one)."""

    name: str
    sentences1: Sequence[str]
    sentences2: Sequence[str]
    scores: Any


def exit_cosines(emb: np.ndarray, idx1: np.ndarray, idx2: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """Cosine of each pair at every dim in ``dims`` (prefix ``[:d]``, L2-normalised), shape (len(dims), P).

    Prefix dot products and squared norms come from cumulative sums, so all dims cost one pass.
    """
    a, b = emb[idx1].astype(np.float64), emb[idx2].astype(np.float64)
    cols = np.asarray(dims) - 1
    dot = np.cumsum(a * b, axis=1)[:, cols]
    norms = np.sqrt(np.cumsum(a * a, axis=1)[:, cols] * np.cumsum(b * b, axis=1)[:, cols])
    return (dot / np.maximum(norms, EPS)).T


def correlations(gold: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(Spearman, Pearson) x100; NaN when either side is constant."""
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return 100 * float(stats.spearmanr(gold, pred)[0]), 100 * float(stats.pearsonr(gold, pred)[0])


def pair_cosines(emb: np.ndarray, texts: Sequence[str], pairs: Pairs) -> np.ndarray | None:
    """Cosine of each pair of ``pairs`` from ``emb`` (row ``i`` embeds ``texts[i]``).

    Returns:
        float64 array (len(pairs),), or ``None`` when a pair sentence is not among ``texts``.
    """
    row = {t: i for i, t in enumerate(texts)}
    if any(t not in row for t in (*pairs.sentences1, *pairs.sentences2)):
        return None
    return cosine(emb[[row[t] for t in pairs.sentences1]], emb[[row[t] for t in pairs.sentences2]])


def sts_spearman(encode: Callable[[Sequence[str]], np.ndarray], pairs: Pairs) -> float:
    """Spearman x100 between the cosine of each pair's embeddings and its gold score.

    Args:
        encode: embeds a list of texts (each unique sentence is embedded once).
        pairs: the scored pairs.
    """
    unique = list(dict.fromkeys([*pairs.sentences1, *pairs.sentences2]))
    cosines = pair_cosines(encode(unique), unique, pairs)
    return correlations(np.asarray(pairs.scores, dtype=np.float64), cosines)[0]  # type: ignore[arg-type]
