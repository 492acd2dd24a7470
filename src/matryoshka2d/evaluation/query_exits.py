"""Search as it is used: one document index at one exit, queries at every exit (method.md section 8).

The corpus is encoded once, at the document exit (the full depth by default), exactly as an index holds it;
each query is encoded at every requested exit (``input_type="query"``, so exits with a query path of their own
take it). Every query exit ``(n, d)`` is scored against the documents at ``(doc_layer, d)``: both truncated to
the same width ``d``. The result is a :class:`~matryoshka2d.evaluation.result.RetrievalResult` whose
``layer`` is the QUERY layer (``metadata["doc_layer"]`` names the index's exit), so ``m2d compare`` gives
paired bootstrap CIs over queries between two models or methods, exit by exit.

Document vectors can be passed in (``doc_vectors``), e.g. from an index or an earlier run: when the document
exit is unchanged (post-hoc alignment), one encoding of the corpus serves every query-side variant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from matryoshka2d.data.beir import BeirSet
from matryoshka2d.encoder.batching import embed_layers
from matryoshka2d.evaluation.result import RetrievalResult, grid_exits, model_label
from matryoshka2d.evaluation.retrieval import (
    CORPUS_CHUNK,
    RETRIEVAL_METRICS,
    identical_rows,
    rank,
    run_metrics,
    search_depth,
)
from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import INPUT_TYPES, InputType, check_choice

logger = logging.getLogger(__name__)


def encode_documents(model: Any, data: BeirSet, layer: int, *, batch_size: int = 64,
                     chunk_size: int = CORPUS_CHUNK, show_progress_bar: bool | None = None) -> np.ndarray:
    """Pooled ``(num_docs, D)`` float32 document vectors at ``layer`` (the shared path), in corpus order."""
    layer = model.check_layer(layer)
    out = np.empty((data.num_docs, model.hidden_size), dtype=np.float32)
    for first in range(0, data.num_docs, chunk_size):
        chunk = embed_layers(model, data.doc_texts[first:first + chunk_size], [layer], batch_size=batch_size,
                             show_progress_bar=show_progress_bar, desc=f"{data.name} corpus")[layer]
        out[first:first + len(chunk)] = chunk
    return out


def evaluate_query_exits(model: Any, sets: Mapping[str, BeirSet], *, layers: Sequence[int] | None = None,
                         dims: Sequence[int] | None = None, doc_layer: int | None = None,
                         input_type: InputType = "query", metrics: Sequence[str] = RETRIEVAL_METRICS,
                         doc_vectors: Mapping[str, np.ndarray] | None = None, batch_size: int = 64,
                         show_progress_bar: bool | None = None, model_name: str | None = None,
                         ignore_identical_ids: bool = True) -> RetrievalResult:
    """Metrics (x100) of queries at every exit ``(layer, dim)`` against ONE index of documents at ``doc_layer``.

    Args:
        model: a :class:`~matryoshka2d.encoder.model.MatryoshkaEncoder`.
        sets: ``{name: BeirSet}``.
        layers: query exits (``None``: all ``1..N``).
        dims: widths (``None``: the Matryoshka dims); queries and documents are truncated alike.
        doc_layer: the index's exit (``None``: the model's document exit, N unless its metadata says otherwise).
        input_type: how queries are encoded (``"query"``: their own path where an exit has one).
        metrics: ranx metric names; the first is the headline.
        doc_vectors: ``{set: (num_docs, >= max(dims)) float32}`` pooled document vectors at ``doc_layer`` to use
            instead of encoding the corpus.
        batch_size: texts per forward pass.
        show_progress_bar: ``None`` shows bars for long inputs when logging is at INFO.
        model_name: name stored in the result.
        ignore_identical_ids: leave a document whose id equals the query's id out of its ranking (BEIR's and
            MTEB's default; see :mod:`matryoshka2d.evaluation.retrieval`).

    Returns:
        The grid (``layer`` = query layer) with per-query scores; ``metadata["doc_layer"]`` is the index exit.

    Raises:
        ValueError: a layer / dim / metric out of range, or document vectors of the wrong shape.
    """
    check_choice("input_type", input_type, INPUT_TYPES)
    doc = model.check_layer(doc_layer if doc_layer is not None else model.document_space["document_exit"])
    layers, dims = grid_exits(model, layers, dims)
    metrics = list(dict.fromkeys(metrics))
    depth = search_depth(metrics)
    records: list[dict[str, Any]] = []
    per_query: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, Any]] = {}
    for name, data in sets.items():
        start = time.perf_counter()
        given = None if doc_vectors is None else doc_vectors.get(name)
        if given is not None and (given.ndim != 2 or given.shape[0] != data.num_docs or given.shape[1] < max(dims)):
            raise ValueError(f"doc_vectors[{name!r}] has shape {given.shape}, expected ({data.num_docs}, >= "
                             f"{max(dims)}) pooled vectors at layer {doc}")
        docs = given if given is not None else encode_documents(model, data, doc, batch_size=batch_size,
                                                                 show_progress_bar=show_progress_bar)
        encoded = time.perf_counter()
        queries = embed_layers(model, data.query_texts, layers, batch_size=batch_size, input_type=input_type,
                               show_progress_bar=show_progress_bar, desc=f"{name} queries")
        queried = time.perf_counter()
        self_rows = identical_rows(data, ignore_identical_ids)
        table = np.empty((len(metrics), len(layers), len(dims), len(data)), dtype=np.float32)
        for j, d in enumerate(dims):
            docs_d = truncate(docs, d)
            for i, n in enumerate(layers):
                ranking = rank(truncate(queries[n], d), docs_d, depth, self_rows)
                scores = run_metrics(data.qrels, data.query_ids, data.doc_ids, ranking, metrics)
                table[:, i, j] = np.stack([scores[m] for m in metrics])
                records.append({"set": name, "layer": n, "dim": d, **{m: float(np.mean(v)) for m, v in scores.items()},
                                "n": len(data)})
        per_query[name] = table
        timings[name] = {"queries": len(data), "docs": data.num_docs, "doc_vectors_given": given is not None,
                         "doc_encode_s": round(encoded - start, 4), "query_encode_s": round(queried - encoded, 4),
                         "score_s": round(time.perf_counter() - queried, 4),
                         "identical_ids": int((self_rows >= 0).sum())}
    meta = {"layers": layers, "dims": dims, "metrics": metrics, "batch_size": batch_size, "doc_layer": doc,
            "input_type": input_type, "document_space": model.document_space,
            "ignore_identical_ids": bool(ignore_identical_ids),
            "num_layers": model.num_layers, "hidden_size": model.hidden_size,
            "max_seq_length": getattr(model, "max_seq_length", None),
            "split": {name: s.split for name, s in sets.items()}, "timings": timings}
    return RetrievalResult(model_label(model, model_name), records, metrics, per_query,
                           {k: list(s.query_ids) for k, s in sets.items()}, meta)
