"""Choose a post-hoc method's learning rate on the NFCorpus dev split, never on a test set.

The rule, fixed before the runs: the highest mean NFCorpus-dev nDCG@10 over query exits 1-3 and widths 64,
128, 256 and 384 (seed 0), each run scored against the one full-exit index. Prints the table and, last, the
chosen learning rate.

    python research/query-exits/choose_lr.py RUN.json [RUN.json ...]
"""

from __future__ import annotations

import sys

import numpy as np

from matryoshka2d.evaluation.retrieval_result import RetrievalResult

DIMS = (64, 128, 256, 384)
EXITS = (1, 2, 3)


def dev_score(result: RetrievalResult) -> float:
    return float(np.mean([result.score("nfcorpus-dev", n, d) for n in EXITS for d in DIMS]))


def main() -> None:
    runs = [(RetrievalResult.load(path), path) for path in sys.argv[1:]]
    scored = sorted(((dev_score(r), r.metadata["align"]["lr"], path) for r, path in runs), reverse=True)
    print("| lr | NFCorpus dev nDCG@10, mean of exits 1-3 x d64-d384 | run |\n|---|---|---|")
    for score, lr, path in scored:
        print(f"| {lr:g} | {score:.2f} | {path} |")
    print(f"{scored[0][1]:g}")


if __name__ == "__main__":
    main()
