"""Cascade search: a shortlist of ``k`` documents at a narrow dim, reranked at a wider dim, top ``N`` kept.

Queries can come from any exit (``query_layer``), e.g. a shallow one for latency against an index of
documents encoded once at the full exit. Rerank scores are exact inner products of normalised prefixes;
equal scores are ordered by document row (lower first), so with ``k`` = the corpus size the cascade
equals exact search at the rerank dim. Runs are written as TREC run files (``.trec`` / ``.txt``:
``qid Q0 docid rank score tag``) or JSONL (``{"query_id", "results": [{"doc_id", "rank", "score"}]}``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.search.index import CascadeIndex
from matryoshka2d.truncation import truncate

logger = logging.getLogger(__name__)

RUN_SUFFIXES = (".trec", ".txt", ".run", ".jsonl")


def set_search_params(index: Any, k: int, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
    """Query-time parameters of an HNSW (``efSearch >= k``) or IVF (``nprobe``) faiss index; flat ignores them."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(int(ef_search or 0), int(k), 16)
    if hasattr(index, "nprobe"):
        index.nprobe = int(nprobe or max(1, index.nlist // 8))


def _rerank(vectors: np.ndarray, queries: np.ndarray, shortlist: np.ndarray, top: int) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    out_s = np.full((len(queries), top), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), top), -1, dtype=np.int64)
    for r, (q, cand) in enumerate(zip(queries, shortlist, strict=True)):
        cand = np.unique(cand[cand >= 0])  # sorted rows: ties keep the lower row first below
        sub = np.asarray(vectors[cand], dtype=np.float32)
        if sub.shape[1] != q.shape[0]:
            sub = truncate(sub, q.shape[0])
        scores = sub @ q
        order = np.lexsort((cand, -scores))[:top]
        out_s[r, :len(order)], out_i[r, :len(order)] = scores[order], cand[order]
    return out_s, out_i


def cascade_search(index: CascadeIndex, query_vectors: np.ndarray, *, shortlist_dim: int, k: int = 100,
                   rerank_dim: int | None = None, top: int = 10, ef_search: int | None = None,
                   nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shortlist ``k`` documents per query at ``shortlist_dim``, rerank them at ``rerank_dim``, keep ``top``.

    Args:
        index: the index (its exit layer need not be the queries').
        query_vectors: raw pooled query vectors ``(Q, >= max(shortlist_dim, rerank_dim))``.
        shortlist_dim: a dim stored in the index; the full dim of a flat index means exhaustive exact search
            over the rerank vectors (a non-flat index searches its own full-dim shortlist index).
        k: shortlist size (capped at the corpus size); ignored without a rerank.
        rerank_dim: ``None`` / ``0`` = no rerank (the shortlist order is final); else a dim in
            ``shortlist_dim..D``.
        top: results kept per query (``<= k`` with a rerank).
        ef_search: HNSW search breadth (default ``max(k, 16)``); nprobe: IVF clusters probed.

    Returns:
        ``(scores, rows)`` of shape ``(Q, top)``, best first; ``rows`` index :attr:`CascadeIndex.ids`
        (``-1`` where an approximate index returned fewer results).

    Raises:
        ValueError: a dim not in the index, dims out of order, or ``k`` / ``top`` out of range.
    """
    shortlist_dim = index.check_shortlist(shortlist_dim)
    n, full = len(index), index.full_dim
    for name, value in (("k", k), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} {value!r} must be a positive integer")
    rerank = int(rerank_dim or 0)
    if rerank and not shortlist_dim <= rerank <= full:
        raise ValueError(f"rerank dim {rerank} must be in {shortlist_dim}..{full} (shortlist dim .. the index's "
                         f"full dim), or 0 for no rerank")
    if rerank and top > k:
        raise ValueError(f"top {top} must be <= k {k}: the rerank only reorders the shortlist")
    width = max(shortlist_dim, rerank)
    if query_vectors.ndim != 2 or query_vectors.shape[1] < width:
        raise ValueError(f"query vectors {query_vectors.shape} must be 2-D with at least {width} columns")
    top, k = min(int(top), n), min(int(k), n)
    depth = k if rerank else top
    short_q = truncate(query_vectors, shortlist_dim)
    exhaustive = shortlist_dim not in index.shortlists  # the full dim of a flat index
    if exhaustive:
        searcher = index.full_index()
    else:
        searcher = index.shortlists[shortlist_dim]
        set_search_params(searcher, depth, ef_search=ef_search, nprobe=nprobe)
    scores, rows = searcher.search(short_q, depth)
    if exhaustive:  # exact scores, ties by row
        return _rerank(index.vectors, short_q, rows, top)
    if not rerank:
        return scores[:, :top], rows[:, :top]
    return _rerank(index.vectors, truncate(query_vectors, rerank), rows, top)


def encode_queries(model: Any, texts: Sequence[str], layer: int, *, dim: int | None = None,
                   batch_size: int = 64, show_progress_bar: bool | None = None,
                   input_type: str = "query") -> np.ndarray:
    """Raw pooled query vectors at exit ``layer`` (first ``dim`` coordinates; all by default); ``input_type``
    ``"query"`` takes the exit's own query path where it has one (m2d align)."""
    from matryoshka2d.encoder.batching import embed_layers

    layer = model.check_layer(layer)
    return embed_layers(model, list(texts), [layer], dim=dim, batch_size=batch_size,
                        show_progress_bar=show_progress_bar, desc="queries", input_type=input_type)[layer]


def write_run(path: str | os.PathLike[str], query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
              rows: np.ndarray, *, tag: str = "m2d") -> Path:
    """Write a TREC run file (``.trec`` / ``.txt`` / ``.run``) or JSONL (``.jsonl``) atomically.

    Raises:
        ValueError: an unknown suffix, a tag with whitespace, or (TREC) a query or document id that is empty
            or holds whitespace (TREC splits on whitespace, so it would shift the fields): the row is named.
    """
    from matryoshka2d.io.atomic import atomic_write_text

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in RUN_SUFFIXES:
        raise ValueError(f"{path}: unknown run format {suffix!r}; use one of {list(RUN_SUFFIXES)}")
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag {tag!r} must be one word")
    lines = []
    for row, (qid, s_row, i_row) in enumerate(zip(query_ids, scores, rows, strict=True), 1):
        hits = [(doc_ids[i], float(s)) for s, i in zip(s_row, i_row, strict=True) if i >= 0]
        if suffix != ".jsonl":
            named = [("query id", qid, f"query {row}"), *(("document id", doc_ids[i], f"index row {i + 1}")
                                                          for i in i_row if i >= 0)]
            for what, value, where in named:
                if not value or any(c.isspace() for c in value):
                    raise ValueError(f"{what} {value!r} ({where}) is empty or holds whitespace, which a TREC run "
                                     f"file cannot carry; write JSONL instead (--output {path.with_suffix('.jsonl')})")
        if suffix == ".jsonl":
            lines.append(json.dumps({"query_id": qid, "results": [{"doc_id": d, "rank": r, "score": s}
                                                                  for r, (d, s) in enumerate(hits, 1)]}))
        else:
            lines += [f"{qid} Q0 {d} {r} {s:.6f} {tag}" for r, (d, s) in enumerate(hits, 1)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
