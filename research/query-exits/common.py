"""What posthoc.py and trained.py share: the unlabelled texts of a folder, and one grid stitched from per-layer
grids (a standalone encoder per depth, or one evaluation per symmetric exit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.data.datasets import read_sentences
from matryoshka2d.evaluation.retrieval_result import RetrievalResult
from matryoshka2d.training.align import unlabelled_texts


def read_texts(folder: Path) -> list[str]:
    """Every ``*.txt`` of ``folder`` (sorted by name), one text per line, blank and repeated lines dropped."""
    return unlabelled_texts([t for f in sorted(folder.glob("*.txt")) for t in read_sentences(f)])[0]


def stitch_layers(parts: dict[int, RetrievalResult], name: str, doc_layer: Any) -> RetrievalResult:
    """One grid from grids of one layer each (``{layer: result}``); ``doc_layer`` is what the metadata says."""
    layers = sorted(parts)
    first = parts[layers[0]]
    per_query = {s: np.concatenate([parts[n].per_query[s] for n in layers], axis=1) for s in first.per_query}
    return RetrievalResult(name, [r for n in layers for r in parts[n].records], first.metrics, per_query,
                           first.query_ids, {**first.metadata, "layers": layers, "doc_layer": doc_layer})
