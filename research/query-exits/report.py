"""Tables of the query-exits study from research/query-exits/results/*.json (what exists; a missing run is
listed as missing), with paired bootstrap 95% CIs over queries (matryoshka2d.evaluation.retrieval_compare).

    python research/query-exits/report.py > research/query-exits/tables.md
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from matryoshka2d.evaluation.retrieval_compare import compare_retrieval
from matryoshka2d.evaluation.retrieval_result import RetrievalResult

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DIMS = (64, 128, 256, 384)
POSTHOC = (("none", "original MiniLM (shared exits, no alignment)"), ("head", "post-hoc: query heads"),
           ("lora", "post-hoc: heads + LoRA r16"),
           ("separate", "baseline: separate query encoder (Wang & Lyu), lr 5e-5"),
           ("separate-lr2e-4", "baseline: separate query encoder, lr 2e-4 (chosen on NFCorpus dev)"))
TRAINED = ("dense-heads", "cross", "align", "score-kd", "all", "full")


def load(name: str) -> RetrievalResult | None:
    path = RESULTS / f"{name}.json"
    return RetrievalResult.load(path) if path.is_file() else None


def seeds(key: str) -> list[RetrievalResult]:
    """Every seed of a run that exists (``KEY-s0.json``, ``KEY-s1.json``, ...)."""
    return [r for s in range(10) if (r := load(f"{key}-s{s}")) is not None]


def seed_mean(results: list[RetrievalResult]) -> RetrievalResult:
    """The seed average: every record's metrics and every query's scores averaged over ``results``."""
    first = results[0]
    records = [{**r, **{m: float(np.mean([res.score(r["set"], r["layer"], r["dim"], m) for res in results]))
                        for m in first.metrics}} for r in first.records]
    per_query = {s: np.mean([res.per_query[s] for res in results], axis=0) for s in first.per_query}
    return RetrievalResult(f"{first.model} (mean of {len(results)} seeds)", records, first.metrics, per_query,
                           first.query_ids, {**first.metadata, "seeds": len(results)})


def headline(set_name: str) -> list[str]:
    """Query exits 1-3 at d384 against the one index: mean ± std over seeds, % of the full exit."""
    base = load("none-s0")
    full = base.score(set_name, 6, 384)
    out = [f"| {set_name} (full exit {full:.2f}) | seeds | L1 | L2 | L3 |", "|---|---|---|---|---|"]
    for key, title in POSTHOC[1:]:
        runs = seeds(key)
        if not runs:
            continue
        cells = []
        for n in (1, 2, 3):
            v = [r.score(set_name, n, 384) for r in runs]
            cells.append(f"{np.mean(v):.2f} ± {np.std(v):.2f} ({100 * np.mean(v) / full:.0f}%)")
        out.append(f"| {title} | {len(runs)} | " + " | ".join(cells) + " |")
    return out


def grid(result: RetrievalResult, set_name: str, base: RetrievalResult, metric: str = "ndcg@10") -> list[str]:
    """Rows per width d: the query exits' scores and their share of the full exit's at the same width."""
    rows = []
    for d in DIMS:
        full = base.score(set_name, 6, d, metric)
        cells = []
        for n in range(1, 6):
            if n in result.layers:
                v = result.score(set_name, n, d, metric)
                cells.append(f"{v:.2f} ({100 * v / full:.0f}%)")
            else:
                cells.append("-")
        rows.append(f"| d{d} | " + " | ".join(cells) + " |")
    return rows


def posthoc(set_name: str) -> list[str]:
    base = load("none-s0")
    if base is None:
        return ["(the unaligned run none-s0 is missing)"]
    out = []
    for metric in ("ndcg@10", "recall@100"):
        widths = ", ".join(f"d{d} {base.score(set_name, 6, d, metric):.2f}" for d in DIMS)
        out += [f"#### {set_name} test, {metric} x100 of queries at exit n against the ONE layer-6 index "
                f"(the full exit: {widths}; in brackets, % of the full exit at the same width)", ""]
        for key, title in POSTHOC:
            res = load(f"{key}-s0")
            if res is None:
                out += [f"- {title}: not run", ""]
                continue
            out += [f"{title}:", "", "| dim | L1 | L2 | L3 | L4 | L5 |", "|---|---|---|---|---|---|",
                    *grid(res, set_name, base, metric), ""]
    return out


def cis(a: str, b: str) -> list[str]:
    """Paired bootstrap over queries of the seed-averaged per-query scores of runs ``a`` and ``b``."""
    ra, rb = seeds(a), seeds(b)
    if not ra or not rb:
        return [f"({a} vs {b}: a run is missing)"]
    comp = compare_retrieval([seed_mean(ra), seed_mean(rb)], [f"{a} ({len(ra)} seeds)", f"{b} ({len(rb)} seeds)"],
                             draws=1000)
    return ["```", comp.to_markdown(), "```"]


def trained() -> list[str]:
    out = ["| run (seed 0) | exit | one-index nDCG@10 d384 (% of its full exit) | symmetric nDCG@10 d384 |",
           "|---|---|---|---|"]
    for name in TRAINED:
        one, sym = load(f"trained-{name}-s0-one-index"), load(f"trained-{name}-s0-symmetric")
        if one is None:
            out.append(f"| {name} | - | not run | - |")
            continue
        full = one.score("scifact", 6, 384)
        for n in one.layers:
            v = one.score("scifact", n, 384)
            s = sym.score("scifact", n, 384) if sym is not None else float("nan")
            out.append(f"| {name} | {n} | {v:.2f} ({100 * v / full:.0f}%) | {s:.2f} |")
    return out


def main() -> None:
    lines = ["# Query exits: tables", "", "Generated by `python research/query-exits/report.py`.", "",
             "## Headline: queries at exits 1-3 against the ONE layer-6 index, nDCG@10 x100 at d384, mean ± std "
             "over seeds", ""]
    for s in ("scifact", "nfcorpus"):
        lines += [*headline(s), ""]
    lines += ["## Post-hoc alignment of all-MiniLM-L6-v2 (seed 0), every width", ""]
    for s in ("scifact", "nfcorpus"):
        lines += posthoc(s)
    lines += ["## LoRA vs the separate query encoders, paired bootstrap over queries (seed-averaged scores)", "",
              *cis("lora", "separate-lr2e-4"), "",
              *cis("lora", "separate"),
              "", "## Shared-space training on SciFact train (seed 0), SciFact test", "", *trained(), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
