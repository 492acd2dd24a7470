"""Retrieval-trained exits against separately trained models of the same depth (issue 14 item 4, issue 19 item 4).

Reads ``m2d eval`` retrieval results (JSON + ``.preds.npz``) of one model per strategy and of one separately
trained model per depth (``--separate 1=PATH,2=PATH,...``), and writes a Markdown report: nDCG@10 at every
exit for each strategy, and each strategy minus the separate model of that depth at dims >= 64 with a paired
bootstrap CI over queries (``compare_retrieval``: the same resamples for both models). Usage::

    R=research/results
    python benchmarks/retrieval_trained.py --set scifact \\
        --models original=$R/retrieval-minilm.json,full=$R/retrieval-scifact-full.json,... \\
        --separate 2=$R/retrieval-scifact-separate-l2.json,3=... --output $R/retrieval-scifact-trained.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka2d.evaluation.retrieval_compare import compare_retrieval  # noqa: E402
from matryoshka2d.evaluation.retrieval_result import RetrievalResult  # noqa: E402

MIN_DIM = 64  # the goal of issue 19 counts exits at dims >= 64
MARGIN = 1.0  # "within 1.0 of the separate model"


def parse_pairs(text: str) -> dict[str, str]:
    """``a=PATH,b=PATH`` -> ``{"a": PATH, "b": PATH}``."""
    out = {}
    for item in text.split(","):
        key, sep, path = item.partition("=")
        if not sep or not key.strip() or not path.strip():
            raise SystemExit(f"bad item {item!r}: pass label=path pairs separated by commas")
        out[key.strip()] = path.strip()
    return out


def report(set_name: str, models: dict[str, RetrievalResult], separate: dict[int, RetrievalResult], *,
           draws: int, seed: int) -> tuple[str, dict]:
    """The Markdown report and its JSON summary."""
    ref = next(iter(models.values()))
    layers, dims = ref.layers, ref.dims
    lines = [f"## {set_name}: nDCG@10 x100 at every exit (n={ref.n_pairs(set_name)} test queries)", ""]
    header = ["layer", "dim", *models, *(["separate"] if separate else [])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for n in layers:
        for d in dims:
            cells = [str(n), str(d)] + [f"{r.score(set_name, n, d):.2f}" for r in models.values()]
            if separate:
                sep = separate.get(n)
                cells.append(f"{sep.score(set_name, n, d):.2f}" if sep and d in sep.dims else "—")
            lines.append("| " + " | ".join(cells) + " |")
    summary: dict = {"set": set_name, "draws": draws, "seed": seed, "vs_separate": {}}
    if separate:
        lines += ["", f"## {set_name}: each model minus the separate model of its depth, dims >= {MIN_DIM}", "",
                  f"Δ nDCG@10 x100 with a 95% paired bootstrap CI over queries ({draws} draws); "
                  f"'ok' = Δ >= -{MARGIN} (within {MARGIN} of, or ahead of, the separate model).", ""]
        header = ["layer", "dim", "separate", *(f"Δ {m}" for m in models)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        counts = {m: [0, 0] for m in models}
        for n, sep in sorted(separate.items()):
            comps = {m: compare_retrieval([sep, r], ["separate", m], draws=draws, seed=seed)
                     for m, r in models.items()}
            for d in [d for d in dims if d >= MIN_DIM and d in sep.dims]:
                cells = [str(n), str(d), f"{sep.score(set_name, n, d):.2f}"]
                for m, comp in comps.items():
                    ci = comp.cis[(0, 1)][(set_name, n, d)]
                    ok = ci["delta"] >= -MARGIN
                    counts[m][0] += ok
                    counts[m][1] += 1
                    cells.append(f"{ci['delta']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]" + (" ok" if ok else ""))
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Exits within 1.0 of (or ahead of) the separate model: "
                  + "; ".join(f"{m} {k}/{t}" for m, (k, t) in counts.items()) + "."]
        summary["vs_separate"] = {m: {"within": k, "exits": t} for m, (k, t) in counts.items()}
    return "\n".join(lines) + "\n", summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", required=True, help="the retrieval set, e.g. scifact")
    parser.add_argument("--models", required=True, help="label=result.json,... (one per strategy)")
    parser.add_argument("--separate", default="", help="depth=result.json,... (separately trained models)")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the Markdown here (+ .json summary beside it)")
    args = parser.parse_args()
    models = {k: RetrievalResult.load(v) for k, v in parse_pairs(args.models).items()}
    separate = {int(k): RetrievalResult.load(v) for k, v in parse_pairs(args.separate).items()} if args.separate \
        else {}
    text, summary = report(args.set, models, separate, draws=args.draws, seed=args.seed)
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        Path(args.output).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
