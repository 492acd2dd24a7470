"""``m2d bench MODEL``: encoding throughput of every exit (physically truncated), optionally against a peer."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from matryoshka2d.cli.common import add_model_args, check_plot_path, int_list, load_model
from matryoshka2d.vocab import ATTENTIONS, BACKENDS, DTYPE_NAMES, PEERS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time encode at every exit (truncated models), optionally vs a peer")
    add_model_args(p)
    p.add_argument("--layers", default="all", help="exits to time, e.g. 1,3,6 or 'all' (full depth is always timed)")
    p.add_argument("--dims", default=None, help="embedding dims to time, e.g. 64,384 (default: full width)")
    p.add_argument("--batch-sizes", default="32,128", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="fp32", help=f"comma-separated: {', '.join(DTYPE_NAMES)} (e.g. fp32,bf16)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="measure fp32 in place of a dtype the device cannot run (default: error)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd copies of our models (impl matryoshka2d+compile)")
    p.add_argument("--attention", default="auto", choices=ATTENTIONS,
                   help="our models' attention kernel (auto: eager for bf16/fp16 on CPU, the model's default "
                        "otherwise); the peer keeps its default")
    p.add_argument("--sentences", default="stsb",
                   help="a .txt/.tsv/.csv/.jsonl file or an STS set name (default: stsb, the unique STS-B test "
                        "sentences, which also gives each exit's STS-B Spearman)")
    p.add_argument("--column", default=None, help="column of a .tsv/.csv/.jsonl sentence file")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every configuration once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, for both implementations")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--peer", default=None,
                   help=f"comma list of peers timed on the same exits: {', '.join(PEERS)} (the ONNX / OpenVINO "
                        "ones run in a venv the benchmark makes once under ~/.cache/matryoshka2d)")
    p.add_argument("--backends", default="torch",
                   help=f"comma list of our backends: {', '.join(BACKENDS)} (onnx/openvino export each exit; "
                        "int8 only when named)")
    p.add_argument("--output", default=None, help="write meta, records and targets as JSON here")
    p.add_argument("--targets", action="store_true",
                   help="also print the project's own speed goals (issues 5 and 28) and whether this run met them")
    p.add_argument("--plot", default=None, help="write a throughput-per-layer PNG here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output / --plot files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.locks import claim_output

    if args.output and args.plot and Path(args.output).resolve() == Path(args.plot).resolve():
        raise ValueError(f"--output and --plot are the same file ({args.output}); give each its own path")
    with claim_output(args.output, overwrite=args.overwrite), \
            claim_output(args.plot, overwrite=args.overwrite, flag="--plot"):
        return benchmark(args)


def benchmark(args: argparse.Namespace) -> int:
    """The work of ``m2d bench`` once its outputs are claimed."""
    from matryoshka2d.bench.peers import require_peer
    from matryoshka2d.bench.runner import run_benchmark
    from matryoshka2d.bench.settings import BenchmarkSettings, resolve_dtypes
    from matryoshka2d.data.datasets import load_sts, read_sentences
    from matryoshka2d.encoder.devices import check_device
    from matryoshka2d.io.atomic import atomic_write_json
    from matryoshka2d.io.outputs import save_or_rescue

    check_device(args.device)
    settings = BenchmarkSettings(
        batch_sizes=int_list(args.batch_sizes, name="batch size", upper=1 << 20, allow_all=False),
        dtypes=[d.strip().lower() for d in args.dtype.split(",") if d.strip()],
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, peer=args.peer, device=args.device,
        backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        allow_fallback=args.allow_fallback, compile=args.compile, attention=args.attention,
    )
    resolve_dtypes(settings)  # fail before loading anything
    if "sentence-transformers" in settings.peers:
        require_peer()
    check_plot_path(args.plot)
    sentences = read_sentences(args.sentences, column=args.column)
    if not sentences:
        raise ValueError(f"{args.sentences} holds no sentences; pass a file with one sentence per line, or 'stsb'")
    model = load_model(args)
    settings.layers = int_list(args.layers, name="layer", upper=model.num_layers)
    settings.dims = int_list(args.dims, name="dim", upper=model.hidden_size) if args.dims else None
    stsb = load_sts("stsb") if args.sentences == "stsb" else None
    result = run_benchmark(model, sentences, settings, peer_source=args.model, stsb=stsb,
                           meta={"command": _command_line(args), "sentences_source": args.sentences})
    print(result.to_markdown())
    print()
    print(result.to_markdown_all())
    if args.targets:
        print_targets(result, args.repeats)
    if args.output:
        record = {**result.to_dict(), "targets_cpu": result.targets("cpu")}
        save_or_rescue(args.output, lambda path: atomic_write_json(path, record), what="benchmark results")
        print(f"wrote {args.output}")
    if args.plot:
        from matryoshka2d.evaluation.plots import plot_benchmark

        save_or_rescue(args.plot, lambda path: plot_benchmark(result, path), what="plot")
        print(f"wrote {args.plot}")
    return 0


def print_targets(result, rounds: int) -> None:  # noqa: ANN001
    """The project's speed goals, measured over ``rounds`` timed rounds (medians of per-round ratios)."""
    print(f"\nthe project's speed goals, medians over {rounds} timed round{'s' * (rounds != 1)}"
          + (" (few rounds: a noisy look; use --repeats 5 or more before judging)" if rounds < 3 else "") + ":")
    for t in result.peer_targets():
        print(f"  wall time, batch {t['batch_size']}, {t['target']}: {t['value']:.2f} (goal >= {t['goal']}): "
              f"{'met' if t['met'] else 'not met'}")
    for metric in ("wall", "cpu"):
        for t in result.targets(metric):
            print(f"  {metric} time, batch {t['batch_size']}, {t['target']}: {t['value']:.2f} (goal >= {t['goal']}): "
                  f"{'met' if t['met'] else 'not met'}")


def _command_line(args: argparse.Namespace) -> str:
    """The ``m2d bench`` command that reproduces this run."""
    parts = ["m2d", "bench", str(args.model)]
    for flag in ("layers", "dims", "batch_sizes", "dtype", "sentences", "column", "repeats", "warmup", "threads",
                 "device", "peer", "backends", "attention", "pooling", "output", "plot"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    parts += [f"--{f.replace('_', '-')}" for f in ("allow_fallback", "compile") if getattr(args, f)]
    return " ".join(parts)
