"""Retrieval evaluation (BEIR / MTEB protocol) over the whole (layer x dim) grid, one model pass per text.

The corpus (streamed in chunks) and the test queries of a :class:`~matryoshka2d.data.beir.BeirSet` run
through the backbone ONCE, keeping the pooled vector of every requested layer (float32, only the first
``max(dims)`` coordinates). Every exit ``(n, d)`` is then scored by slicing ``[:d]``, L2-normalising and
searching the full corpus exactly (blockwise matrix products, ties broken by corpus order). Metrics
(nDCG@10, the headline, Recall@100, MRR@10, MAP@100; x100) come from ``ranx`` (trec_eval definitions:
nDCG uses the grade as the gain), per query, so results can be compared by a paired bootstrap over
queries. With ``asymmetric_dims`` the same vectors also give a query-layer x doc-layer matrix: queries at
one exit scored against documents encoded at another. As in BEIR and MTEB (``ignore_identical_ids``), a
document whose id equals the query's id is left out of that query's ranking by default (some sets, e.g.
ArguAna and Quora, hold each query in the corpus too); the result's metadata says whether it was.

Needs the ``retrieval`` extra for ``ranx``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from matryoshka2d.data.beir import BeirSet
from matryoshka2d.encoder.batching import embed_layers
from matryoshka2d.evaluation.result import (
    HEADLINE_METRIC,
    RETRIEVAL_METRICS,
    RetrievalResult,
    grid_exits,
    model_label,
    named_sets,
)
from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import install_hint

logger = logging.getLogger(__name__)

__all__ = ["HEADLINE_METRIC", "RETRIEVAL_METRICS", "drop_identical_ids", "encode_retrieval_set", "evaluate_retrieval",
           "exact_topk", "identical_rows", "normalized_prefix", "rank", "run_metrics", "search_depth"]

CORPUS_CHUNK = 2048  # documents per embed_layers call: bounds token ids and activations held at once
SCORE_BLOCK_BYTES = 64 << 20  # float32 query x corpus scores held per block


def search_depth(metrics: Sequence[str]) -> int:
    """The ranking depth the metrics need: the largest ``@k`` (100 for the default metrics)."""
    depth = 0
    for m in metrics:
        name, _, cut = m.partition("@")
        if not cut.isdigit() or int(cut) < 1:
            raise ValueError(f"metric {m!r} needs a cutoff, e.g. {name or 'ndcg'}@10")
        depth = max(depth, int(cut))
    return depth


def _ranx() -> Any:
    try:
        import ranx
    except ImportError:
        raise ImportError(f"retrieval metrics need ranx: {install_hint('retrieval')}") from None
    return ranx


normalized_prefix = truncate  # the name tests/search/test_search.py uses


def exact_topk(queries: np.ndarray, docs: np.ndarray, k: int, *,
               block_bytes: int = SCORE_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` documents by inner product for every query, best first.

    Scores are computed blockwise (a block of queries against the whole corpus) so at most ``block_bytes`` of
    scores are held. Equal scores are ordered by document position (the lower index first), also at the
    ``k``-th place, so the result is deterministic.

    Args:
        queries: ``(Q, d)`` float32.
        docs: ``(N, d)`` float32.
        k: results per query (capped at ``N``).
        block_bytes: score memory per block.

    Returns:
        ``(scores, indices)``, both ``(Q, min(k, N))``; indices into ``docs``.

    Raises:
        ValueError: mismatched widths or ``k < 1``.
    """
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(f"queries {queries.shape} and docs {docs.shape} must be 2-D with the same width")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k {k!r} must be a positive integer")
    n = docs.shape[0]
    k = min(int(k), n)
    block = max(1, block_bytes // (4 * max(n, 1)))
    out_s = np.empty((len(queries), k), dtype=np.float32)
    out_i = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ docs.T
        out_s[start:start + block], out_i[start:start + block] = _topk_rows(scores, k)
    return out_s, out_i


def _topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = scores.shape[1]
    if k < n:
        idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(scores, idx, axis=1)
        kth = vals.min(axis=1, keepdims=True)
        # rows where a document tied with the k-th score was left out: redo them exactly (stable sort)
        unfair = (scores == kth).sum(axis=1) > (vals == kth).sum(axis=1)
        for r in np.flatnonzero(unfair):
            idx[r] = np.argsort(-scores[r], kind="stable")[:k]
    else:
        idx = np.broadcast_to(np.arange(n), scores.shape).copy()
    vals = np.take_along_axis(scores, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def drop_identical_ids(ranking: np.ndarray, self_rows: np.ndarray, depth: int) -> np.ndarray:
    """``ranking`` without each query's own document (``self_rows[q]``, ``-1`` for none), cut to ``depth``.

    Rank with one result more than ``depth`` so a query that loses its own document still has ``depth``;
    rows that come out shorter (a tiny corpus) are padded with ``-1`` (no result).
    """
    out = np.full((len(ranking), depth), -1, dtype=np.int64)
    for q, (row, own) in enumerate(zip(ranking, self_rows, strict=True)):
        kept = row[row != own] if own >= 0 else row
        out[q, :min(depth, len(kept))] = kept[:depth]
    return out


def identical_rows(data: BeirSet, ignore: bool = True) -> np.ndarray:
    """Per evaluated query, the corpus row of the document with the query's own id (``-1``: none, or ``ignore``
    is off): what ``ignore_identical_ids`` leaves out of that query's ranking."""
    position = {d: i for i, d in enumerate(data.doc_ids)}
    return np.array([position.get(q, -1) if ignore else -1 for q in data.query_ids], dtype=np.int64)


def rank(queries: np.ndarray, docs: np.ndarray, depth: int, self_rows: np.ndarray) -> np.ndarray:
    """Exact top-``depth`` document rows per query, each query's own document (``self_rows``) left out."""
    if not (self_rows >= 0).any():
        return exact_topk(queries, docs, depth)[1]
    return drop_identical_ids(exact_topk(queries, docs, depth + 1)[1], self_rows, depth)


def run_metrics(qrels: Mapping[str, Mapping[str, int]], query_ids: Sequence[str], doc_ids: Sequence[str],
                ranking: np.ndarray, metrics: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, np.ndarray]:
    """Per-query metrics x100 of a ranking, computed by ``ranx``.

    Args:
        qrels: ``{query_id: {doc_id: grade}}`` covering exactly ``query_ids``.
        query_ids: one per row of ``ranking``.
        doc_ids: the corpus ids ``ranking`` indexes.
        ranking: ``(Q, k)`` document indices, best first (``-1`` = no result, skipped). ranx is given the
            ranks (score ``k - rank``), so its own sort cannot reorder ties differently from ``ranking``.
        metrics: ranx metric names, e.g. ``ndcg@10``.

    Returns:
        ``{metric: float64 array (Q,)}`` in ``query_ids`` order.
    """
    ranx = _ranx()
    if len(query_ids) != len(ranking):
        raise ValueError(f"{len(query_ids)} query ids for {len(ranking)} ranking rows")
    k = ranking.shape[1]
    ids = np.asarray(doc_ids, dtype=object)
    run = {q: dict(zip(ids[row[row >= 0]].tolist(), range(k, 0, -1), strict=False))
           for q, row in zip(query_ids, ranking, strict=True)}
    judged = {q: {d: int(g) for d, g in qrels[q].items()} for q in query_ids}
    ranx_run = ranx.Run(run)
    ranx.evaluate(ranx.Qrels(judged), ranx_run, list(metrics), return_mean=False, save_results_in_run=True)
    return {m: 100 * np.array([float(ranx_run.scores[m][q]) for q in query_ids]) for m in metrics}


def encode_retrieval_set(model: Any, data: BeirSet, layers: Sequence[int], *, dim: int | None = None,
                         batch_size: int = 64, chunk_size: int = CORPUS_CHUNK,
                         show_progress_bar: bool | None = None) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray],
                                                                         dict[str, float]]:
    """Pooled query and document vectors at every layer in ``layers`` (one backbone pass per text).

    The corpus goes through :func:`~matryoshka2d.encoder.batching.embed_layers` in chunks of ``chunk_size``
    documents; only the first ``dim`` coordinates of the requested layers are kept.

    Returns:
        ``(queries, docs, info)``: ``{layer: float32 (Q, dim)}``, ``{layer: float32 (N, dim)}`` and
        ``{"bytes_held", "query_encode_s", "doc_encode_s"}``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size!r} must be a positive integer")
    wanted = sorted({model.check_layer(n) for n in layers})
    width = model.hidden_size if dim is None else model.check_dim(dim)
    start = time.perf_counter()
    queries = embed_layers(model, data.query_texts, wanted, dim=width, batch_size=batch_size,
                           show_progress_bar=show_progress_bar, desc=f"{data.name} queries")
    encoded = time.perf_counter()
    docs = {n: np.empty((data.num_docs, width), dtype=np.float32) for n in wanted}
    for first in range(0, data.num_docs, chunk_size):
        chunk = embed_layers(model, data.doc_texts[first:first + chunk_size], wanted, dim=width,
                             batch_size=batch_size, show_progress_bar=show_progress_bar,
                             desc=f"{data.name} corpus {first // chunk_size + 1}")
        for n, arr in chunk.items():
            docs[n][first:first + len(arr)] = arr
    held = sum(a.nbytes for a in queries.values()) + sum(a.nbytes for a in docs.values())
    info = {"bytes_held": int(held), "query_encode_s": round(encoded - start, 4),
            "doc_encode_s": round(time.perf_counter() - encoded, 4)}
    logger.info("%s: %d queries and %d documents at %d layer(s) x %d dims: %.1f MB held", data.name,
                len(queries[wanted[0]]), data.num_docs, len(wanted), width, held / 2**20)
    return queries, docs, info


def evaluate_retrieval(model: Any, sets: Mapping[str, BeirSet] | Sequence[BeirSet] | BeirSet, *,
                       layers: Sequence[int] | None = None, dims: Sequence[int] | None = None,
                       metrics: Sequence[str] = RETRIEVAL_METRICS, asymmetric_dims: Sequence[int] | None = None,
                       batch_size: int = 64, chunk_size: int = CORPUS_CHUNK, show_progress_bar: bool | None = None,
                       model_name: str | None = None, ignore_identical_ids: bool = True) -> RetrievalResult:
    """Retrieval metrics (x100) of every exit ``(layer, dim)`` on every set, from one encoding per set.

    Args:
        model: a :class:`~matryoshka2d.encoder.model.MatryoshkaEncoder`.
        sets: ``{name: BeirSet}`` or a sequence of BeirSets (keyed by their ``name``).
        layers: exits in ``1..N``; ``None`` means all.
        dims: widths in ``1..D``; ``None`` means :func:`~matryoshka2d.encoder.model.matryoshka_dims`.
        metrics: ranx metric names; the first is the headline (default nDCG@10).
        asymmetric_dims: also score queries at every layer against documents at every layer, at these dims
            (each must be in ``dims``); ``None`` skips it.
        batch_size: texts per forward pass.
        chunk_size: documents per encoding chunk.
        show_progress_bar: ``None`` shows bars for long inputs when logging is at INFO.
        model_name: name stored in the result (default: the model's source).
        ignore_identical_ids: leave a document whose id equals the query's id out of its ranking (BEIR's and
            MTEB's default).

    Returns:
        The grid (task ``"retrieval"``) with per-query scores (for
        :func:`~matryoshka2d.evaluation.compare.compare_results`).

    Raises:
        ValueError: empty sets, a layer / dim / metric out of range.
        ImportError: ranx is not installed.
    """
    _ranx()
    items = named_sets(sets, BeirSet, "matryoshka2d.data.beir.load_beir", "{'scifact': load_beir('scifact')}")
    layers, dims = grid_exits(model, layers, dims)
    metrics = list(dict.fromkeys(metrics))
    depth = search_depth(metrics)
    asym = sorted({model.check_dim(d) for d in asymmetric_dims}) if asymmetric_dims else []
    if any(d not in dims for d in asym):
        raise ValueError(f"asymmetric dims {asym} must be among the evaluated dims {dims}")
    records: list[dict[str, Any]] = []
    asym_records: list[dict[str, Any]] = []
    per_query: dict[str, np.ndarray] = {}
    query_ids: dict[str, list[str]] = {}
    timings: dict[str, dict[str, Any]] = {}
    for name, data in items.items():
        q_vecs, d_vecs, info = encode_retrieval_set(model, data, layers, dim=max(dims), batch_size=batch_size,
                                                    chunk_size=chunk_size, show_progress_bar=show_progress_bar)
        start = time.perf_counter()
        self_rows = identical_rows(data, ignore_identical_ids)
        identical = int((self_rows >= 0).sum())
        table = np.empty((len(metrics), len(layers), len(dims), len(data)), dtype=np.float32)
        for j, d in enumerate(dims):
            docs_d = {n: truncate(d_vecs[n], d) for n in layers}
            queries_d = {n: truncate(q_vecs[n], d) for n in layers}
            for i, n in enumerate(layers):
                pairs = [(n, m) for m in layers] if d in asym else [(n, n)]
                for qn, dn in pairs:
                    ranking = rank(queries_d[qn], docs_d[dn], depth, self_rows)
                    scores = run_metrics(data.qrels, data.query_ids, data.doc_ids, ranking, metrics)
                    row = {m: float(np.mean(v)) for m, v in scores.items()}
                    if d in asym:
                        asym_records.append({"set": name, "query_layer": qn, "doc_layer": dn, "dim": d, **row,
                                             "n": len(data)})
                    if qn == dn:
                        table[:, i, j] = np.stack([scores[m] for m in metrics])
                        records.append({"set": name, "layer": n, "dim": d, **row, "n": len(data)})
        per_query[name] = table
        query_ids[name] = list(data.query_ids)
        timings[name] = {"queries": len(data), "docs": data.num_docs, **info,
                         "score_s": round(time.perf_counter() - start, 4),
                         "missing_docs": len(data.missing_docs), "dropped_queries": len(data.dropped_queries),
                         "identical_ids": identical}
        logger.info("%s: %d queries over %d documents, %d exits scored in %.1fs", name, len(data), data.num_docs,
                    len(layers) * len(dims), time.perf_counter() - start)
    meta = {"layers": layers, "dims": dims, "metrics": metrics, "batch_size": batch_size,
            "pooling": getattr(model, "pooling", None), "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "max_seq_length": getattr(model, "max_seq_length", None),
            "split": {name: s.split for name, s in items.items()}, "timings": timings,
            "ignore_identical_ids": bool(ignore_identical_ids)}
    return RetrievalResult(model_label(model, model_name), records, metrics, per_query, query_ids, meta, asym_records)
