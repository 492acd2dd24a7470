"""STS evaluation over the whole (layer x dim) grid, with one model pass per dataset.

Each set's unique sentences run through the backbone once, keeping the pooled vector of every requested
layer; every exit ``(n, d)`` is then scored from those vectors by slicing ``[:d]``, L2-normalising and
taking the cosine of each pair. Spearman and Pearson correlations are reported x100.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from matryoshka2d.data.datasets import STS_SETS, ScoredPairs
from matryoshka2d.encoder.batching import embed_layers
from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.evaluation.metrics import correlations, exit_cosines
from matryoshka2d.vocab import Metric

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
AVG = "avg"


def read_result_json(path: Path) -> Any:
    """The parsed JSON of a result file written by ``m2d eval`` (STS or retrieval).

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


@dataclass
class GridResult:
    """Correlations of every (set, layer, dim) exit plus the per-pair cosines behind them.

    Attributes:
        model: name of the evaluated model.
        records: ``{"set", "layer", "dim", "spearman", "pearson", "n"}`` dicts.
        predictions: ``{set: float32 array (len(layers), len(dims), n_pairs)}`` of cosines (for bootstrap).
        gold: ``{set: float64 gold scores}``.
        metadata: split, variant, timings, ...
    """

    model: str
    records: list[dict[str, Any]]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    gold: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    metric: ClassVar[str] = "spearman"  # the headline, as RetrievalResult.metric names its own

    def __post_init__(self) -> None:
        self._index = {(r["set"], int(r["layer"]), int(r["dim"])): r for r in self.records}

    @property
    def sets(self) -> list[str]:
        return list(dict.fromkeys(r["set"] for r in self.records))

    @property
    def layers(self) -> list[int]:
        return sorted({int(r["layer"]) for r in self.records})

    @property
    def dims(self) -> list[int]:
        return sorted({int(r["dim"]) for r in self.records})

    def score(self, set_name: str, layer: int, dim: int, metric: Metric = "spearman") -> float:
        """One correlation x100; ``set_name`` may be ``"avg"`` (needs all seven STS sets).

        Raises:
            KeyError: no such exit in this result.
        """
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

    def has_average(self) -> bool:
        """Whether all seven STS test sets are present (so the usual 7-set average is defined)."""
        return set(STS_SETS) <= set(self.sets)

    def average(self, metric: Metric = "spearman",
                sets: Sequence[str] = STS_SETS) -> dict[tuple[int, int], float]:
        """Mean over ``sets`` of each exit's correlation: ``{(layer, dim): value}``.

        Undefined values (``nan``: a set with fewer than 2 distinct gold scores, or constant predictions) are
        left out of the mean, which is then over the other sets (``evaluate_grid`` warns about such sets).

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
        """``"avg"`` rows (over the seven STS sets), or ``[]`` when a set is missing."""
        if not self.has_average():
            return []
        sp, pe = self.average("spearman"), self.average("pearson")
        return [{"set": AVG, "layer": n, "dim": d, "spearman": sp[(n, d)], "pearson": pe[(n, d)],
                 "n": len(STS_SETS)} for n, d in sp]

    def merged(self, other: GridResult) -> GridResult:
        """This result plus ``other``'s sets (same layers and dims; a set in both keeps this one's rows).

        Raises:
            ValueError: the two grids have different layers or dims.
        """
        if other.layers != self.layers or other.dims != self.dims:
            raise ValueError(f"cannot merge grids with layers/dims {self.layers}/{self.dims} and "
                             f"{other.layers}/{other.dims}; evaluate both with the same layers and dims")
        new = [s for s in other.sets if s not in self.sets]
        records = [*self.records, *(r for r in other.records if r["set"] in new)]
        meta = {**other.metadata, **self.metadata}
        timings = {**(other.metadata.get("timings") or {}), **(self.metadata.get("timings") or {})}
        if timings:
            meta["timings"] = timings
        return GridResult(self.model, records,
                          {**{s: other.predictions[s] for s in new if s in other.predictions}, **self.predictions},
                          {**{s: other.gold[s] for s in new if s in other.gold}, **self.gold}, meta)

    # ----------------------------------------------------------------------------------- views
    def to_dict(self) -> dict[str, Any]:
        """``{"format_version", "model", "metadata", "results", "average"}`` (NaN becomes None)."""
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                 for r in self.records]
        return {"format_version": FORMAT_VERSION, "model": self.model, "metadata": self.metadata,
                "results": clean, "average": self.average_records()}

    def table(self, set_name: str, metric: Metric = "spearman") -> np.ndarray:
        """``(len(layers), len(dims))`` array of one set's correlations (``"avg"`` allowed)."""
        return np.array([[self.score(set_name, n, d, metric) for d in self.dims] for n in self.layers])

    def to_markdown(self, metric: Metric = "spearman", sets: Sequence[str] | None = None) -> str:
        """A layer x dim table per set (and the 7-set average when all seven sets are present)."""
        names = list(sets) if sets is not None else self.sets + ([AVG] if self.has_average() else [])
        blocks = []
        for name in names:
            n_pairs = "7 sets" if name == AVG else f"n={self.n_pairs(name)}"
            title = f"### {self.model} — {name} ({metric.capitalize()} x100, {n_pairs})"
            header = "| layer \\ dim | " + " | ".join(str(d) for d in self.dims) + " |"
            rule = "|---:|" + "---:|" * len(self.dims)
            rows = [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                    for n, row in zip(self.layers, self.table(name, metric), strict=True)]
            blocks.append("\n".join([title, "", header, rule, *rows]))
        return "\n\n".join(blocks) + "\n"

    def to_csv(self) -> str:
        """``set,layer,dim,spearman,pearson,n`` rows (with ``avg`` rows when defined)."""
        lines = ["set,layer,dim,spearman,pearson,n"]
        for r in [*self.records, *self.average_records()]:
            lines.append(f"{r['set']},{r['layer']},{r['dim']},{r['spearman']:.4f},{r['pearson']:.4f},{r['n']}")
        return "\n".join(lines) + "\n"

    def n_pairs(self, set_name: str) -> int:
        """Number of pairs of one set."""
        return int(next(r["n"] for r in self.records if r["set"] == set_name))

    # ----------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (JSON) and, with predictions held, ``<stem>.preds.npz`` beside it, atomically."""
        from matryoshka2d.io.atomic import atomic_write_json

        path = Path(path)
        obj = self.to_dict()
        if self.predictions:
            arrays: dict[str, np.ndarray] = {"layers": np.asarray(self.layers), "dims": np.asarray(self.dims)}
            for i, name in enumerate(self.sets):
                arrays[f"pred_{i}"], arrays[f"gold_{i}"] = self.predictions[name], self.gold[name]
            obj["predictions"] = write_sidecar(path, arrays, self.sets)
        atomic_write_json(path, obj)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GridResult:
        """Read a result written by :meth:`save` (predictions too, when the sidecar is present).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a result file, or a newer format.
        """
        path = Path(path)
        obj = read_result_json(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("results"), list) or "model" not in obj:
            raise ValueError(f"{path}: not an evaluation result (needs keys 'model' and 'results')")
        version = obj.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: result format_version {version} is newer than this library's "
                             f"{FORMAT_VERSION}; upgrade matryoshka2d")
        try:
            records = [{**r, "spearman": _num(r["spearman"]), "pearson": _num(r["pearson"])}
                       for r in obj["results"]]
            for r in records:
                r["layer"], r["dim"], r["n"] = int(r["layer"]), int(r["dim"]), int(r["n"])
                if not isinstance(r["set"], str):
                    raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: a 'results' entry lacks set/layer/dim/n/spearman/pearson or has a value "
                             "of the wrong type; rewrite it with m2d eval --output") from None
        info = obj.get("predictions")
        if info is not None and (not isinstance(info, dict) or not isinstance(info.get("file"), str)
                                 or not isinstance(info.get("sets"), list)):
            raise ValueError(f"{path}: 'predictions' must be {{'file': NAME, 'sets': [...]}}; rewrite it with m2d "
                             "eval --output")
        result = cls(str(obj["model"]), records, metadata=obj.get("metadata") or {})
        if info:
            arrays = read_sidecar(path, info)
            if arrays is not None:
                read_predictions(arrays, path.with_name(info["file"]), path, result, list(info.get("sets") or []))
        return result


def read_predictions(z: dict[str, np.ndarray], sidecar: Path, path: Path, result: GridResult,
                     sets: list[str]) -> None:
    """Fill ``result.predictions`` / ``result.gold`` from the arrays ``z`` of ``sidecar``, checking each shape.

    Raises:
        ValueError: a missing array, or arrays whose shapes do not match the result in ``path`` (layers x
            dims x pairs per set); the message names the file and array.
    """
    fix = f"rewrite both with m2d eval --output {path} --overwrite"
    names = set(z)
    needed = ["layers", "dims", *(f"{kind}_{i}" for i in range(len(sets)) for kind in ("pred", "gold"))]
    missing = [k for k in needed if k not in names]
    if missing:
        raise ValueError(f"{sidecar}: arrays {missing} are missing (it holds {sorted(names)}); {fix}")
    if z["layers"].tolist() != result.layers or z["dims"].tolist() != result.dims:
        raise ValueError(f"{sidecar}: layers/dims {z['layers'].tolist()}/{z['dims'].tolist()} do not match "
                         f"{path} ({result.layers}/{result.dims}); {fix}")
    for i, name in enumerate(sets):
        if name not in result.sets:
            raise ValueError(f"{sidecar}: set {name!r} is not in {path} ({result.sets}); {fix}")
        pred, gold = z[f"pred_{i}"], z[f"gold_{i}"]
        n = result.n_pairs(name)
        expected = (len(result.layers), len(result.dims), n)
        if pred.shape != expected or gold.shape != (n,):
            raise ValueError(f"{sidecar}: pred_{i} / gold_{i} ({name}) have shapes {pred.shape} / "
                             f"{gold.shape}, expected {expected} / ({n},); {fix}")
        if not (np.issubdtype(pred.dtype, np.floating) and np.issubdtype(gold.dtype, np.number)):
            raise ValueError(f"{sidecar}: pred_{i} / gold_{i} ({name}) are {pred.dtype} / {gold.dtype}, "
                             f"not numbers; {fix}")
        result.predictions[name], result.gold[name] = pred, gold


def write_sidecar(path: Path, arrays: dict[str, np.ndarray], sets: list[str]) -> dict[str, Any]:
    """Write the per-unit arrays of the result ``path`` to ``<stem>.preds.npz`` beside it, atomically.

    Returns:
        The result JSON's ``predictions`` entry: ``{"file", "sets", "sha256"}`` (the sidecar's digest, which
        :func:`read_sidecar` checks, so a result never reads another run's sidecar).
    """
    from matryoshka2d.io.atomic import atomic_open
    from matryoshka2d.io.manifest import file_sha256

    sidecar = predictions_path(path)
    with atomic_open(sidecar, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return {"file": sidecar.name, "sets": list(sets), "sha256": file_sha256(sidecar)}


def read_sidecar(path: Path, info: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of the sidecar that the result ``path``'s ``predictions`` entry ``info`` names.

    Its SHA-256 must be the one ``info`` records (results written before digests have none: not checked)
    and every float array finite.

    Returns:
        ``{name: array}``, or ``None`` (logged) when the file is missing.

    Raises:
        ValueError: a malformed ``info``, another file than the one written with the result, NaN or infinite
            values, or a damaged or truncated archive.
    """
    import zipfile

    from matryoshka2d.io.manifest import file_sha256

    fix = f"rewrite both with m2d eval --output {path} --overwrite"
    if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not isinstance(info.get("sets"), list):
        raise ValueError(f"{path}: 'predictions' must be {{'file': NAME, 'sets': [...], 'sha256': ...}}; {fix}")
    sidecar = path.with_name(info["file"])
    if not sidecar.is_file():
        logger.warning("%s: per-unit file %s is missing; bootstrap comparisons need it", path, sidecar)
        return None
    expected = info.get("sha256")
    if expected is not None and file_sha256(sidecar) != expected:
        raise ValueError(f"{sidecar} is not the sidecar written with {path} (its SHA-256 differs from the one the "
                         f"result records: another run's file, or altered); {fix}")
    try:
        with np.load(sidecar) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"{sidecar} is damaged or truncated ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                         f"; {fix}") from None
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ValueError(f"{sidecar}: array {name} holds {bad} NaN or infinite value(s), so no comparison or "
                             f"interval from it means anything; {fix}")
    return arrays


def predictions_path(path: str | os.PathLike[str]) -> Path:
    """``results.json`` -> ``results.preds.npz``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.preds.npz")


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _as_sets(sets: Mapping[str, ScoredPairs] | Sequence[ScoredPairs] | ScoredPairs) -> dict[str, ScoredPairs]:
    if isinstance(sets, ScoredPairs):
        sets = [sets]
    if isinstance(sets, Mapping):
        items = dict(sets)
    else:
        items = {}
        for s in sets:
            if not isinstance(s, ScoredPairs):
                raise ValueError(f"sets must hold ScoredPairs (see matryoshka2d.data.datasets.load_sts), got "
                                 f"{type(s).__name__}")
            if s.name in items:
                raise ValueError(f"two sets are named {s.name!r}; give each a unique name")
            items[s.name] = s
    if not items:
        raise ValueError("sets is empty; pass e.g. {'stsb': load_sts('stsb')}")
    return items


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
    items = _as_sets(sets)
    all_layers = list(range(1, model.num_layers + 1))
    layers = sorted({model.check_layer(n) for n in layers}) if layers else all_layers
    dims = sorted({model.check_dim(d) for d in dims}) if dims else matryoshka_dims(model.hidden_size)
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
    name = model_name or str(getattr(model, "metadata", {}).get("source") or type(model).__name__)
    return GridResult(name, records, predictions, {k: v.scores for k, v in items.items()}, meta)
