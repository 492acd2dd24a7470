"""The result of a retrieval grid: metrics x100 per (set, layer, dim), per-query scores, asymmetric exits.

It has the shapes of the STS :class:`~matryoshka2d.evaluation.grid.GridResult` (``score`` / ``table`` /
``to_markdown`` / ``to_csv`` / ``save`` / ``load``, so :func:`~matryoshka2d.evaluation.plots.plot_heatmaps`
draws it), with the metric named: ``results`` rows carry one key per metric (``ndcg@10``, ...). The JSON
has ``"kind": "retrieval"``; per-query scores go to a ``<stem>.preds.npz`` sidecar for the paired
bootstrap over queries.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.evaluation.grid import read_result_json, read_sidecar, write_sidecar

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "retrieval"
RETRIEVAL_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")
HEADLINE_METRIC = "ndcg@10"
_PRETTY = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP", "precision": "P"}


def metric_label(metric: str) -> str:
    """``"ndcg@10"`` -> ``"nDCG@10 x100"``."""
    name, _, cut = metric.partition("@")
    return f"{_PRETTY.get(name, name)}{'@' + cut if cut else ''} x100"


@dataclass
class RetrievalResult:
    """Retrieval metrics of every (set, layer, dim) exit plus the per-query scores behind them.

    Attributes:
        model: name of the evaluated model.
        records: ``{"set", "layer", "dim", <metric>..., "n"}`` dicts (``n`` = evaluated queries).
        metrics: metric names; the first is the headline.
        per_query: ``{set: float32 (len(metrics), len(layers), len(dims), n_queries)}``.
        query_ids: ``{set: ids in per_query order}``.
        metadata: layers, dims, timings, bytes held, ...
        asymmetric: ``{"set", "query_layer", "doc_layer", "dim", <metric>..., "n"}`` dicts.
    """

    model: str
    records: list[dict[str, Any]]
    metrics: list[str] = field(default_factory=lambda: list(RETRIEVAL_METRICS))
    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    query_ids: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    asymmetric: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = list(self.metrics)
        self._index = {(r["set"], int(r["layer"]), int(r["dim"])): r for r in self.records}

    kind = KIND

    @property
    def metric(self) -> str:
        """The headline metric."""
        return self.metrics[0]

    @property
    def sets(self) -> list[str]:
        return list(dict.fromkeys(r["set"] for r in self.records))

    @property
    def layers(self) -> list[int]:
        return sorted({int(r["layer"]) for r in self.records})

    @property
    def dims(self) -> list[int]:
        return sorted({int(r["dim"]) for r in self.records})

    def _check_metric(self, metric: str | None) -> str:
        metric = metric or self.metric
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} is not in this result; it has {self.metrics}")
        return metric

    def score(self, set_name: str, layer: int, dim: int, metric: str | None = None) -> float:
        """One metric x100 (the headline by default).

        Raises:
            KeyError: no such exit or metric in this result.
        """
        metric = self._check_metric(metric)
        key = (set_name, int(layer), int(dim))
        if key not in self._index:
            raise KeyError(f"no result for set {set_name!r} layer {layer} dim {dim}; this result has sets "
                           f"{self.sets}, layers {self.layers}, dims {self.dims}")
        return float(self._index[key][metric])

    def has_average(self) -> bool:
        """Always ``False``: the STS 7-set average does not apply (kept for the plotting helpers)."""
        return False

    def n_pairs(self, set_name: str) -> int:
        """Number of evaluated queries of one set (named like GridResult's for the shared plot code)."""
        return int(next(r["n"] for r in self.records if r["set"] == set_name))

    n_queries = n_pairs

    def query_scores(self, set_name: str, layer: int, dim: int, metric: str | None = None) -> np.ndarray:
        """Per-query values x100 of one exit (in :attr:`query_ids` order)."""
        metric = self._check_metric(metric)
        table = self.per_query[set_name]
        return table[self.metrics.index(metric), self.layers.index(int(layer)), self.dims.index(int(dim))]

    def table(self, set_name: str, metric: str | None = None) -> np.ndarray:
        """``(len(layers), len(dims))`` array of one set's metric."""
        return np.array([[self.score(set_name, n, d, metric) for d in self.dims] for n in self.layers])

    def asymmetric_table(self, set_name: str, dim: int, metric: str | None = None) -> tuple[list[int], list[int],
                                                                                            np.ndarray]:
        """``(query_layers, doc_layers, matrix)`` of one set at one dim (rows: query layer).

        Raises:
            KeyError: no asymmetric scores for that set and dim.
        """
        metric = self._check_metric(metric)
        rows = [r for r in self.asymmetric if r["set"] == set_name and int(r["dim"]) == int(dim)]
        if not rows:
            raise KeyError(f"no asymmetric scores for set {set_name!r} dim {dim}; evaluate with "
                           f"asymmetric_dims=[{dim}] (m2d eval --asymmetric {dim})")
        ql = sorted({int(r["query_layer"]) for r in rows})
        dl = sorted({int(r["doc_layer"]) for r in rows})
        matrix = np.full((len(ql), len(dl)), math.nan)
        for r in rows:
            matrix[ql.index(int(r["query_layer"])), dl.index(int(r["doc_layer"]))] = r[metric]
        return ql, dl, matrix

    @property
    def asymmetric_dims(self) -> list[int]:
        return sorted({int(r["dim"]) for r in self.asymmetric})

    def merged(self, other: RetrievalResult) -> RetrievalResult:
        """This result plus ``other``'s sets (same layers, dims and metrics; a set in both keeps this one's).

        Raises:
            ValueError: the two grids have different layers, dims or metrics.
        """
        if (other.layers, other.dims, other.metrics) != (self.layers, self.dims, self.metrics):
            raise ValueError(f"cannot merge retrieval grids with layers/dims/metrics {self.layers}/{self.dims}/"
                             f"{self.metrics} and {other.layers}/{other.dims}/{other.metrics}; evaluate both "
                             "with the same layers, dims and metrics")
        new = [s for s in other.sets if s not in self.sets]
        timings = {**(other.metadata.get("timings") or {}), **(self.metadata.get("timings") or {})}
        meta = {**other.metadata, **self.metadata, **({"timings": timings} if timings else {})}
        return RetrievalResult(
            self.model, [*self.records, *(r for r in other.records if r["set"] in new)], self.metrics,
            {**{s: other.per_query[s] for s in new if s in other.per_query}, **self.per_query},
            {**{s: other.query_ids[s] for s in new if s in other.query_ids}, **self.query_ids}, meta,
            [*self.asymmetric, *(r for r in other.asymmetric if r["set"] in new)])

    # ----------------------------------------------------------------------------------- views
    def to_dict(self) -> dict[str, Any]:
        """``{"format_version", "kind", "model", "metric", "metrics", "metadata", "results", "asymmetric"}``."""
        return {"format_version": FORMAT_VERSION, "kind": KIND, "model": self.model, "metric": self.metric,
                "metrics": self.metrics, "metadata": self.metadata, "results": self.records,
                "asymmetric": self.asymmetric}

    def to_markdown(self, metric: str | None = None, sets: Sequence[str] | None = None) -> str:
        """A layer x dim table per set, plus each asymmetric query-layer x doc-layer matrix."""
        metric = self._check_metric(metric)
        blocks = []
        for name in (list(sets) if sets is not None else self.sets):
            title = f"### {self.model} — {name} ({metric_label(metric)}, n={self.n_pairs(name)} queries)"
            header = "| layer \\ dim | " + " | ".join(str(d) for d in self.dims) + " |"
            rule = "|---:|" + "---:|" * len(self.dims)
            rows = [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                    for n, row in zip(self.layers, self.table(name, metric), strict=True)]
            blocks.append("\n".join([title, "", header, rule, *rows]))
            for d in self.asymmetric_dims:
                ql, dl, matrix = self.asymmetric_table(name, d, metric)
                title = (f"### {self.model} — {name}, asymmetric exits at dim {d} ({metric_label(metric)}; "
                         f"rows: query layer, columns: document layer)")
                header = "| query \\ doc | " + " | ".join(str(n) for n in dl) + " |"
                rule = "|---:|" + "---:|" * len(dl)
                rows = [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                        for n, row in zip(ql, matrix, strict=True)]
                blocks.append("\n".join([title, "", header, rule, *rows]))
        return "\n\n".join(blocks) + "\n"

    def to_csv(self) -> str:
        """``set,layer,dim,<metrics>,n`` rows."""
        lines = [",".join(["set", "layer", "dim", *self.metrics, "n"])]
        for r in self.records:
            values = ",".join(f"{r[m]:.4f}" for m in self.metrics)
            lines.append(f"{r['set']},{r['layer']},{r['dim']},{values},{r['n']}")
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (JSON) and, with per-query scores held, ``<stem>.preds.npz`` beside it, atomically."""
        from matryoshka2d.io.atomic import atomic_write_json

        path = Path(path)
        obj = self.to_dict()
        if self.per_query:
            arrays: dict[str, np.ndarray] = {"layers": np.asarray(self.layers), "dims": np.asarray(self.dims)}
            for i, name in enumerate(self.sets):
                arrays[f"scores_{i}"] = self.per_query[name]
                arrays[f"queries_{i}"] = np.asarray(self.query_ids[name], dtype=str)
            obj["predictions"] = write_sidecar(path, arrays, self.sets)
        atomic_write_json(path, obj)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RetrievalResult:
        """Read a result written by :meth:`save` (per-query scores too, when the sidecar is present).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a retrieval result, or a newer format.
        """
        path = Path(path)
        obj = read_result_json(path)
        if not isinstance(obj, dict) or obj.get("kind") != KIND or not isinstance(obj.get("results"), list):
            raise ValueError(f"{path}: not a retrieval result (needs 'kind': 'retrieval' and 'results')")
        if obj.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"{path}: result format_version {obj['format_version']} is newer than this "
                             f"library's {FORMAT_VERSION}; upgrade matryoshka2d")
        result = cls(str(obj["model"]), obj["results"], obj.get("metrics") or list(RETRIEVAL_METRICS),
                     metadata=obj.get("metadata") or {}, asymmetric=obj.get("asymmetric") or [])
        info = obj.get("predictions")
        z = read_sidecar(path, info) if info else None
        if z is not None:
            sidecar = path.with_name(info["file"])
            try:
                if z["layers"].tolist() != result.layers or z["dims"].tolist() != result.dims:
                    raise ValueError(f"{sidecar}: layers/dims do not match {path}; re-run m2d eval")
                for i, name in enumerate(info["sets"]):
                    result.per_query[name] = z[f"scores_{i}"]
                    result.query_ids[name] = z[f"queries_{i}"].tolist()
            except KeyError as e:
                raise ValueError(f"{sidecar}: array {e} is missing; re-run m2d eval") from None
        return result


def result_kind(path: str | os.PathLike[str]) -> str:
    """``"retrieval"`` or ``"sts"``: which result class reads the JSON at ``path`` (``"sts"`` if unsure)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "sts"
    return KIND if isinstance(obj, dict) and obj.get("kind") == KIND else "sts"


def load_result(path: str | os.PathLike[str]) -> Any:
    """The result at ``path``, STS (:class:`~matryoshka2d.evaluation.grid.GridResult`) or retrieval
    (:class:`RetrievalResult`), whichever its JSON holds, with its per-pair / per-query sidecar."""
    from matryoshka2d.evaluation.grid import GridResult

    return RetrievalResult.load(path) if result_kind(path) == KIND else GridResult.load(path)
