"""The reproduction study's report: mean +- std over seeds, paired bootstrap CIs, plots and verdicts.

Everything in ``research/results.md`` is computed here from the per-run ``eval.json`` files (``retrieval.json`` for
a retrieval study: nDCG@10 on BEIR sets, bootstrap over queries instead of pairs), so the report is
regenerated, never edited by hand.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka2d.data.datasets import STS_SETS
from matryoshka2d.evaluation.compare import MeanBootstrap, PairedBootstrap, set_seed
from matryoshka2d.evaluation.plots import (
    load_benchmark,
    new_figure,
    plot_dim_curves,
    plot_exit_gaps,
    save_figure,
    styled,
)
from matryoshka2d.evaluation.result import GridResult, load_result, metric_label
from matryoshka2d.io.atomic import atomic_write_json, atomic_write_text
from matryoshka2d.study.config import separate_families

if TYPE_CHECKING:
    from matryoshka2d.study.config import StudyConfig, Unit

logger = logging.getLogger(__name__)

PRIMARY = ("stsb", "sickr")
SET_TITLES = {"stsb": "STS-B test", "sickr": "SICK-R test", "scifact": "SciFact test", "nfcorpus": "NFCorpus test"}
OVERLAP_NOTE = ("STS12-16 share sentence pairs with STS-B train (PROVENANCE.md), so they are not clean "
                "transfer sets; STS-B test is in-domain, SICK-R test is the transfer set.")


class Study:
    """The loaded results: ``runs[label] = [result per seed]``, each a GridResult with per-pair predictions
    or (a retrieval study) one of task "retrieval" with per-query scores."""

    def __init__(self, evals: dict[Unit, Path], num_layers: int, variants: tuple[str, ...] = (),
                 families: tuple[str, ...] = ()) -> None:
        self.runs: dict[str, list[Any]] = defaultdict(list)
        self.dev: dict[str, list[Any]] = defaultdict(list)
        self.step_s: dict[str, list[float]] = defaultdict(list)
        for unit, path in evals.items():
            self.runs[unit.label].append(load_result(path))
            if (path.parent / "dev.json").is_file():
                self.dev[unit.label].append(load_result(path.parent / "dev.json"))
            step = _median_step_s(path.parent / "log.jsonl")
            if step is not None:
                self.step_s[unit.label].append(step)
        self.variants = tuple(v for v in variants if self.runs.get(v))
        # families of separately trained models besides "separate" (runs "<family>-<n>"), e.g. separate + head
        self.families = tuple(f for f in families if any(self.runs.get(f"{f}-{k}") for k in range(1, num_layers)))
        self.num_layers = num_layers
        dims = next(iter(self.runs.values()))[0].dims if self.runs else [64]
        self.key_dims = sorted({d for d in (64, max(dims)) if d in dims})  # a narrow and the full width
        first = next(iter(self.runs.values()))[0] if self.runs else GridResult("", [])
        self.retrieval = first.task == "retrieval"
        self.metric = first.metric  # "spearman", or the retrieval headline ("ndcg@10")
        self.label = metric_label(self.metric).removesuffix(" x100") if self.retrieval else "Spearman"
        self.units = "queries" if self.retrieval else "pairs"  # what the bootstrap resamples
        self._boot: dict[str, Any] = {}

    def has(self, label: str) -> bool:
        return bool(self.runs.get(label))

    def values(self, label: str, set_name: str, layer: int, dim: int) -> np.ndarray:
        """The seeds' scores of one exit (the seeds whose result holds ``set_name``)."""
        return np.array([r.score(set_name, layer, dim) for r in self.runs[label] if set_name in r.sets])

    def seeds_with(self, set_name: str) -> int:
        """The most seeds any strategy has results for on ``set_name``."""
        return max((sum(set_name in r.sets for r in runs) for runs in self.runs.values()), default=0)

    def cell(self, label: str, set_name: str, layer: int, dim: int) -> str:
        if not self.has(label) or layer not in self.runs[label][0].layers:
            return "-"
        v = self.values(label, set_name, layer, dim)
        if not len(v):
            return "-"
        return f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"

    def own_depth(self, n: int, family: str = "separate") -> str:
        """Label of the separately trained model of depth ``n`` in ``family`` (``separate``'s full-depth one is
        ``full``; another family has no full-depth member, its full-depth control is an ordinary variant)."""
        if n == self.num_layers:
            return "full" if family == "separate" else family
        return f"{family}-{n}"

    def bootstrap(self, set_name: str, a: tuple[str, int, int], b: tuple[str, int, int],
                  draws: int) -> dict[str, float] | None:
        """CI of mean-over-seeds score(b) - score(a): each resample of pairs (STS) or queries (retrieval) scores
        every seed's predictions, the seeds are averaged per model, then differenced (seed spread is reported
        apart). Every run of a set is resampled the same way (paired)."""
        if not (self.has(a[0]) and self.has(b[0])):
            return None

        def mean_draws(label: str, layer: int, dim: int) -> tuple[np.ndarray, float]:
            per_seed = [self._draws(r, set_name, layer, dim, draws) for r in self.runs[label]]
            return np.mean(per_seed, axis=0), float(self.values(label, set_name, layer, dim).mean())

        da, ma = mean_draws(*a)
        db, mb = mean_draws(*b)
        low, high = np.nanpercentile(db - da, [2.5, 97.5])
        return {"delta": mb - ma, "low": float(low), "high": float(high)}

    def _draws(self, result: Any, set_name: str, layer: int, dim: int, draws: int) -> np.ndarray:
        """The exit's score on each of the set's ``draws`` shared resamples."""
        if set_name not in self._boot:  # STS pairs on seed 0, queries on the set's own stream (as compare draws)
            boot = (MeanBootstrap(result.n_units(set_name), draws=draws, seed=set_seed(set_name, 0))
                    if self.retrieval else PairedBootstrap(result.units[set_name], draws=draws, seed=0))
            self._boot[set_name] = (boot, result.units[set_name])
        boot, units = self._boot[set_name]
        if not np.array_equal(result.units[set_name], units):
            raise ValueError(f"{result.model}: its {set_name} {self.units} differ from the other runs'; evaluate "
                             "every run on the same set")
        return boot.resample(result.unit_values(set_name, layer, dim))


def _table(study: Study, set_name: str, labels: list[str]) -> list[str]:
    n = study.num_layers
    head = "| strategy | " + " | ".join(f"L{k} d{d}" for d in study.key_dims for k in range(1, n + 1)) + " |"
    lines = [head, "|" + "---|" * (1 + n * len(study.key_dims))]
    for label in labels:
        if study.has(label):
            cells = [study.cell(label, set_name, k, d) for d in study.key_dims for k in range(1, n + 1)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for family in ("separate", *study.families):
        if any(study.has(f"{family}-{k}") for k in range(1, n)):
            cells = [study.cell(study.own_depth(k, family), set_name, k, d) for d in study.key_dims
                     for k in range(1, n + 1)]
            lines.append(f"| {family} (model of that depth) | " + " | ".join(cells) + " |")
    return lines


def _grid(study: Study, label: str, set_name: str) -> list[str]:
    first = study.runs[label][0]
    lines = ["| layer | " + " | ".join(f"d{d}" for d in first.dims) + " |", "|" + "---|" * (1 + len(first.dims))]
    for k in first.layers:
        lines.append(f"| {k} | " + " | ".join(study.cell(label, set_name, k, d) for d in first.dims) + " |")
    return lines


def _ci_rows(study: Study, draws: int, sets: tuple[str, ...]) -> list[dict[str, Any]]:
    n, rows = study.num_layers, []
    full_dim = max(study.key_dims)
    first = next(iter(study.runs.values()))[0]
    wide = [d for d in first.dims if d >= min(64, full_dim)]  # the paper's claim: every dim >= 64
    for s in sets:
        for base in ("full", "mrl"):
            for k in range(1, n):
                for d in wide:
                    rows.append({"set": s, "comparison": f"2dmse - {base}", "layer": k, "dim": d,
                                 **(study.bootstrap(s, (base, k, d), ("2dmse", k, d), draws) or {})})
        for family in ("separate", *study.families):
            compared = ("2dmse", "starbucks", "dense", "ese", *study.variants)
            compared += tuple(f for f in study.families if f != family) if family == "separate" else ()
            for label in compared:
                for k in range(1, n):
                    for d in wide:
                        b = (study.own_depth(k, label) if label in study.families else label, k, d)
                        rows.append({"set": s, "comparison": f"{label} - {family}", "layer": k, "dim": d,
                                     **(study.bootstrap(s, (study.own_depth(k, family), k, d), b, draws) or {})})
        members = tuple(f"{f}-" for f in ("separate", *study.families))  # truncated models: no layer N
        for label in study.runs:
            if label not in ("full", "original") and not label.startswith(members):
                rows.append({"set": s, "comparison": f"{label} - full (full exit)", "layer": n, "dim": full_dim,
                             **(study.bootstrap(s, ("full", n, full_dim), (label, n, full_dim), draws) or {})})
    return [r for r in rows if "delta" in r]


def _ci_markdown(rows: list[dict[str, Any]], label: str = "Spearman") -> list[str]:
    lines = [f"| set | comparison | layer | dim | Δ {label} | 95% CI | CI excludes 0 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sign = "yes (+)" if r["low"] > 0 else ("yes (−)" if r["high"] < 0 else "no")
        lines.append(f"| {r['set']} | {r['comparison']} | {r['layer']} | {r['dim']} | {r['delta']:+.2f} | "
                     f"[{r['low']:+.2f}, {r['high']:+.2f}] | {sign} |")
    return lines


def set_title(set_name: str) -> str:
    """How a report names a test set: ``STS-B test`` for ``stsb``."""
    return SET_TITLES.get(set_name, f"{set_name} test")


def _verdicts(study: Study, rows: list[dict[str, Any]], sets: tuple[str, ...], within_gap: float,
              full_exit_gap: float) -> list[str]:
    """The report's verdicts; the thresholds are the study TOML's ``verdict_within`` / ``verdict_full_exit``."""

    def pick(comparison: str, set_name: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["comparison"] == comparison and r["set"] == set_name]

    out = []
    for set_name in [s for s in sets if any(r["set"] == s for r in rows)]:
        where = set_title(set_name)
        for base in ("full", "mrl"):
            sel = pick(f"2dmse - {base}", set_name)
            if sel:
                wins = sum(r["low"] > 0 for r in sel)
                losses = sum(r["high"] < 0 for r in sel)
                dims = sorted({r["dim"] for r in sel})
                out.append(f"- **2DMSE vs {base} at shallow exits** ({where}, layers 1..{study.num_layers - 1}, "
                           f"dims {', '.join(map(str, dims))}): 2DMSE is better with a CI excluding 0 at "
                           f"{wins}/{len(sel)} exits, worse at {losses}/{len(sel)}; mean Δ "
                           f"{np.mean([r['delta'] for r in sel]):+.2f}.")
        for r in pick("2dmse - full (full exit)", set_name):
            verdict = "loses nothing measurable" if r["low"] <= 0 <= r["high"] or r["low"] > 0 else "loses"
            out.append(f"- **Full exit of 2DMSE vs plain fine-tuning** ({where}, L{r['layer']} d{r['dim']}): "
                       f"Δ {r['delta']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]: 2DMSE {verdict}.")
        separates = [c for c in dict.fromkeys(r["comparison"] for r in rows if r["set"] == set_name)
                     if c.split(" - ")[-1] in ("separate", *study.families)]
        for comparison in separates:
            label, family = comparison.split(" - ")
            sel = pick(comparison, set_name)
            if sel:
                behind = sum(r["high"] < 0 for r in sel)
                ahead = sum(r["low"] > 0 for r in sel)
                within = sum(r["delta"] >= -within_gap for r in sel)
                what = "separately trained models" if family == "separate" else f"{family} models"
                out.append(f"- **{label} vs {what} of the same depth** ({where}): behind at "
                           f"{behind}/{len(sel)} exits, ahead at {ahead}/{len(sel)} (CI excluding 0); within "
                           f"{within_gap} at {within}/{len(sel)}; mean Δ {np.mean([r['delta'] for r in sel]):+.2f}.")
        full_exit = [r for r in rows if r["comparison"].endswith("full (full exit)") and r["set"] == set_name]
        if full_exit:
            ok = [r["comparison"].split(" - ")[0] for r in full_exit if r["delta"] >= -full_exit_gap]
            bad = [f"{r['comparison'].split(' - ')[0]} ({r['delta']:+.2f})" for r in full_exit
                   if r["delta"] < -full_exit_gap]
            out.append(f"- **Goal: every strategy's full exit within {full_exit_gap} of full** ({where}): met by "
                       f"{', '.join(ok) or 'none'}; missed by {', '.join(bad) or 'none'}.")
    return out


def _plots(study: Study, out: Path, benchmark: str | None, rows: list[dict[str, Any]], link: str) -> list[str]:
    """Write the plots into ``out``; ``link`` is ``out`` as seen from the report's folder (for the image links)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    lines = []
    families = ("separate", *study.families)
    for set_name in dict.fromkeys(r["set"] for r in rows):  # each shared model vs the separate models
        gaps = [r for r in rows if r["set"] == set_name and r["comparison"].split(" - ")[-1] in families]
        if gaps:
            path = plot_exit_gaps(gaps, out / f"gaps_{set_name}.png", set_name=set_name, metric_label=study.label)
            lines.append(f"![gap to the separate model of each depth, {set_name}]({link}/{path.name})")
    labels = [lab for lab in ("full", "mrl", "layers", "2dmse", "starbucks") if study.has(lab)]
    for set_name in PRIMARY if not study.retrieval else ():  # the figure 3 of the paper: STS only
        means = []
        for label in labels:
            first = study.runs[label][0]
            records = [{"set": set_name, "layer": k, "dim": d, "spearman": float(study.values(label, set_name, k,
                        d).mean()), "pearson": float("nan"), "n": first.n_pairs(set_name)}
                       for k in first.layers for d in first.dims]
            means.append(GridResult(label, records))
        if means:
            path = plot_dim_curves(means, out / f"figure3_{set_name}.png", labels=labels, set_name=set_name)
            lines.append(f"![Spearman vs dim, {set_name}]({link}/{path.name})")
    if benchmark and Path(benchmark).is_file():
        path = _plot_speed(study, benchmark, out / "quality_vs_speed.png")
        if path:
            lines.append(f"![quality vs speed]({link}/{path.name})")
    return lines


@styled
def _plot_speed(study: Study, benchmark: str, path: Path) -> Path | None:
    """STS-B test Spearman at the full width vs encoding throughput of a physically truncated model, per strategy."""
    recs = [r for r in load_benchmark(benchmark) if r.get("impl") == "matryoshka2d" and r.get("dtype") == "fp32"]
    if not recs:
        return None
    batch = max({r["batch_size"] for r in recs})
    speed = {int(r["layer"]): float(r["sentences_per_s"]) for r in recs if r["batch_size"] == batch}
    fig = new_figure(7.5, 5.0)
    ax = fig.subplots()
    n, d = study.num_layers, max(study.key_dims)
    for label in [lab for lab in ("original", "full", "mrl", "2dmse", "starbucks") if study.has(lab)] + ["separate"]:
        xs, ys = [], []
        for k in sorted(speed):
            lab = study.own_depth(k) if label == "separate" else label
            if study.has(lab) and k <= n:
                xs.append(speed[k])
                ys.append(float(study.values(lab, "stsb", k, d).mean()))
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"encoding throughput, sentences/s (fp32, batch {batch}, log scale)")
    ax.set_ylabel(f"STS-B test Spearman x100 (d={d})")
    ax.set_title("Quality vs speed per exit layer (truncated models)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _selection(selection: dict[str, Any]) -> list[str]:
    if not selection:
        return ["Hyper-parameters: the training config as is (no dev sweep)."]
    lines = [f"Learning rate chosen on {selection['set']} (never a test set): **{selection['chosen']}**; rule: "
             f"{selection['rule']}.", "", "| lr | " + " | ".join(next(iter(selection["scores"].values())))
             + " | mean |", "|---|" + "---|" * (len(next(iter(selection["scores"].values()))) + 1)]
    for lr, by in selection["scores"].items():
        lines.append(f"| {lr} | " + " | ".join(f"{v:.2f}" for v in by.values()) + f" | {selection['mean'][lr]:.2f} |")
    return lines


def write_report(study_cfg: StudyConfig, evals: dict[Unit, Path], selection: dict[str, Any],
                 num_layers: int) -> Path:
    """Write ``<output_dir>/summary.json``, ``comparisons.json``, plots and ``research/results.md``."""
    out = Path(study_cfg.output_dir)
    report = Path(study_cfg.report) if study_cfg.report else out.parent / "results.md"
    study = Study(evals, num_layers, tuple(study_cfg.variants), separate_families(study_cfg))
    labels = [lab for lab in ("original", "full", "mrl", "layers", "2dmse", "starbucks", "dense", "ese",
                              *study_cfg.variants) if study.has(lab)]
    summary = {label: [{"set": r["set"], "layer": r["layer"], "dim": r["dim"],
                        study.metric: [g.score(r["set"], r["layer"], r["dim"]) for g in runs if r["set"] in g.sets]}
                       for r in runs[0].records] for label, runs in study.runs.items()}
    atomic_write_json(out / "summary.json", {"seeds": {k: len(v) for k, v in study.runs.items()}, "runs": summary})
    primary = tuple(study_cfg.eval_sets) if study_cfg.retrieval else PRIMARY
    sets = tuple(s for s in primary if any(s in r[0].sets for r in study.runs.values()))
    rows = _ci_rows(study, study_cfg.draws, sets)
    atomic_write_json(out / "comparisons.json", rows)
    reported = sorted({u.seed for u in evals if u.seed is not None}) or list(study_cfg.seeds)
    seeds = ", ".join(map(str, reported))
    missing = [s for s in study_cfg.seeds if s not in reported]
    partial = [f"> **Seeds reported: {seeds}** of the configured {', '.join(map(str, study_cfg.seeds))}; seed"
               f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} left out (not run yet, or not "
               "chosen with `--seeds`). Every mean, std, CI and verdict below is over the reported seeds only.", ""]
    md = [f"# {study_cfg.name}", "", *(partial if missing else []),
          f"Generated by `{study_cfg.command}`; do not edit by hand. "
          + (f"{study.label} x100 (exact cosine search over each set's whole corpus)" if study.retrieval else
             "Spearman x100 of cosine")
          + f", mean ± std over seeds ({seeds}); `separate (model of that depth)` is a model physically truncated "
          "to n layers and fine-tuned alone (n = N is `full`).", "",
          *_selection(selection), "", *([OVERLAP_NOTE, ""] if set(sets) & set(STS_SETS) else [])]
    for s in sets:
        dims = " and ".join(map(str, study.key_dims))
        md += [f"## {s} test: every strategy at layers 1..{num_layers}, dims {dims}", "",
               *_table(study, s, labels), ""]
    md += [*_dev_and_cost(study, labels, study_cfg.selection_set),
           f"## Paired bootstrap 95% CIs ({study_cfg.draws:,} resamples of {study.units}; seed-averaged)", "",
           *_ci_markdown(rows, study.label), "",
           "## Verdicts (computed from the numbers above)", "",
           *_verdicts(study, rows, sets, study_cfg.verdict_within, study_cfg.verdict_full_exit), "",
           "## Plots", "", *_plots(study, out, study_cfg.benchmark, rows, relative_link(out, report)), "",
           "## Full grids (mean ± std over seeds)", ""]
    for label in labels:
        for s in sets:
            md += [f"### {label}, {s}", "", *_grid(study, label, s), ""]
    other = [s for s in study_cfg.eval_sets if s not in sets and s in STS_SETS]
    if other:
        md += ["## STS12-16 (not clean transfer sets)", "", OVERLAP_NOTE, ""]
        for s in other:
            if any(s in r[0].sets for r in study.runs.values()):
                seeds = study.seeds_with(s)
                md += [f"### {s} ({seeds} seed{'s' if seeds > 1 else ''})", "", *_table(study, s, labels), ""]
    atomic_write_text(report, "\n".join(md) + "\n")
    logger.info("wrote %s", report)
    return report


def relative_link(target: Path, report: Path) -> str:
    """``target`` relative to the report's folder, with ``/`` separators: what a Markdown link needs."""
    return Path(os.path.relpath(Path(target).resolve(), Path(report).resolve().parent)).as_posix()


def _median_step_s(log: Path) -> float | None:
    """Median seconds per optimiser step of a run's ``log.jsonl`` (first 5 steps left out: warm-up)."""
    import json

    if not log.is_file():
        return None
    steps = [json.loads(line).get("step_s") for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [float(v) for v in steps if isinstance(v, (int, float))]
    return float(np.median(steps[5:] or steps)) if steps else None


def _dev_and_cost(study: Study, labels: list[str], dev_set: str) -> list[str]:
    """Dev-set means (what ablations are chosen on) and the training cost per step relative to ``full``."""
    rows = [lab for lab in labels if lab != "original" and (study.dev.get(lab) or study.step_s.get(lab))]
    if not rows:
        return []
    cost_note = ("Step time is the median wall time of one optimiser step in each run's log, averaged over seeds; "
                 "runs shared the machine differently (one or two workers, other jobs), so it is only indicative: "
                 "compare training cost with `benchmarks/train_step.py`, which interleaves the strategies in one "
                 "process.")
    if not any(study.dev.get(lab) for lab in rows):  # no dev evaluation (e.g. SciFact has no dev split)
        lines = ["## Training cost", "", cost_note, "", "| strategy | step s (median, as run) |", "|---|---|"]
        lines += [f"| {lab} | {float(np.mean(study.step_s[lab])):.2f} |" for lab in rows]
        return [*lines, ""]
    n, width = study.num_layers, max(study.key_dims)
    head = ("| strategy | " + " | ".join(f"dev L{k} d{width}" for k in range(1, n + 1))
            + " | dev mean (dims ≥ 64) | step s (median, as run) |")
    lines = [f"## {dev_set} dev (for choosing) and training cost", "",
             f"Dev {study.label} x100 (mean over seeds); the mean is over every exit with dim ≥ 64. {cost_note}",
             "", head, "|---|" + "---|" * (n + 2)]
    for lab in rows:
        dev = study.dev.get(lab, [])
        cells = []
        for k in range(1, n + 1):
            vals = [g.score(dev_set, k, max(g.dims)) for g in dev if k in g.layers]
            cells.append(f"{np.mean(vals):.2f}" if vals else "-")
        wide = [r[g.metric] for g in dev for r in g.records if r["dim"] >= min(64, max(g.dims))]
        step = float(np.mean(study.step_s[lab])) if study.step_s.get(lab) else None
        lines.append(f"| {lab} | " + " | ".join(cells) + (f" | {np.mean(wide):.2f}" if wide else " | -")
                     + (f" | {step:.2f} |" if step else " | - |"))
    own = [study.dev.get(study.own_depth(k), []) for k in range(1, n + 1)]
    if all(own[:-1]):
        cells = [f"{np.mean([g.score(dev_set, k, max(g.dims)) for g in runs]):.2f}" if runs else "-"
                 for k, runs in enumerate(own, 1)]
        lines.append("| separate (model of that depth) | " + " | ".join(cells) + " | - | - |")
    return [*lines, ""]
