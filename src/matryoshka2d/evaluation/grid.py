"""STS evaluation over the whole (layer x dim) grid, with one model pass per dataset: the STS task.

Each set's unique sentences run through the backbone once, keeping the pooled vector of every requested
layer; every exit ``(n, d)`` is then scored from those vectors by slicing ``[:d]``, L2-normalising and
taking the cosine of each pair. Spearman and Pearson correlations are reported x100, in a
:class:`~matryoshka2d.evaluation.result.GridResult` of task ``"sts"`` that holds the cosines of every pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from matryoshka2d.data.datasets import ScoredPairs
from matryoshka2d.encoder.batching import embed_layers
from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.evaluation.metrics import correlations, exit_cosines
from matryoshka2d.evaluation.result import (
    AVG,
    FORMAT_VERSION,
    GridResult,
    grid_exits,
    model_label,
    named_sets,
    read_result_json,
)
from matryoshka2d.evaluation.sidecar import predictions_path

logger = logging.getLogger(__name__)

# the result's names, importable from here as before the result type served every task
__all__ = ["AVG", "FORMAT_VERSION", "GridResult", "evaluate_grid", "matryoshka_dims", "predictions_path",
           "read_result_json"]


def evaluate_grid(model: Any, sets: Mapping[str, ScoredPairs] | Sequence[ScoredPairs] | ScoredPairs, *,
                  layers: Sequence[int] | None = None, dims: Sequence[int] | None = None,
                  batch_size: int = 64, show_progress_bar: bool | None = None,
                  model_name: str | None = None) -> GridResult:
    """Spearman and Pearson (x100) of every exit ``(layer, dim)`` on every set.

    Args:
        model: a :class:`~matryoshka2d.encoder.model.MatryoshkaEncoder`.
        sets: ``{name: ScoredPairs}`` or a sequence of ScoredPairs (keyed by their ``name``).
        layers: exits in ``1..N``; ``None`` means all.
        dims: widths in ``1..D``; ``None`` means :func:`matryoshka_dims`.
        batch_size: sentences per forward pass.
        show_progress_bar: ``None`` shows one for long sets when logging is at INFO.
        model_name: name stored in the result (default: the model's source).

    Returns:
        The grid, holding the per-pair cosines for paired bootstrap comparisons.

    Raises:
        ValueError: an empty ``sets``, or a layer / dim / batch size out of range.
    """
    items = named_sets(sets, ScoredPairs, "matryoshka2d.data.datasets.load_sts", "{'stsb': load_sts('stsb')}")
    layers, dims = grid_exits(model, layers, dims)
    records: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, float]] = {}
    for name, pairs in items.items():
        distinct = np.unique(np.asarray(pairs.scores, dtype=np.float64))
        if len(distinct) < 2:
            logger.warning("%s: all %d pairs have the same gold score (%s); Spearman and Pearson are undefined "
                           "there, so its cells are empty (null in JSON) and it is left out of averages",
                           name, len(pairs), distinct[0] if len(distinct) else "none")
        start = time.perf_counter()
        sentences, idx1, idx2 = pairs.unique_sentences()
        pooled = embed_layers(model, sentences, layers, batch_size=batch_size,
                              show_progress_bar=show_progress_bar, desc=f"eval {name}")
        encoded = time.perf_counter()
        preds = np.stack([exit_cosines(pooled[n], idx1, idx2, dims) for n in layers]).astype(np.float32)
        for i, n in enumerate(layers):
            for j, d in enumerate(dims):
                sp, pe = correlations(pairs.scores, preds[i, j])
                records.append({"set": name, "layer": n, "dim": d, "spearman": sp, "pearson": pe,
                                "n": len(pairs)})
        predictions[name] = preds
        timings[name] = {"sentences": len(sentences), "encode_s": round(encoded - start, 4),
                         "score_s": round(time.perf_counter() - encoded, 4)}
        logger.info("%s: %d pairs, %d unique sentences, encoded in %.2fs", name, len(pairs), len(sentences),
                    encoded - start)
    meta = {"layers": layers, "dims": dims, "batch_size": batch_size,
            "pooling": getattr(model, "pooling", None), "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "timings": timings}
    return GridResult(model_label(model, model_name), records, predictions, {k: v.scores for k, v in items.items()},
                      meta)
