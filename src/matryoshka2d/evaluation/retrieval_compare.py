"""The retrieval comparison's names, importable from here as before one compare served every task.

:func:`~matryoshka2d.evaluation.compare.compare_results` compares results of any task, with a paired bootstrap
over their units (queries, for retrieval); :mod:`matryoshka2d.evaluation.compare` is its home.
"""

from __future__ import annotations

from matryoshka2d.evaluation.compare import (
    RetrievalComparison,
    compare_retrieval,
    query_resamples,
    set_resamples,
)

__all__ = ["RetrievalComparison", "compare_retrieval", "query_resamples", "set_resamples"]
