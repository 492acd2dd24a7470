"""The retrieval half of ``m2d eval``: BEIR sets (``--sets scifact,nfcorpus``), alone or next to STS sets.

Not a subcommand of its own; :mod:`matryoshka2d.cli.eval` calls :func:`run_retrieval` for the BEIR names in
``--sets``. With STS sets in the same call, ``--output res.json`` / ``--plot grid.png`` hold the STS grid
and the retrieval grid goes to ``res.retrieval.json`` / ``grid.retrieval.png`` beside them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from matryoshka2d.cli.common import add_input_type_arg

logger = logging.getLogger(__name__)


def add_retrieval_args(parser: argparse.ArgumentParser) -> None:
    """The retrieval flags of ``m2d eval``."""
    parser.add_argument("--asymmetric", default=None,
                        help="retrieval sets: also score queries at every layer against documents at every "
                             "layer at these dims (e.g. 64,384): a query-layer x doc-layer matrix")
    parser.add_argument("--doc-layer", type=int, default=None,
                        help="retrieval sets: score queries at every --layers exit against ONE index of documents "
                             "encoded at this layer (search as it is used: one index, every query budget)")
    add_input_type_arg(parser, default="query", when="with --doc-layer, the queries: ")
    parser.add_argument("--ignore-identical-ids", action=argparse.BooleanOptionalAction, default=True,
                        help="retrieval sets: leave a document whose id equals the query's id out of its ranking "
                             "(BEIR's and MTEB's default; recorded in the result)")
    parser.add_argument("--retrieval-metric", default="ndcg@10",
                        help="metric of the printed retrieval tables and plots (ndcg@10, recall@100, mrr@10, "
                             "map@100)")


def sibling_path(path: str, tag: str = "retrieval") -> str:
    """``res.json`` -> ``res.retrieval.json``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{tag}{p.suffix}"))


def retrieval_outputs(args: argparse.Namespace, mixed: bool) -> tuple[str | None, str | None]:
    """Where the retrieval result and plot go (beside the STS ones when ``mixed``)."""
    out = sibling_path(args.output) if (args.output and mixed) else args.output
    plot = sibling_path(args.plot) if (args.plot and mixed) else args.plot
    return out, plot


def run_retrieval(args: argparse.Namespace, names: list[str], model: object, layers: list[int], dims: list[int],
                  mixed: bool) -> None:
    """Evaluate the BEIR sets ``names``, print the tables, write ``--output`` / ``--plot``.

    Raises:
        ValueError: a bad ``--asymmetric`` dim or metric; FileNotFoundError: missing data.
    """
    import contextlib
    import time

    from matryoshka2d.cli.common import int_list
    from matryoshka2d.data.beir import load_beir
    from matryoshka2d.evaluation.retrieval import RETRIEVAL_METRICS, evaluate_retrieval
    from matryoshka2d.io.locks import claim_output
    from matryoshka2d.io.outputs import save_or_rescue

    metric = args.retrieval_metric
    if metric not in RETRIEVAL_METRICS:
        raise ValueError(f"--retrieval-metric {metric!r} is not one of {list(RETRIEVAL_METRICS)}")
    asym = int_list(args.asymmetric, name="--asymmetric dim", upper=model.hidden_size,  # type: ignore[attr-defined]
                    allow_all=False) if args.asymmetric else None
    if asym and any(d not in dims for d in asym):
        raise ValueError(f"--asymmetric dims {asym} must be among --dims {dims}")
    out, plot = retrieval_outputs(args, mixed)
    with contextlib.ExitStack() as stack:
        if mixed:  # the .retrieval.json / .png beside the STS outputs (run() claimed those)
            for path, flag in ((out, "--output"), (plot, "--plot")):
                stack.enter_context(claim_output(path, overwrite=args.overwrite, flag=flag))
        sets = [load_beir(name, args.split, data_dir=args.data_dir) for name in names]
        start = time.perf_counter()
        if args.doc_layer is not None:
            if asym:
                raise ValueError("--asymmetric and --doc-layer are two views of asymmetric search; pass one")
            from matryoshka2d.evaluation.query_exits import evaluate_query_exits

            result = evaluate_query_exits(model, {s.name: s for s in sets}, layers=layers, dims=dims,
                                          doc_layer=args.doc_layer, input_type=args.input_type,
                                          batch_size=args.batch_size, show_progress_bar=not args.quiet,
                                          model_name=args.model, ignore_identical_ids=args.ignore_identical_ids)
            print(f"queries at every exit ({args.input_type}) against one index of documents at layer "
                  f"{result.metadata['doc_layer']}; rows are query layers")
        else:
            result = evaluate_retrieval(model, sets, layers=layers, dims=dims, asymmetric_dims=asym,
                                        batch_size=args.batch_size, show_progress_bar=not args.quiet,
                                        model_name=args.model, ignore_identical_ids=args.ignore_identical_ids)
        seconds = time.perf_counter() - start
        result.metadata.update(wall_s=round(seconds, 3))
        print(result.to_markdown(metric))
        held = {k: v.get("bytes_held", 0) for k, v in result.metadata["timings"].items()}
        print(f"evaluated {len(layers)} layers x {len(dims)} dims on {len(sets)} retrieval set(s) in {seconds:.1f}s "
              f"(one pass per text; vectors held: " + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in held.items())
              + ")")
        if out:
            save_or_rescue(out, result.save, what="retrieval results")
            print(f"wrote {out}")
        if plot:
            from matryoshka2d.evaluation.plots import plot_heatmaps

            save_or_rescue(plot, lambda path: plot_heatmaps(result, path, metric=metric), what="plot")  # type: ignore[arg-type]
            print(f"wrote {plot}")
