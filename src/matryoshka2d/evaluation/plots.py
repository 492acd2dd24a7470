"""Figures of evaluation results (needs the optional ``plot`` extra).

Figures are built with matplotlib's object API (no pyplot state, no GUI backend) and written atomically.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.evaluation.result import AVG, GridResult, metric_label
from matryoshka2d.vocab import Metric, install_hint

logger = logging.getLogger(__name__)

_FONT: dict[str, Any] = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "figure.titlesize": 14}


def styled(func: Callable[..., Path]) -> Callable[..., Path]:
    """Decorator: run a plotting function with our font sizes (caller's matplotlib settings untouched)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        try:
            import matplotlib
        except ImportError:
            raise ImportError(f"plots need matplotlib: {install_hint('plot')}") from None
        with matplotlib.rc_context(_FONT):  # type: ignore[arg-type]
            return func(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches with the constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` atomically at 150 dpi, in the format the suffix of ``path`` names (default png).

    A PNG is stored with a 128-colour palette (Pillow, which matplotlib installs): about a quarter of the
    bytes of a full-colour one, and line plots and heatmaps stay readable.
    """
    import io

    from matryoshka2d.io.atomic import atomic_open

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_open(path, "wb") as f:
        if fmt != "png":
            fig.savefig(f, format=fmt, dpi=150)
        else:
            from PIL import Image

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=150)
            buf.seek(0)
            # method 2: fast octree; dither 0: none (flat colours compress best)
            Image.open(buf).convert("RGB").quantize(colors=128, method=2, dither=0).save(f, format="png",
                                                                                          optimize=True)
    logger.info("wrote %s", path)
    return path


def _default_set(result: GridResult) -> str:
    return AVG if result.has_average() else result.sets[0]


@styled
def plot_heatmaps(result: GridResult, path: str | os.PathLike[str], *, sets: Sequence[str] | None = None,
                  metric: Metric = "spearman") -> Path:
    """One layer x dim heatmap per set (plus the 7-set average when defined), values written in the cells.

    Returns:
        ``path``.
    """
    names = list(sets) if sets is not None else result.sets + ([AVG] if result.has_average() else [])
    cols = min(len(names), 2 if len(names) <= 4 else 3)
    rows = -(-len(names) // cols)
    n_layers, n_dims = len(result.layers), len(result.dims)
    panel_w, panel_h = max(4.5, 0.75 * n_dims + 2), max(3.2, 0.42 * n_layers + 1.6)
    fig = new_figure(panel_w * cols, panel_h * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        table = result.table(name, metric)
        image = ax.imshow(table, cmap="viridis", aspect="auto", origin="lower")
        finite = table[np.isfinite(table)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        small = n_dims * n_layers > 60
        for (i, j), value in np.ndenumerate(table):
            ax.text(j, i, "—" if np.isnan(value) else f"{value:.1f}", ha="center", va="center",
                    fontsize=7 if small else 9, color="black" if value > middle else "white")
        ax.set_xticks(range(n_dims), [str(d) for d in result.dims])
        ax.set_yticks(range(n_layers), [str(n) for n in result.layers])
        ax.set_xlabel("embedding dim d")
        ax.set_ylabel("exit layer n")
        where = "average of 7 STS sets" if name == AVG else f"{name} (n={result.n_pairs(name)})"
        ax.set_title(f"{where}: {metric_label(metric)}")
        fig.colorbar(image, ax=ax, label=metric_label(metric), shrink=0.9)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{result.model}: {metric_label(metric)} per exit (layer x dim)")
    return save_figure(fig, path)


@styled
def plot_dim_curves(results: Sequence[GridResult], path: str | os.PathLike[str], *,
                    labels: Sequence[str] | None = None, set_name: str | None = None,
                    metric: Metric = "spearman") -> Path:
    """The Figure-3 view: correlation vs dim, one line per layer, one panel per model (shared y-axis).

    Returns:
        ``path``.
    """
    if not results:
        raise ValueError("plot_dim_curves needs at least one result")
    labels = list(labels) if labels is not None else [r.model for r in results]
    set_name = set_name or _default_set(results[0])
    fig = new_figure(5.2 * len(results) + 1.2, 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(results), sharey=True, squeeze=False)).ravel()
    from matplotlib import colormaps

    for ax, res, label in zip(axes, results, labels, strict=True):
        cmap = colormaps["viridis"]
        layers = res.layers
        for k, n in enumerate(layers):
            values = [res.score(set_name, n, d, metric) for d in res.dims]
            ax.plot(res.dims, values, marker="o", markersize=3.5, linewidth=1.6,
                    color=cmap(k / max(1, len(layers) - 1)), label=f"layer {n}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(res.dims, [str(d) for d in res.dims])
        ax.minorticks_off()
        ax.set_xlabel("embedding dim d (log scale)")
        ax.grid(True, alpha=0.3)
        where = "avg of 7 STS sets" if set_name == AVG else set_name
        ax.set_title(f"{label}: {where}")
    axes[0].set_ylabel(metric_label(metric))
    ncols = 2 if len(results[-1].layers) > 6 else 1
    axes[-1].legend(title="exit", fontsize=8, loc="lower right", ncols=ncols)
    fig.suptitle(f"{metric_label(metric)} vs embedding dim, one line per exit layer")
    return save_figure(fig, path)


@styled
def plot_exit_gaps(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, set_name: str,
                   tolerance: float = 1.0, metric_label: str = "Spearman") -> Path:
    """The gap of each shared model's exit to the separately trained model of that depth, vs dim.

    ``rows``: paired-bootstrap rows (``comparison`` "<model> - <baseline>", ``layer``, ``dim``, ``delta``,
    ``low``, ``high``) of one set. One panel per comparison, one line per exit layer, its 95% CI shaded; the
    band ``[-tolerance, 0]`` is the "within ``tolerance``" goal, so a point above its bottom edge meets it.

    Returns:
        ``path``.
    """
    comparisons = list(dict.fromkeys(str(r["comparison"]) for r in rows))
    if not comparisons:
        raise ValueError("plot_exit_gaps needs at least one comparison row")
    from matplotlib import colormaps

    cols = min(3, len(comparisons))
    nrows = -(-len(comparisons) // cols)
    fig = new_figure(5.0 * cols + 0.8, 4.0 * nrows)
    # each panel its own y range: a gap of -30 in one must not flatten a gap of -0.5 in another
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    layers_all = sorted({int(r["layer"]) for r in rows})
    cmap = colormaps["viridis"]
    for ax, comparison in zip(axes, comparisons, strict=False):
        mine = [r for r in rows if r["comparison"] == comparison]
        ax.axhspan(-tolerance, 0.0, color="0.85", zorder=0, label=f"within {tolerance:g}")
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        for layer in sorted({int(r["layer"]) for r in mine}):
            at = sorted((r for r in mine if int(r["layer"]) == layer), key=lambda r: r["dim"])
            dims = [int(r["dim"]) for r in at]
            color = cmap(layers_all.index(layer) / max(1, len(layers_all) - 1))
            ax.plot(dims, [r["delta"] for r in at], marker="o", markersize=3.5, color=color, label=f"layer {layer}")
            ax.fill_between(dims, [r["low"] for r in at], [r["high"] for r in at], color=color, alpha=0.12)
        dims_all = sorted({int(r["dim"]) for r in mine})
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims_all, [str(d) for d in dims_all])
        ax.minorticks_off()
        ax.set_xlabel("embedding dim d (log scale)")
        ax.grid(True, alpha=0.3)
        ax.set_title(comparison, fontsize=10)
    for ax in axes[::cols]:
        ax.set_ylabel(f"Δ {metric_label} x100 (95% CI)")
    for ax in axes[len(comparisons):]:
        ax.set_visible(False)
    # one legend for the figure, below the panels: a legend inside a panel hides the lines it explains
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color="0.85", label=f"within {tolerance:g}")]
    handles += [Line2D([], [], marker="o", markersize=3.5, color=cmap(i / max(1, len(layers_all) - 1)),
                       label=f"layer {layer}") for i, layer in enumerate(layers_all)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    fig.suptitle(f"{set_name}: each exit minus the separately trained model of its depth")
    return save_figure(fig, path)


def load_benchmark(source: str | os.PathLike[str] | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``records`` of a benchmark JSON (a path or an already-parsed mapping).

    Raises:
        ValueError: not a benchmark file, or a record without ``layer`` / ``sentences_per_s``.
    """
    if isinstance(source, Mapping):
        obj, where = source, "benchmark"
    else:
        where = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"{where}: no such benchmark file; write one with `m2d bench --output FILE.json`")
        try:
            obj = json.loads(Path(source).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not a JSON file ({e})") from None
    records = obj.get("records") if isinstance(obj, Mapping) else None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{where}: expected {{'records': [{{'impl', 'layer', 'sentences_per_s', ...}}]}}")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "layer" not in r or "sentences_per_s" not in r:
            raise ValueError(f"{where}: records[{i}] lacks 'layer' or 'sentences_per_s': {r!r:.200}")
    return [dict(r) for r in records]


@styled
def plot_pareto(result: GridResult, benchmark: str | os.PathLike[str] | Mapping[str, Any],
                path: str | os.PathLike[str], *, set_name: str | None = None, dim: int | None = None,
                metric: Metric = "spearman") -> Path:
    """Quality vs speed: one point per benchmarked exit, the Pareto front drawn through the best ones.

    A record's quality is the result's score at ``(record["layer"], record.get("dim", dim))``; ``dim``
    defaults to the full width. Series are grouped by ``impl`` / ``dtype`` / ``batch_size``.

    Returns:
        ``path``.

    Raises:
        ValueError: a benchmarked exit that the result does not hold.
    """
    records = load_benchmark(benchmark)
    set_name = set_name or _default_set(result)
    default_dim = dim or max(result.dims)
    points: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        layer, d = int(r["layer"]), int(r.get("dim") or default_dim)
        if layer not in result.layers or d not in result.dims:
            raise ValueError(f"benchmarked exit layer {layer} dim {d} is not in the result "
                             f"(layers {result.layers}, dims {result.dims}); evaluate that exit or pass dim=")
        series = " / ".join(str(r[k]) for k in ("impl", "dtype", "batch_size") if r.get(k) is not None)
        label = f"L{layer}" + (f" d{d}" if d != default_dim else "")
        points.setdefault(series or "benchmark", []).append(
            (float(r["sentences_per_s"]), result.score(set_name, layer, d, metric), label))
    fig = new_figure(7.5, 5.0)
    ax = fig.subplots()
    markers = "os^Dv<>P*X"
    for k, (series, pts) in enumerate(points.items()):
        xs, ys, names = zip(*pts, strict=True)
        ax.scatter(xs, ys, marker=markers[k % len(markers)], s=40, label=series, zorder=3)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = _pareto_front([(x, y) for pts in points.values() for x, y, _ in pts])
    ax.plot(*zip(*front, strict=True), color="grey", linestyle="--", linewidth=1.2, label="Pareto front",
            zorder=2)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="both", labelsize=9)
    ax.set_xlabel("throughput (sentences / s, log scale)")
    ax.set_ylabel(metric_label(metric))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="impl / dtype / batch", title_fontsize=8)
    where = "average of 7 STS sets" if set_name == AVG else set_name
    ax.set_title(f"{result.model}: {where}, {metric_label(metric)} vs speed")
    return save_figure(fig, path)


def _pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both speed and quality, sorted by speed."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


@styled
def plot_benchmark(result: Any, path: str | os.PathLike[str]) -> Path:
    """Throughput per exit layer, one panel per batch size; ours vs the peers in each dtype; band = min-max.

    Args:
        result: an ``m2d bench`` result (:class:`~matryoshka2d.bench.result.BenchmarkResult`: ``meta`` and
            ``records``).
        path: the image file (its suffix names the format).
    """
    from matryoshka2d.vocab import COMPILED, OURS

    meta, records, sizes = result.meta, result.records, result.meta["batch_sizes"]
    dim, n_full = meta["dims"][-1], meta["num_layers"]
    fig = new_figure(6.5 * len(sizes), 4.8)
    axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)
    impls = list(dict.fromkeys((r["impl"], r["dtype"]) for r in records))
    from matplotlib import colormaps

    colours = colormaps["tab10" if len(impls) <= 10 else "tab20"]
    for ax, bs in zip(axes[0], sizes, strict=True):
        at = [r for r in records if r["dim"] == dim and r["batch_size"] == bs]
        for i, (impl, dtype) in enumerate(impls):
            recs = sorted((r for r in at if (r["impl"], r["dtype"]) == (impl, dtype)), key=lambda r: r["layer"])
            if recs:
                x = [r["layer"] for r in recs]
                style = "-.^" if impl == COMPILED else ("-o" if impl.startswith(OURS) else "--s")
                colour = colours(i % colours.N)
                ax.plot(x, [r["sentences_per_s"] for r in recs], style, color=colour, label=f"{impl} {dtype}")
                ax.fill_between(x, [r["sentences_per_s_min"] for r in recs],
                                [r["sentences_per_s_max"] for r in recs], color=colour, alpha=0.12)
        full = [r for r in at if (r["impl"], r["dtype"], r["layer"]) == (OURS, "fp32", n_full)]
        if full:
            ax.plot(meta["layers"], [full[0]["sentences_per_s"] * n_full / n for n in meta["layers"]], ":",
                    color="grey", label="ideal N/n x ours fp32 at N")
        ax.set(title=f"batch size {bs}", xlabel="exit layer n (model physically truncated to n blocks)",
               xticks=meta["layers"], yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"sentences / s (median of {meta['repeats']}; band = min-max)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    name = Path(str(meta.get("model") or "model")).name
    fig.suptitle(f"Encoding throughput per exit: {name}, {meta['sentences']['count']} sentences\n"
                 f"{meta['device_name']}, {meta['threads']} thread(s), {meta['date'][:10]}", fontsize=11)
    return save_figure(fig, path)
