"""Tables of the query-exits study from research/query-exits/results/*.json (what exists; a missing run is
listed as missing), with paired bootstrap 95% CIs over queries (matryoshka2d.evaluation.retrieval_compare).

    python research/query-exits/report.py > research/query-exits/tables.md
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from choose_lr import dev_score  # research/query-exits/choose_lr.py, beside this script

from matryoshka2d.evaluation.retrieval_compare import compare_retrieval
from matryoshka2d.evaluation.retrieval_result import RetrievalResult

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DIMS = (64, 128, 256, 384)
POSTHOC = (("none", "original MiniLM (shared exits, no alignment)"), ("head", "post-hoc: query heads, lr 1e-3"),
           ("lora-lr3e-4", "post-hoc: heads + LoRA r16, lr 3e-4"), ("lora", "post-hoc: heads + LoRA r16, lr 1e-3"),
           ("lora-lr3e-3", "post-hoc: heads + LoRA r16, lr 3e-3"),
           ("lora-lr1e-2", "post-hoc: heads + LoRA r16, lr 1e-2"),
           ("separate", "baseline: separate query encoder (Wang & Lyu), lr 5e-5"),
           ("separate-lr2e-4", "baseline: separate query encoder, lr 2e-4"),
           ("separate-lr5e-4", "baseline: separate query encoder, lr 5e-4"))
TRAINED = ("dense-heads", "dense-heads+lora", "dense-heads+lora-lr0.003", "cross", "align", "score-kd", "all", "full")


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


def trained_runs(name: str, kind: str) -> list[RetrievalResult]:
    """Every seed of a trained row; ``dense-heads+lora`` keeps dense-heads' documents, so its symmetric grid."""
    if kind == "symmetric":
        name = name.split("+")[0]
    return [r for s in range(10) if (r := load(f"trained-{name}-s{s}-{kind}")) is not None]


def mean_score(runs: list[RetrievalResult], set_name: str, n: int, d: int) -> tuple[float, float]:
    v = [r.score(set_name, n, d) for r in runs]
    return float(np.mean(v)), float(np.std(v))


def trained(set_name: str) -> list[str]:
    """Every trained row, seed mean ± std: one index (query exits vs the run's own full-exit documents), then
    the symmetric grid, at d64 and d384."""
    out = []
    for kind in ("one-index", "symmetric"):
        for d in (384, 64):
            what = ("queries at exit n against the run's ONE full-exit index (% of that full exit)"
                    if kind == "one-index" else "queries and documents at the same exit n")
            out += [f"#### {set_name} test, nDCG@10 x100 at d{d}: {what}", "",
                    "| run | seeds | L1 | L2 | L3 | L4 | L5 | L6 |", "|---|---|---|---|---|---|---|---|"]
            for name in TRAINED:
                runs = trained_runs(name, kind)
                if not runs or set_name not in runs[0].sets:
                    out.append(f"| {name} | 0 | not run |  |  |  |  |  |")
                    continue
                full = mean_score(runs, set_name, 6, d)[0]
                cells = []
                for n in range(1, 7):
                    if n not in runs[0].layers:
                        cells.append("-")
                        continue
                    m, sd = mean_score(runs, set_name, n, d)
                    share = f" ({100 * m / full:.0f}%)" if kind == "one-index" and n < 6 else ""
                    cells.append(f"{m:.2f} ± {sd:.2f}{share}" if len(runs) > 1 else f"{m:.2f}{share}")
                out.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
            out.append("")
    return out + trained_goals(set_name)


def trained_goals(set_name: str) -> list[str]:
    """The two guards of the shared-space goals: the full exit against plain fine-tuning (``full``), and the
    worst symmetric cell (exits 1-6, d64-d384) against today's dense + heads."""
    full_runs, base = trained_runs("full", "one-index"), trained_runs("dense-heads", "symmetric")
    out = [f"Guards on {set_name} (seed means): full exit minus `full`'s; worst symmetric cell (exits 1-6, "
           "d64-d384) minus dense + heads'", ""]
    for name in TRAINED:
        one, sym = trained_runs(name, "one-index"), trained_runs(name, "symmetric")
        if not one or not full_runs or not base or set_name not in one[0].sets:
            continue
        gap = mean_score(one, set_name, 6, 384)[0] - mean_score(full_runs, set_name, 6, 384)[0]
        worst = min((mean_score(sym, set_name, n, d)[0] - mean_score(base, set_name, n, d)[0], n, d)
                    for n in range(1, 7) for d in DIMS)
        out.append(f"- {name}: full exit {gap:+.2f}; worst symmetric cell {worst[0]:+.2f} (L{worst[1]} d{worst[2]})")
    return [*out, ""]


def lr_choice() -> list[str]:
    """Seed 0 of every learning rate run, scored by choose_lr.py's rule (NFCorpus dev, exits 1-3, d64-d384)."""
    out = ["| method | lr | NFCorpus dev nDCG@10, mean of exits 1-3 x d64-d384 | chosen |", "|---|---|---|---|"]
    for method in ("lora", "separate"):
        runs = [r for path in sorted(RESULTS.glob(f"{method}-*s0.json"))  # lora-s0.json and lora-lr3e-3-s0.json
                if "nfcorpus-dev" in (r := RetrievalResult.load(path)).sets]
        scored = sorted(((dev_score(r), r.metadata["align"]["lr"]) for r in runs), key=lambda x: x[1])
        best = max(scored)[1] if scored else None
        out += [f"| {method} | {lr:g} | {score:.2f} | {'yes' if lr == best else ''} |" for score, lr in scored]
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
              "LoRA at its chosen lr (3e-3, 3 seeds) against the separate encoders at theirs (5e-4, seed 0 only):",
              "", *cis("lora-lr3e-3", "separate-lr5e-4"), "",
              "LoRA at its chosen lr (3e-3) against the separate encoders at 2e-4, 3 seeds each:", "",
              *cis("lora-lr3e-3", "separate-lr2e-4"), "",
              "LoRA at the earlier default lr (1e-3) against the separate encoders at 2e-4, 3 seeds each:", "",
              *cis("lora", "separate-lr2e-4"),
              "", "## The post-hoc LoRA learning rate, chosen on NFCorpus dev (research/query-exits/choose_lr.py)",
              "", *lr_choice(), "",
              "## Shared-space training on SciFact train (SciFact test in domain, NFCorpus test as transfer)", ""]
    for s in ("scifact", "nfcorpus"):
        lines += trained(s)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
