"""The result of every evaluation over the layer x dim grid: one type, one file format, for any task.

Every grid we compute is sets x layers x dims of a few metrics (x100), with the per-unit values behind each
cell, so that two results can be compared by a paired bootstrap over the units. A task (a row of
:data:`TASKS`) says what its units are:

- ``"sts"``: sentence pairs. The per-unit values are the cosine of every pair at every exit (``(layers, dims,
  n)``), the units' labels are the gold scores; Spearman and Pearson are correlations over the pairs.
- ``"retrieval"``: queries. The per-unit values are every query's metric at every exit (``(metrics, layers,
  dims, n)``), the units' labels are the query ids; a metric is the mean over the queries.

:class:`GridResult` holds any of them (``task`` says which); :class:`RetrievalResult` is the same type built
with the retrieval names (per-query scores, query ids). ``save`` writes the JSON (``"kind"`` names the task;
a file without it is STS, as written before retrieval existed) and the per-unit arrays to a ``<stem>.preds.npz``
sidecar whose SHA-256 the JSON records (:mod:`~matryoshka2d.evaluation.sidecar`); ``load`` reads both back and
checks them against each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from matryoshka2d.data.datasets import STS_SETS
from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.evaluation.sidecar import read_sidecar, write_sidecar
from matryoshka2d.vocab import METRICS, EvalTask

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
AVG = "avg"
RETRIEVAL_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")
HEADLINE_METRIC = "ndcg@10"
_PRETTY = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP", "precision": "P", "spearman": "Spearman",
           "pearson": "Pearson"}


@dataclass(frozen=True)
class Task:
    """What one task's units are, and how its per-unit arrays are named and checked.

    Attributes:
        name: the task, as the result JSON's ``"kind"`` names it.
        metrics: its default metrics; the first is the headline.
        unit: one unit, singular (``"pair"``, ``"query"``).
        units: the plural (``"pairs"``, ``"queries"``).
        values: what the per-unit values are (``"predictions"``), and the sidecar's array prefix (``"pred"``).
        labels: what the units' labels are (``"gold scores"``), and the sidecar's array prefix (``"gold"``).
        count: how a table title counts a set's units (``"n={n}"``).
        per_metric: whether the per-unit values hold one array per metric (a leading metric axis).
        label_kinds: numpy dtype kinds the labels may have (``"iuf"`` numbers, ``"U"`` strings).
        common_exits: ``compare`` runs on the sets, layers and dims every result has (and names the rest)
            instead of refusing results that differ.
    """

    name: EvalTask
    metrics: tuple[str, ...]
    unit: str
    units: str
    values: tuple[str, str]
    labels: tuple[str, str]
    count: str
    per_metric: bool
    label_kinds: str
    common_exits: bool


TASKS: dict[str, Task] = {
    "sts": Task("sts", METRICS, "pair", "pairs", ("predictions", "pred"), ("gold scores", "gold"), "n={n}",
                per_metric=False, label_kinds="iuf", common_exits=False),
    "retrieval": Task("retrieval", RETRIEVAL_METRICS, "query", "queries", ("scores", "scores"), ("queries", "queries"),
                      "n={n} queries", per_metric=True, label_kinds="U", common_exits=True),
}


def metric_label(metric: str) -> str:
    """``"ndcg@10"`` -> ``"nDCG@10 x100"``; ``"spearman"`` -> ``"Spearman x100"``."""
    name, _, cut = metric.partition("@")
    return f"{_PRETTY.get(name, name)}{'@' + cut if cut else ''} x100"


@dataclass
class GridResult:
    """Metrics x100 of every (set, layer, dim) exit of one task, plus the per-unit values behind them.

    Attributes:
        model: name of the evaluated model.
        records: ``{"set", "layer", "dim", <metric>..., "n"}`` dicts (``n``: the set's units).
        predictions: ``{set: float array}``, the per-unit values: ``(len(layers), len(dims), n)`` cosines (STS) or
            ``(len(metrics), len(layers), len(dims), n)`` metric values (retrieval).
        units: ``{set: labels of its n units}``: the gold scores (STS, a float array) or the query ids (retrieval,
            a list of str). Two results compare only where these agree.
        metadata: layers, dims, split, timings, ...
        task: ``"sts"`` or ``"retrieval"`` (a row of :data:`TASKS`).
        metrics: metric names, the headline first (empty: the task's).
        asymmetric: retrieval's ``{"set", "query_layer", "doc_layer", "dim", <metric>..., "n"}`` dicts.
    """

    model: str
    records: list[dict[str, Any]]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    units: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    task: EvalTask = "sts"
    metrics: list[str] = field(default_factory=list)
    asymmetric: list[dict[str, Any]] = field(default_factory=list)
    task_name: ClassVar[str] = "evaluation"  # what load calls a result of this class in its errors

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {list(TASKS)}")
        self.metrics = list(self.metrics or TASKS[self.task].metrics)
        self._index = {(r["set"], int(r["layer"]), int(r["dim"])): r for r in self.records}

    @classmethod
    def of_task(cls, task: str, model: str, records: list[dict[str, Any]], **fields: Any) -> GridResult:
        """A result of ``task`` as the class that holds that task's results (:class:`RetrievalResult` for
        ``"retrieval"``), from the fields of :class:`GridResult`."""
        result = GridResult.__new__(RESULT_TYPES.get(task, GridResult))
        GridResult.__init__(result, model, records, task=task, **fields)  # type: ignore[arg-type]
        return result

    @property
    def spec(self) -> Task:
        """The task's row of :data:`TASKS`."""
        return TASKS[self.task]

    @property
    def metric(self) -> str:
        """The headline metric."""
        return self.metrics[0]

    @property
    def gold(self) -> dict[str, Any]:
        """``units`` under its STS name: the gold scores of each set's pairs."""
        return self.units

    @property
    def sets(self) -> list[str]:
        return list(dict.fromkeys(r["set"] for r in self.records))

    @property
    def layers(self) -> list[int]:
        return sorted({int(r["layer"]) for r in self.records})

    @property
    def dims(self) -> list[int]:
        return sorted({int(r["dim"]) for r in self.records})

    @property
    def asymmetric_dims(self) -> list[int]:
        return sorted({int(r["dim"]) for r in self.asymmetric})

    def check_metric(self, metric: str | None) -> str:
        """``metric`` (the headline when ``None``), if this result has it.

        Raises:
            KeyError: a metric this result does not hold.
        """
        metric = metric or self.metric
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} is not in this result; it has {self.metrics}")
        return metric

    def score(self, set_name: str, layer: int, dim: int, metric: str | None = None) -> float:
        """One metric x100 (the headline by default); an STS ``set_name`` may be ``"avg"`` (the seven sets).

        Raises:
            KeyError: no such exit or metric in this result.
        """
        metric = self.check_metric(metric)
        if set_name == AVG:
            return self.average(metric)[(layer, dim)]
        key = (set_name, int(layer), int(dim))
        if key not in self._index:
            raise KeyError(f"no result for set {set_name!r} layer {layer} dim {dim}; this result has sets "
                           f"{self.sets}, layers {self.layers}, dims {self.dims}")
        return float(self._index[key][metric])

    def spearman(self, set_name: str, layer: int, dim: int) -> float:
        return self.score(set_name, layer, dim, "spearman")

    def pearson(self, set_name: str, layer: int, dim: int) -> float:
        return self.score(set_name, layer, dim, "pearson")

    def n_units(self, set_name: str) -> int:
        """Number of units (pairs or queries) of one set."""
        return int(next(r["n"] for r in self.records if r["set"] == set_name))

    n_pairs = n_units  # the STS name, which the plots use for either task

    def unit_values(self, set_name: str, layer: int, dim: int, metric: str | None = None) -> np.ndarray:
        """The per-unit values of one exit: the pairs' cosines (STS, any metric) or the queries' ``metric``."""
        metric = self.check_metric(metric)
        values = self.predictions[set_name]
        if self.spec.per_metric:
            values = values[self.metrics.index(metric)]
        return values[self.layers.index(int(layer)), self.dims.index(int(dim))]

    def has_average(self) -> bool:
        """Whether the usual average over the seven STS test sets is defined (an STS result holding all seven)."""
        return self.task == "sts" and set(STS_SETS) <= set(self.sets)

    def average(self, metric: str | None = None, sets: Sequence[str] = STS_SETS) -> dict[tuple[int, int], float]:
        """Mean over ``sets`` of each exit's ``metric``: ``{(layer, dim): value}``.

        Undefined values (``nan``: an STS set with fewer than 2 distinct gold scores, or constant predictions)
        are left out of the mean, which is then over the other sets (``evaluate_grid`` warns about such sets).

        Raises:
            ValueError: a set is missing.
        """
        missing = [s for s in sets if s not in self.sets]
        if missing:
            raise ValueError(f"cannot average: sets {missing} are not in this result (it has {self.sets})")
        out = {}
        for n in self.layers:
            for d in self.dims:
                values = [v for v in (self.score(s, n, d, metric) for s in sets) if not math.isnan(v)]
                out[(n, d)] = float(np.mean(values)) if values else math.nan
        return out

    def average_records(self) -> list[dict[str, Any]]:
        """``"avg"`` rows (over the seven STS sets), or ``[]`` when that average is not defined."""
        if not self.has_average():
            return []
        means = {m: self.average(m) for m in self.metrics}
        return [{"set": AVG, "layer": n, "dim": d, **{m: means[m][(n, d)] for m in self.metrics}, "n": len(STS_SETS)}
                for n, d in means[self.metric]]

    def asymmetric_table(self, set_name: str, dim: int, metric: str | None = None) -> tuple[list[int], list[int],
                                                                                            np.ndarray]:
        """``(query_layers, doc_layers, matrix)`` of one retrieval set at one dim (rows: query layer).

        Raises:
            KeyError: no asymmetric scores for that set and dim.
        """
        metric = self.check_metric(metric)
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

    def merged(self, other: GridResult) -> GridResult:
        """This result plus ``other``'s sets (same task, layers, dims and metrics; a set in both keeps this one's).

        Raises:
            ValueError: the two grids differ in task, layers, dims or metrics.
        """
        mine, theirs = (self.layers, self.dims, self.metrics), (other.layers, other.dims, other.metrics)
        if (self.task, mine) != (other.task, theirs):
            raise ValueError(f"cannot merge grids with layers/dims/metrics {'/'.join(map(str, mine))} ({self.task}) "
                             f"and {'/'.join(map(str, theirs))} ({other.task}); evaluate both with the same task, "
                             "layers, dims and metrics")
        new = [s for s in other.sets if s not in self.sets]
        timings = {**(other.metadata.get("timings") or {}), **(self.metadata.get("timings") or {})}
        meta = {**other.metadata, **self.metadata, **({"timings": timings} if timings else {})}
        return GridResult.of_task(
            self.task, self.model, [*self.records, *(r for r in other.records if r["set"] in new)],
            predictions={**{s: other.predictions[s] for s in new if s in other.predictions}, **self.predictions},
            units={**{s: other.units[s] for s in new if s in other.units}, **self.units}, metadata=meta,
            metrics=self.metrics, asymmetric=[*self.asymmetric, *(r for r in other.asymmetric if r["set"] in new)])

    # ----------------------------------------------------------------------------------- views
    def to_dict(self) -> dict[str, Any]:
        """``{"format_version", "kind", "model", "metric", "metrics", "metadata", "results", "average",
        "asymmetric"}`` (NaN becomes None)."""
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                 for r in self.records]
        return {"format_version": FORMAT_VERSION, "kind": self.task, "model": self.model, "metric": self.metric,
                "metrics": self.metrics, "metadata": self.metadata, "results": clean,
                "average": self.average_records(), "asymmetric": self.asymmetric}

    def table(self, set_name: str, metric: str | None = None) -> np.ndarray:
        """``(len(layers), len(dims))`` array of one set's metric (``"avg"`` allowed)."""
        return np.array([[self.score(set_name, n, d, metric) for d in self.dims] for n in self.layers])

    def to_markdown(self, metric: str | None = None, sets: Sequence[str] | None = None) -> str:
        """A layer x dim table per set (the seven STS sets' average too, when defined), and each asymmetric
        query-layer x doc-layer matrix."""
        metric = self.check_metric(metric)
        label = metric_label(metric)
        blocks = []
        for name in (list(sets) if sets is not None else self.sets + ([AVG] if self.has_average() else [])):
            count = "7 sets" if name == AVG else self.spec.count.format(n=self.n_units(name))
            blocks.append(markdown_table(f"### {self.model} — {name} ({label}, {count})", "layer \\ dim",
                                         self.dims, self.layers, self.table(name, metric)))
            for d in self.asymmetric_dims if name != AVG else []:
                ql, dl, matrix = self.asymmetric_table(name, d, metric)
                title = (f"### {self.model} — {name}, asymmetric exits at dim {d} ({label}; "
                         f"rows: query layer, columns: document layer)")
                blocks.append(markdown_table(title, "query \\ doc", dl, ql, matrix))
        return "\n\n".join(blocks) + "\n"

    def to_csv(self) -> str:
        """``set,layer,dim,<metrics>,n`` rows (with the STS ``avg`` rows when defined)."""
        lines = [",".join(["set", "layer", "dim", *self.metrics, "n"])]
        for r in [*self.records, *self.average_records()]:
            values = ",".join(f"{_num(r[m]):.4f}" for m in self.metrics)
            lines.append(f"{r['set']},{r['layer']},{r['dim']},{values},{r['n']}")
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (JSON) and, with per-unit values held, ``<stem>.preds.npz`` beside it, atomically."""
        from matryoshka2d.io.atomic import atomic_write_json

        path = Path(path)
        obj = self.to_dict()
        held = [s for s in self.sets if s in self.predictions]
        if held:
            (_, values), (_, labels) = self.spec.values, self.spec.labels
            arrays: dict[str, np.ndarray] = {"layers": np.asarray(self.layers), "dims": np.asarray(self.dims)}
            for i, name in enumerate(held):
                arrays[f"{values}_{i}"], arrays[f"{labels}_{i}"] = self.predictions[name], np.asarray(self.units[name])
            obj["predictions"] = write_sidecar(path, arrays, held)
        atomic_write_json(path, obj)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GridResult:
        """Read a result written by :meth:`save` (per-unit values too, when the sidecar is present).

        ``GridResult.load`` reads a result of any task; ``RetrievalResult.load`` only a retrieval one.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a result file (of this class's task), a malformed entry, a newer format, or a
                sidecar that does not match the JSON.
        """
        path = Path(path)
        obj = read_result_json(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("results"), list) or "model" not in obj:
            raise ValueError(f"{path}: not an evaluation result (needs keys 'model' and 'results')")
        version = obj.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: result format_version {version} is newer than this library's "
                             f"{FORMAT_VERSION}; upgrade matryoshka2d")
        task = obj.get("kind", "sts")
        if task not in TASKS:
            raise ValueError(f"{path}: result kind {task!r} is not one of {list(TASKS)}; upgrade matryoshka2d")
        if not issubclass(RESULT_TYPES.get(task, GridResult), cls):
            raise ValueError(f"{path}: not a {cls.task_name} result (it holds a {task} grid); read it with "
                             "load_result")
        metrics = obj.get("metrics") or list(TASKS[task].metrics)
        fix = "rewrite it with m2d eval --output"
        if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
            raise ValueError(f"{path}: 'metrics' must be a list of metric names, got {metrics!r}; {fix}")
        try:
            records = [{**r, **{m: _num(r[m]) for m in metrics}, "layer": int(r["layer"]), "dim": int(r["dim"]),
                        "n": int(r["n"])} for r in obj["results"]]
            if not all(isinstance(r["set"], str) for r in records):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: a 'results' entry lacks set/layer/dim/n/{'/'.join(map(str, metrics))} or has "
                             f"a value of the wrong type; {fix}") from None
        info = obj.get("predictions")
        if info is not None and (not isinstance(info, dict) or not isinstance(info.get("file"), str)
                                 or not isinstance(info.get("sets"), list)):
            raise ValueError(f"{path}: 'predictions' must be {{'file': NAME, 'sets': [...]}}; {fix}")
        result = GridResult.of_task(task, str(obj["model"]), records, metadata=obj.get("metadata") or {},
                                    metrics=metrics, asymmetric=obj.get("asymmetric") or [])
        arrays = read_sidecar(path, info) if info else None
        if arrays is not None and info:
            read_predictions(arrays, path.with_name(info["file"]), path, result, list(info["sets"]))
        return result


class RetrievalResult(GridResult):
    """A :class:`GridResult` of the retrieval task, built with the retrieval names.

    Args:
        model: name of the evaluated model.
        records: ``{"set", "layer", "dim", <metric>..., "n"}`` dicts (``n`` = evaluated queries).
        metrics: metric names; the first is the headline.
        per_query: ``{set: float32 (len(metrics), len(layers), len(dims), n_queries)}``.
        query_ids: ``{set: ids in per_query order}``.
        metadata: layers, dims, timings, bytes held, ...
        asymmetric: ``{"set", "query_layer", "doc_layer", "dim", <metric>..., "n"}`` dicts.
    """

    task_name = "retrieval"

    def __init__(self, model: str, records: list[dict[str, Any]], metrics: Sequence[str] = RETRIEVAL_METRICS,
                 per_query: Mapping[str, np.ndarray] | None = None, query_ids: Mapping[str, list[str]] | None = None,
                 metadata: Mapping[str, Any] | None = None, asymmetric: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__(model, records, dict(per_query or {}), dict(query_ids or {}), dict(metadata or {}),
                         "retrieval", list(metrics), list(asymmetric or []))

    @property
    def per_query(self) -> dict[str, np.ndarray]:
        """``predictions`` under its retrieval name: each set's per-query metric values."""
        return self.predictions

    @property
    def query_ids(self) -> dict[str, Any]:
        """``units`` under its retrieval name: each set's query ids, in ``per_query`` order."""
        return self.units

    n_queries = GridResult.n_units

    def query_scores(self, set_name: str, layer: int, dim: int, metric: str | None = None) -> np.ndarray:
        """Per-query values x100 of one exit (in :attr:`query_ids` order)."""
        return self.unit_values(set_name, layer, dim, metric)


RESULT_TYPES: dict[str, type[GridResult]] = {"retrieval": RetrievalResult}


def markdown_table(title: str, corner: str, columns: Sequence[int], rows: Sequence[int], values: np.ndarray) -> str:
    """A titled Markdown table of ``values`` (``.2f``), one row per ``rows`` entry, one column per ``columns``."""
    header = f"| {corner} | " + " | ".join(str(c) for c in columns) + " |"
    rule = "|---:|" + "---:|" * len(columns)
    lines = [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for n, row in zip(rows, values, strict=True)]
    return "\n".join([title, "", header, rule, *lines])


def load_result(path: str | os.PathLike[str]) -> GridResult:
    """The result at ``path``, of whichever task its JSON holds, with its per-unit sidecar."""
    return GridResult.load(path)


def result_kind(path: str | os.PathLike[str]) -> str:
    """``"retrieval"`` or ``"sts"``: the task of the result JSON at ``path`` (``"sts"`` if unsure)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "sts"
    return "retrieval" if isinstance(obj, dict) and obj.get("kind") == "retrieval" else "sts"


def read_result_json(path: Path) -> Any:
    """The parsed JSON of a result file written by ``m2d eval`` (any task).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such result file; write one with `m2d eval ... --output`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON result file ({e})") from None


def read_predictions(z: dict[str, np.ndarray], sidecar: Path, path: Path, result: GridResult,
                     sets: list[str]) -> None:
    """Fill ``result.predictions`` / ``result.units`` from the arrays ``z`` of ``sidecar``, checking each shape.

    Raises:
        ValueError: a missing array, or arrays whose shapes or types do not match the result in ``path``
            (``[metrics x] layers x dims x units`` per set); the message names the file and array.
    """
    fix = f"rewrite both with m2d eval --output {path} --overwrite"
    spec = result.spec
    (_, values), (_, labels) = spec.values, spec.labels
    needed = ["layers", "dims", *(f"{kind}_{i}" for i in range(len(sets)) for kind in (values, labels))]
    missing = [k for k in needed if k not in z]
    if missing:
        raise ValueError(f"{sidecar}: arrays {missing} are missing (it holds {sorted(z)}); {fix}")
    if z["layers"].tolist() != result.layers or z["dims"].tolist() != result.dims:
        raise ValueError(f"{sidecar}: layers/dims {z['layers'].tolist()}/{z['dims'].tolist()} do not match "
                         f"{path} ({result.layers}/{result.dims}); {fix}")
    for i, name in enumerate(sets):
        if name not in result.sets:
            raise ValueError(f"{sidecar}: set {name!r} is not in {path} ({result.sets}); {fix}")
        pred, unit = z[f"{values}_{i}"], z[f"{labels}_{i}"]
        n = result.n_units(name)
        expected = (*((len(result.metrics),) if spec.per_metric else ()), len(result.layers), len(result.dims), n)
        what = f"{values}_{i} / {labels}_{i} ({name})"
        if pred.shape != expected or unit.shape != (n,):
            raise ValueError(f"{sidecar}: {what} have shapes {pred.shape} / {unit.shape}, expected {expected} / "
                             f"({n},); {fix}")
        if not (np.issubdtype(pred.dtype, np.floating) and unit.dtype.kind in spec.label_kinds):
            raise ValueError(f"{sidecar}: {what} are {pred.dtype} / {unit.dtype}, not floats / {spec.labels[0]}; "
                             f"{fix}")
        result.predictions[name] = pred
        result.units[name] = unit.tolist() if unit.dtype.kind == "U" else unit


def named_sets(sets: Any, kind: type[Any], loader: str, example: str) -> dict[str, Any]:
    """The sets a task evaluates, keyed by name: ``sets`` is ``{name: set}``, a sequence of sets of type
    ``kind`` (keyed by their ``name``) or one such set.

    Raises:
        ValueError: an empty ``sets``, an item of another type, or two sets of one name; the message names
            ``loader`` (the function that reads such sets) and ``example`` (a valid argument).
    """
    if isinstance(sets, kind):
        sets = [sets]
    items: dict[str, Any] = {}
    if isinstance(sets, Mapping):
        items = dict(sets)
    else:
        for s in sets:
            if not isinstance(s, kind):
                raise ValueError(f"sets must hold {kind.__name__} (see {loader}), got {type(s).__name__}")
            if s.name in items:
                raise ValueError(f"two sets are named {s.name!r}; give each a unique name")
            items[s.name] = s
    if not items:
        raise ValueError(f"sets is empty; pass e.g. {example}")
    return items


def grid_exits(model: Any, layers: Sequence[int] | None, dims: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """The exits a grid evaluates, checked against ``model``: ``layers`` (``None``: all ``1..N``) and ``dims``
    (``None``: the Matryoshka dims of its width), each sorted without repeats.

    Raises:
        ValueError: a layer or dim out of range.
    """
    layers = sorted({model.check_layer(n) for n in layers}) if layers else list(range(1, model.num_layers + 1))
    dims = sorted({model.check_dim(d) for d in dims}) if dims else matryoshka_dims(model.hidden_size)
    return layers, dims


def model_label(model: Any, name: str | None) -> str:
    """The model name a result stores: ``name``, else the model's source, else its class name."""
    return name or str(getattr(model, "metadata", {}).get("source") or type(model).__name__)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
