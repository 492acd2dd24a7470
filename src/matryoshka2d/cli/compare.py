"""``m2d compare A.json B.json``: side-by-side exits with paired bootstrap CIs of the differences."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare m2d eval results, with paired bootstrap CIs per exit")
    p.add_argument("results", nargs="+", help="two or more results JSON files written by m2d eval --output")
    p.add_argument("--labels", default=None, help="comma-separated short names (default: model names)")
    p.add_argument("--output", default=None, help="write the Markdown report here")
    p.add_argument("--plot", default=None, help="write Spearman-vs-dim curves (one panel per model)")
    p.add_argument("--plot-set", default=None, help="set of the plots (default: 7-set avg, else the first)")
    p.add_argument("--benchmark", default=None, help="benchmark JSON (records) for --pareto")
    p.add_argument("--pareto", default=None, help="write the quality-vs-speed plot of the first result here")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples (0 = no bootstrap)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval mass")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--metric", default=None,
                   help="metric compared (default: the results' headline, Spearman or nDCG@10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import contextlib

    from matryoshka2d.io.locks import claim_output

    outputs = [p for p in (args.output, args.plot, args.pareto) if p]
    if len({Path(p).resolve() for p in outputs}) < len(outputs):
        raise ValueError(f"--output, --plot and --pareto must be different files (got {', '.join(outputs)})")
    with contextlib.ExitStack() as stack:
        for flag in ("output", "plot", "pareto"):
            stack.enter_context(claim_output(getattr(args, flag), overwrite=args.overwrite, flag=f"--{flag}"))
        return compare(args)


def compare(args: argparse.Namespace) -> int:
    """The work of ``m2d compare`` once its outputs are locked."""
    from matryoshka2d.cli.common import check_plot_path
    from matryoshka2d.evaluation.compare import compare_results
    from matryoshka2d.evaluation.result import load_result
    from matryoshka2d.io.atomic import atomic_write_text
    from matryoshka2d.io.outputs import save_or_rescue

    if args.draws < 0:
        raise ValueError(f"--draws {args.draws} must be >= 0 (0 skips the bootstrap)")
    if bool(args.benchmark) != bool(args.pareto):
        raise ValueError("--benchmark and --pareto go together: pass both to draw the quality-vs-speed plot")
    check_plot_path(args.plot)
    check_plot_path(args.pareto, flag="--pareto")
    results = [load_result(path) for path in args.results]
    if args.labels:
        labels = [s.strip() for s in args.labels.split(",")]
        if len(labels) != len(results):
            raise ValueError(f"--labels has {len(labels)} names for {len(results)} results")
    else:
        labels = [r.model for r in results]
        if max(Counter(labels).values()) > 1:  # same model name twice: use the file names
            labels = [Path(p).stem for p in args.results]
    comparison = compare_results(results, labels, metric=args.metric, draws=args.draws, seed=args.seed,
                                 confidence=args.confidence, show_progress_bar=not args.quiet)
    report = comparison.to_markdown()
    print(report)
    if args.output:
        save_or_rescue(args.output, lambda path: atomic_write_text(path, report), what="report")
        print(f"wrote {args.output}")
    if args.plot:
        from matryoshka2d.evaluation.plots import plot_dim_curves

        save_or_rescue(args.plot, lambda path: plot_dim_curves(results, path, labels=labels, set_name=args.plot_set,
                                                               metric=comparison.metric), what="plot")
        print(f"wrote {args.plot}")
    if args.pareto:
        from matryoshka2d.evaluation.plots import plot_pareto

        save_or_rescue(args.pareto, lambda path: plot_pareto(results[0], args.benchmark, path,
                                                             set_name=args.plot_set, metric=comparison.metric),
                       what="plot")
        print(f"wrote {args.pareto}")
    return 0
