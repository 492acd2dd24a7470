"""The retrieval result's names, importable from here as before every task shared one result type.

A retrieval result is a :class:`~matryoshka2d.evaluation.result.GridResult` of task ``"retrieval"``;
:mod:`matryoshka2d.evaluation.result` is its home.
"""

from __future__ import annotations

from matryoshka2d.evaluation.result import (
    HEADLINE_METRIC,
    RETRIEVAL_METRICS,
    RetrievalResult,
    load_result,
    metric_label,
    result_kind,
)

__all__ = ["HEADLINE_METRIC", "RETRIEVAL_METRICS", "RetrievalResult", "load_result", "metric_label", "result_kind"]
