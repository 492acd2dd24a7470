"""Merge the per-batch-size ``m2d bench --peer ...`` runs into one table, the peer targets and one plot.

Each batch size is its own ``m2d bench`` run (one run of all eleven implementations at both batch sizes holds
the CPU for longer than the ~10 minutes a timing run may); within a run every implementation is interleaved
round by round. Usage::

    python benchmarks/peers_report.py benchmarks/results/peers-minilm-bs32.json \\
        benchmarks/results/peers-minilm-bs128.json --plot docs/img/peers-minilm.png
"""

from __future__ import annotations

import argparse
import json

from matryoshka2d.bench.result import BenchmarkResult
from matryoshka2d.evaluation.plots import plot_benchmark


def merge(paths: list[str]) -> BenchmarkResult:
    """One result holding the records of every run (the first run's facts, every batch size)."""
    runs = [json.loads(open(p, encoding="utf-8").read()) for p in paths]
    meta = dict(runs[0]["meta"])
    meta["batch_sizes"] = sorted({b for r in runs for b in r["meta"]["batch_sizes"]})
    meta["runs"] = [{"path": p, "date": r["meta"]["date"], "wall_seconds": r["meta"]["wall_seconds"],
                     "load_average_start": r["meta"]["load_average_start"]} for p, r in zip(paths, runs, strict=True)]
    return BenchmarkResult(meta, [rec for r in runs for rec in r["records"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    result = merge(args.results)
    print(result.to_markdown_all())
    print()
    for t in result.peer_targets():
        print(f"- batch {t['batch_size']}, {t['target']}: {t['ours_sentences_per_s']:.0f} vs "
              f"{t['peer_sentences_per_s']:.0f} sent/s = {t['value']:.2f}x (goal {t['goal']}x): "
              f"{'met' if t['met'] else 'MISSED'}")
    if args.plot:
        plot_benchmark(result, args.plot)


if __name__ == "__main__":
    main()
