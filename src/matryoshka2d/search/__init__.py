"""Vector search on the exits: a cascade index on faiss (narrow shortlist + wide rerank) and its search."""

from __future__ import annotations

from matryoshka2d.search.cascade import cascade_search, encode_queries, write_run
from matryoshka2d.search.index import INDEX_TYPES, CascadeIndex, build_faiss

__all__ = ["INDEX_TYPES", "CascadeIndex", "build_faiss", "cascade_search", "encode_queries", "write_run"]
