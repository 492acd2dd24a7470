"""Pool the per-seed reports of one study into a table over seeds, from their ``comparisons.json`` alone.

``m2d reproduce`` averages seeds itself (a seed-averaged paired bootstrap over pairs), but it needs every seed's
runs in one ``runs_dir``. When the seeds were run in different places and only their reports are left
(``--seeds 1`` on one machine, ``--seeds 2`` on another, each written with ``--report-only``),
``m2d reproduce --pool`` pools what the reports hold: for each comparison and exit, the seed-mean of the
per-seed deltas, their standard deviation, a t interval over seeds, and in how many seeds the per-seed
bootstrap CI is wholly below or above 0. It does not re-run or re-score anything. The verdicts' thresholds
are the study TOML's (``verdict_within``, ``verdict_full_exit``, ``verdict_min_dim``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from matryoshka2d.io.atomic import atomic_write_json, atomic_write_text
from matryoshka2d.study.config import StudyConfig
from matryoshka2d.study.report import relative_link, set_title


def parse_seed_dirs(items: Sequence[str]) -> dict[int, Path]:
    """``{seed: report folder}`` from ``SEED=DIR`` items, each folder checked to hold a study's report.

    Raises:
        ValueError: a malformed item, a seed given twice, a folder without the report's JSON, or one seed.
    """
    dirs: dict[int, Path] = {}
    for item in items:
        seed, sep, path = item.partition("=")
        if not sep or not seed.isdigit():
            raise ValueError(f"--pool {item!r} is not SEED=DIR (e.g. 1=research/controls-seed1)")
        if int(seed) in dirs:
            raise ValueError(f"--pool: seed {seed} is given twice; give each seed's report folder once")
        for name in ("comparisons.json", "selection.json"):
            if not (Path(path) / name).is_file():
                raise ValueError(f"--pool: {Path(path) / name} does not exist; give the output_dir of a report "
                                 "written by `m2d reproduce` for that seed")
        dirs[int(seed)] = Path(path)
    if len(dirs) < 2:
        raise ValueError(f"--pool: {len(dirs)} seed folder(s) given; pooling needs at least 2")
    return dirs


def pool(dirs: dict[int, Path]) -> list[dict]:
    """One row per (set, comparison, layer, dim) present in every seed's ``comparisons.json``.

    Raises:
        ValueError: the seeds were trained at different learning rates (not one study).
    """
    chosen = {s: json.loads((d / "selection.json").read_text())["chosen"] for s, d in dirs.items()}
    if len(set(chosen.values())) > 1:
        raise ValueError(f"--pool: the seeds were trained at different learning rates {chosen}; they are not one "
                         "study and cannot be pooled")
    by_key: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for seed, d in dirs.items():
        for r in json.loads((d / "comparisons.json").read_text()):
            by_key[(r["set"], r["comparison"], r["layer"], r["dim"])][seed] = r
    rows = []
    n = len(dirs)
    for (set_name, comparison, layer, dim), per in by_key.items():
        if len(per) < n:  # a comparison not in every seed's report is left out, not pooled over fewer seeds
            continue
        deltas = np.array([per[s]["delta"] for s in sorted(per)])
        std = float(deltas.std(ddof=1))
        half = stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)
        rows.append({"set": set_name, "comparison": comparison, "layer": layer, "dim": dim,
                     "seeds": sorted(per), "deltas": deltas.tolist(), "mean": float(deltas.mean()),
                     "std": std, "t_low": float(deltas.mean() - half),
                     "t_high": float(deltas.mean() + half),
                     "seeds_behind": sum(per[s]["high"] < 0 for s in per),
                     "seeds_ahead": sum(per[s]["low"] > 0 for s in per)})
    return rows


def verdicts(rows: list[dict], study: StudyConfig) -> list[str]:
    """One line per comparison, with the study's thresholds."""
    within_gap, full_gap, min_dim = study.verdict_within, study.verdict_full_exit, study.verdict_min_dim
    out = []
    for set_name in dict.fromkeys(r["set"] for r in rows):
        where = set_title(set_name)
        for comparison in dict.fromkeys(r["comparison"] for r in rows if r["set"] == set_name):
            sel = [r for r in rows if r["set"] == set_name and r["comparison"] == comparison and r["dim"] >= min_dim]
            if comparison.endswith("(full exit)"):
                r = max(sel, key=lambda r: r["dim"])
                ok = "met" if r["mean"] >= -full_gap else "missed"
                out.append(f"- **{comparison}** ({where}, d{r['dim']}): seed-mean Δ {r['mean']:+.2f} "
                           f"(per seed {', '.join(f'{v:+.2f}' for v in r['deltas'])}); goal within {full_gap}: {ok}.")
                continue
            within = sum(r["mean"] >= -within_gap for r in sel)
            narrow = [r for r in sel if r["dim"] <= 128]
            wide = [r for r in sel if r["dim"] > 128]
            out.append(f"- **{comparison}** ({where}, {len(sel)} exits, dims >= {min_dim}): seed-mean Δ within "
                       f"{within_gap} at {within}/{len(sel)} (dims <= 128: "
                       f"{sum(r['mean'] >= -within_gap for r in narrow)}/{len(narrow)}, dims > 128: "
                       f"{sum(r['mean'] >= -within_gap for r in wide)}/{len(wide)}); mean Δ "
                       f"{np.mean([r['mean'] for r in sel]):+.2f}; behind (bootstrap CI below 0) in every seed at "
                       f"{sum(r['seeds_behind'] == len(r['seeds']) for r in sel)}/{len(sel)}, ahead in every seed "
                       f"at {sum(r['seeds_ahead'] == len(r['seeds']) for r in sel)}/{len(sel)}.")
    return out


def table(rows: list[dict], set_name: str, comparison: str, min_dim: int) -> list[str]:
    """Markdown: seed-mean Δ ± std per layer x dim (dims >= ``min_dim``), behind / ahead in every seed marked."""
    sel = {(r["layer"], r["dim"]): r for r in rows if r["set"] == set_name and r["comparison"] == comparison}
    layers = sorted({k for k, _ in sel})
    dims = sorted({d for _, d in sel if d >= min_dim})
    md = ["| layer | " + " | ".join(f"d{d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    for k in layers:
        cells = []
        for d in dims:
            r = sel.get((k, d))
            cells.append("-" if r is None else f"{r['mean']:+.2f} ± {r['std']:.2f}"
                         + (" **" + ("behind" if r["seeds_behind"] == len(r["seeds"]) else "ahead") + "**"
                            if len(r["seeds"]) in (r["seeds_behind"], r["seeds_ahead"]) else ""))
        md.append(f"| L{k} | " + " | ".join(cells) + " |")
    return md


def write_pooled_report(dirs: dict[int, Path], out: Path, report: Path, title: str, main: str,
                        study: StudyConfig, command: str) -> Path:
    """Write ``out/pooled.json`` and the Markdown ``report``; ``main`` is the comparison tabulated per exit.

    Raises:
        ValueError: the seeds share no comparison, or were trained at different learning rates.
    """
    rows = pool(dirs)
    if not rows:
        raise ValueError("--pool: the seed folders share no comparison; are they reports of one study?")
    atomic_write_json(out / "pooled.json", rows)
    seeds = ", ".join(map(str, sorted(dirs)))
    links = ", ".join(f"seed {s}: `{relative_link(d, report)}/`" for s, d in sorted(dirs.items()))
    md = [f"# {title}", "",
          f"Generated by `{command}`; do not edit by hand. Seeds {seeds} ({links}), pooled from each seed's "
          "`comparisons.json`: per exit, the seed-mean of the per-seed deltas ± their std over seeds; **behind** / "
          "**ahead** marks an exit whose per-seed paired bootstrap 95% CI (over pairs) is wholly below / above 0 "
          "in every seed. `t_low`/`t_high` in `pooled.json` is a t interval over seeds. Nothing is re-scored.", "",
          "## Verdicts", "", *verdicts(rows, study), ""]
    for set_name in dict.fromkeys(r["set"] for r in rows):
        for comparison in dict.fromkeys(r["comparison"] for r in rows if r["set"] == set_name):
            if comparison == main or comparison.startswith(main.split(" - ")[0] + " - separate"):
                md += [f"## {set_title(set_name)}: {comparison}, seed-mean Δ ± std", "",
                       *table(rows, set_name, comparison, study.verdict_min_dim), ""]
    atomic_write_text(report, "\n".join(md) + "\n")
    return report
