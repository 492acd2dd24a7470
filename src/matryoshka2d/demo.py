"""``python -m matryoshka2d.demo`` (``make demo``): a short 2DMSE fine-tune of MiniLM on STS-B, before vs after.

Trains the offline all-MiniLM-L6-v2 on STS-B train with the ``2dmse`` objective for a short budget (a few
minutes on 2 CPU cores), then prints the STS-B test Spearman of every layer x dim exit for the original
and the trained model side by side. The run is written to ``runs/demo`` (replaced on every call).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger(__name__)


def side_by_side(before, after, set_name: str) -> str:  # noqa: ANN001
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


def main(argv: list[str] | None = None) -> int:
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.evaluation.grid import evaluate_grid
    from matryoshka2d.training.config import Config
    from matryoshka2d.training.loop import train

    parser = argparse.ArgumentParser(prog="python -m matryoshka2d.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--dims", default="32,64,128,384", help="dims of the printed table")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--data-dir", default=None, help="folder holding stsb/ (default: the shared data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dims = [int(d) for d in args.dims.split(",")]

    config = Config().replace({
        "model.name": "minilm", "model.max_seq_length": args.max_seq_length, "data.source": "stsb",
        "data.data_dir": args.data_dir, "objective.strategy": "2dmse", "loss.name": "cosent",
        "train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "run.output_dir": args.output_dir, "run.save_every": 0, "run.eval_every": 0,
    })
    test = load_sts("stsb", "test", data_dir=args.data_dir)
    print(f"1/3 evaluating the original MiniLM on STS-B test ({len(test)} pairs) ...", flush=True)
    original = MatryoshkaEncoder.from_pretrained("minilm", max_seq_length=args.max_seq_length)
    before = evaluate_grid(original, test, dims=dims, model_name="original")
    print(f"2/3 training 2dmse for {args.steps} steps (batch {args.batch_size}) into {args.output_dir} ...",
          flush=True)
    start = time.perf_counter()
    result = train(config, overwrite=True)
    minutes = (time.perf_counter() - start) / 60
    print("3/3 evaluating the trained model ...", flush=True)
    trained = MatryoshkaEncoder.from_pretrained(result.final_dir)
    after = evaluate_grid(trained, test, dims=dims, model_name="2dmse")
    print()
    print(side_by_side(before, after, test.name))
    print()
    print(f"trained {result.steps} steps in {minutes:.1f} min; model: {result.final_dir} "
          f"(log: {result.run_dir / 'log.jsonl'}); full grid: m2d eval {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
