"""``python -m matryoshka2d.demo`` (``make demo``): train a 2D Matryoshka model, then see what an exit buys.

1. Trains the offline all-MiniLM-L6-v2 on STS-B train with the ``2dmse`` objective for a short budget and
   prints the STS-B test Spearman of its layer x dim exits, original -> trained.
2. Encodes the same texts (the STS-B test sentences) at a shallow exit and at the full exit, with the
   speed of each, and runs one search over them at each exit.

About 3 minutes on a quiet 2-core machine (most of it training), longer on a busy one; the run is written to
``runs/demo`` (replaced on every call).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from matryoshka2d.logs import setup_logging

logger = logging.getLogger(__name__)

QUIET_MINUTES = 3  # measured: 174 s for the training part on a quiet 2-core machine, install excluded
QUERY = "Someone strums an acoustic guitar on stage."  # not one of the STS-B test sentences


def side_by_side(before: Any, after: Any, set_name: str) -> str:
    """A markdown table: one row per layer, ``original -> trained (change)`` per dim."""
    dims = after.dims
    lines = [f"STS-B test Spearman x100 ({set_name}): original -> 2dmse-trained (change)", "",
             "| layer | " + " | ".join(f"d={d}" for d in dims) + " |", "|---:|" + "---:|" * len(dims)]
    for n in after.layers:
        cells = []
        for d in dims:
            a, b = before.spearman(set_name, n, d), after.spearman(set_name, n, d)
            cells.append(f"{a:.1f} -> {b:.1f} ({b - a:+.1f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def what_an_exit_buys(model: Any, texts: list[str], exits: list[tuple[int, int]], grid: Any, set_name: str,
                      query: str = QUERY) -> str:
    """Encode ``texts`` at each exit (timed), then search them for ``query`` at each exit: a few lines."""
    lines = [f"What an exit buys: the same {len(texts)} texts at each exit, and one search for {query!r}", ""]
    hits: dict[tuple[int, int], list[int]] = {}
    for layer, dim in exits:
        start = time.perf_counter()
        docs = model.encode(texts, layer=layer, dim=dim, batch_size=64)
        seconds = time.perf_counter() - start
        q = model.encode([query], layer=layer, dim=dim)[0]
        top = np.argsort(-(docs @ q), kind="stable")[:3]
        hits[(layer, dim)] = [int(i) for i in top]
        lines.append(f"- layer {layer}, dim {dim}: {len(texts) / seconds:,.0f} texts/s ({seconds:.1f} s), "
                     f"STS-B Spearman {grid.spearman(set_name, layer, dim):.1f}, {dim * 4} bytes a vector; "
                     f"top hit: {texts[top[0]]!r} ({float(docs[top[0]] @ q):.2f})")
    first, *rest = exits
    for other in rest:
        same = len(set(hits[first]) & set(hits[other]))
        lines.append(f"- the top 3 at layer {first[0]} and at layer {other[0]} share {same} of 3 texts")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matryoshka2d.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--dims", default="32,64,128,384", help="dims of the printed table")
    parser.add_argument("--exit", default="2:128", metavar="LAYER:DIM", help="the shallow exit to compare")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--data-dir", default=None, help="folder holding stsb/ (default: the shared data)")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    dims = [int(d) for d in args.dims.split(",")]
    shallow = tuple(int(v) for v in args.exit.split(":"))
    print(f"matryoshka2d demo: about {QUIET_MINUTES} minutes on a quiet 2-core machine (most of it training "
          f"{args.steps} steps), longer on a busy one.", flush=True)

    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.evaluation.grid import evaluate_grid
    from matryoshka2d.training.config import Config
    from matryoshka2d.training.loop import train

    config = Config().replace({
        "model.name": "minilm", "model.max_seq_length": args.max_seq_length, "data.source": "stsb",
        "data.data_dir": args.data_dir, "objective.strategy": "2dmse", "loss.name": "cosent",
        "train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "run.output_dir": args.output_dir, "run.save_every": 0, "run.eval_every": 0,
    })
    test = load_sts("stsb", "test", data_dir=args.data_dir)
    print(f"1/4 the original MiniLM on STS-B test ({len(test)} pairs) ...", flush=True)
    original = MatryoshkaEncoder.from_pretrained("minilm", max_seq_length=args.max_seq_length)
    dims = sorted({*dims, shallow[1], original.hidden_size})  # the table holds both exits compared below
    before = evaluate_grid(original, test, dims=dims, model_name="original")
    print(f"2/4 training 2dmse for {args.steps} steps (batch {args.batch_size}) into {args.output_dir} ...",
          flush=True)
    start = time.perf_counter()
    result = train(config, overwrite=True)
    minutes = (time.perf_counter() - start) / 60
    print("3/4 the trained model on STS-B test ...", flush=True)
    trained = MatryoshkaEncoder.from_pretrained(result.final_dir)
    after = evaluate_grid(trained, test, dims=dims, model_name="2dmse")
    print("4/4 encoding and searching at two exits ...", flush=True)
    texts = test.unique_sentences()[0]
    exits = [shallow, (trained.num_layers, trained.hidden_size)]
    buys = what_an_exit_buys(trained, texts, exits, after, test.name)
    print()
    print(side_by_side(before, after, test.name))
    print()
    print(buys)
    final = result.final_dir
    layer, dim = shallow
    print(f"\ntrained {result.steps} steps in {minutes:.1f} min; model: {final}. Next (minutes each):")
    print(f"  m2d eval {final} --sets stsb,sickr --layers {layer},{trained.num_layers} --dims {dim},"
          f"{trained.hidden_size}   # two exits on two sets")
    print(f"  m2d export {final} --layer {layer} --dim {dim} --format onnx --output {args.output_dir}/l{layer}-d{dim}"
          f" && m2d encode {args.output_dir}/l{layer}-d{dim} --input YOUR.txt --output emb.npy")
    print(f"  m2d serve {final}   # then POST /v1/embeddings with \"layer\": {layer}, \"dimensions\": {dim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
