"""``m2d eval MODEL --sets all --layers all --dims all``: STS correlations (and BEIR retrieval) of every exit."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from matryoshka2d.cli.common import add_model_args, check_plot_path, int_list, load_model
from matryoshka2d.cli.eval_retrieval import add_retrieval_args, run_retrieval
from matryoshka2d.vocab import METRICS, STS_VARIANTS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="STS Spearman/Pearson of every (layer, dim) exit, one model pass per set")
    add_model_args(p)
    p.add_argument("--sets", default="all",
                   help="comma-separated: sts12,sts13,sts14,sts15,sts16,stsb,sickr, or 'all' (default); "
                        "retrieval sets scifact,nfcorpus too, or a BEIR folder (corpus, queries, qrels/<split>)")
    p.add_argument("--layers", default="all", help="exit layers, e.g. 2,4,6, or 'all' (default)")
    p.add_argument("--dims", default="all", help="dims, e.g. 64,384, or 'all' (8, 16, ... and D; default)")
    p.add_argument("--split", default="test", help="split (train/dev only exist for stsb and sickr)")
    p.add_argument("--variant", choices=STS_VARIANTS, default="original",
                   help="original text or SentEval's tokenised text")
    p.add_argument("--data-dir", default=None,
                   help="data folder (default: $M2D_DATA_DIR, ./data, ../shared/data)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--metric", choices=METRICS, default="spearman",
                   help="metric of the printed tables")
    p.add_argument("--output", default=None, help="write results JSON (+ <name>.preds.npz for m2d compare)")
    p.add_argument("--plot", default=None, help="write a layer x dim heatmap per set (PNG/PDF/SVG)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output / --plot files")
    add_retrieval_args(p)
    p.set_defaults(func=run)


def parse_sets(text: str) -> list[str]:
    """``"stsb,sickr"``, ``"all"`` or BEIR folder paths -> set names and folders (checked)."""
    from matryoshka2d.data.beir import BEIR_SETS
    from matryoshka2d.data.datasets import STS_SETS

    if text.strip().lower() == "all":
        return list(STS_SETS)
    items = [s.strip() for s in text.split(",") if s.strip()]
    names = [s if is_beir_folder(s) else s.lower() for s in items]
    unknown = [s for s in names if s not in STS_SETS and s not in BEIR_SETS and not is_beir_folder(s)]
    if unknown or not names:
        raise ValueError(f"--sets {text!r}: unknown set(s) {unknown}; choose from {', '.join(STS_SETS)} "
                         f"or 'all', the retrieval sets {', '.join(BEIR_SETS)}, or a BEIR folder (holding "
                         "corpus.tsv, queries.tsv and qrels/)")
    return list(dict.fromkeys(names))


def is_beir_folder(item: str) -> bool:
    """Whether ``item`` is a folder path holding a BEIR set (a ``qrels/`` folder)."""
    from matryoshka2d.data.beir import BEIR_SETS, is_beir_source

    return item.lower() not in BEIR_SETS and Path(item).expanduser().is_dir() and is_beir_source(item)


def parse_dims(text: str, hidden_size: int) -> list[int]:
    """``"all"`` -> the Matryoshka dims of ``hidden_size``, else integers within ``1..hidden_size``."""
    from matryoshka2d.encoder.model import matryoshka_dims

    if text.strip().lower() == "all":
        return matryoshka_dims(hidden_size)
    return int_list(text, name="dim", upper=hidden_size, allow_all=False)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.locks import claim_output

    if args.output and args.plot and Path(args.output).resolve() == Path(args.plot).resolve():
        raise ValueError(f"--output and --plot are the same file ({args.output}); give each its own path")
    with claim_output(args.output, overwrite=args.overwrite), \
            claim_output(args.plot, overwrite=args.overwrite, flag="--plot"):
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    """The work of ``m2d eval`` once its outputs are claimed."""
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.evaluation.grid import evaluate_grid
    from matryoshka2d.io.outputs import save_or_rescue

    check_plot_path(args.plot)
    from matryoshka2d.data.beir import BEIR_SETS

    names = parse_sets(args.sets)
    beir = [name for name in names if name in BEIR_SETS or is_beir_folder(name)]
    names = [name for name in names if name not in beir]
    sets = {name: load_sts(name, args.split, variant=args.variant, data_dir=args.data_dir) for name in names}
    model = load_model(args)
    layers = int_list(args.layers, name="layer", upper=model.num_layers)
    dims = parse_dims(args.dims, model.hidden_size)
    if beir:
        run_retrieval(args, beir, model, layers, dims, mixed=bool(sets))
        if not sets:
            return 0
    start = time.perf_counter()
    result = evaluate_grid(model, sets, layers=layers, dims=dims, batch_size=args.batch_size,
                           show_progress_bar=not args.quiet, model_name=args.model)
    seconds = time.perf_counter() - start
    result.metadata.update(split=args.split, variant=args.variant, wall_s=round(seconds, 3))
    print(result.to_markdown(args.metric))
    sentences = sum(t["sentences"] for t in result.metadata["timings"].values())
    print(f"evaluated {len(layers)} layers x {len(dims)} dims on {len(sets)} set(s) "
          f"({sentences} unique sentences, one pass per set) in {seconds:.1f}s")
    if args.output:
        save_or_rescue(args.output, result.save, what="evaluation results")
        print(f"wrote {args.output}")
    if args.plot:
        from matryoshka2d.evaluation.plots import plot_heatmaps

        save_or_rescue(args.plot, lambda path: plot_heatmaps(result, path, metric=args.metric), what="plot")
        print(f"wrote {args.plot}")
    return 0
