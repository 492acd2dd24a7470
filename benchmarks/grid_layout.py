"""Is the full 7-set grid evaluation of the original MiniLM as fast after the layout change as before?

Runs the same evaluation (all layers x all Matryoshka dims on STS-B, SICK-R and STS12-16, test splits) with
two source trees of matryoshka2d, each in its own subprocess with the same threads, alternating A B B A ...
so that load from other processes hits both alike. Reports the median wall time of each and the median of
the per-pair ratios (new / old; < 1 means the new code is faster), and checks that both give the same grid.

    git worktree add /tmp/m2d-old 3e873bb        # the commit before the layout change
    OMP_NUM_THREADS=2 python benchmarks/grid_layout.py --old /tmp/m2d-old/src --new src --pairs 2 \
        --output benchmarks/results/grid_layout.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what each subprocess runs: import the tree it is given, time evaluate_grid over the 7 sets
CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
started = time.perf_counter()
import matryoshka2d
assert matryoshka2d.__file__.startswith(sys.argv[1]), matryoshka2d.__file__
try:
    from matryoshka2d.data.datasets import STS_SETS, load_sts
    from matryoshka2d.evaluation.grid import evaluate_grid
except ImportError:  # the flat layout before the change
    from matryoshka2d.data import STS_SETS, load_sts
    from matryoshka2d.evaluation import evaluate_grid
from matryoshka2d import MatryoshkaEncoder
model = MatryoshkaEncoder.from_pretrained("minilm")
sets = {name: load_sts(name, "test") for name in STS_SETS}
loaded = time.perf_counter()
result = evaluate_grid(model, sets, batch_size=128, show_progress_bar=False)
done = time.perf_counter()
json.dump({"eval_s": done - loaded, "total_s": done - started,
           "sentences": sum(t["sentences"] for t in result.metadata["timings"].values()),
           "records": [[r["set"], r["layer"], r["dim"], r["spearman"]] for r in result.records]},
          open(sys.argv[3], "w"))
"""


def run(src: Path, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", CHILD, str(src), str(threads), out.name], env=env, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="src folder of the old tree")
    parser.add_argument("--new", type=Path, required=True, help="src folder of the new tree")
    parser.add_argument("--pairs", type=int, default=2, help="old/new pairs (order alternates)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    old_src, new_src = args.old.resolve(), args.new.resolve()
    times: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.pairs):
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
            t = run(old_src if side == "old" else new_src, args.threads)
            times[side].append(t)
            print(f"pair {i + 1} {side}: eval {t['eval_s']:.1f} s, total {t['total_s']:.1f} s", flush=True)
    old_grid = {tuple(r[:3]): r[3] for r in times["old"][0]["records"]}
    new_grid = {tuple(r[:3]): r[3] for r in times["new"][0]["records"]}
    max_diff = max(abs(old_grid[k] - new_grid[k]) for k in old_grid) if old_grid.keys() == new_grid.keys() else None
    summary = {
        "what": "evaluate_grid(MiniLM, 7 STS test sets, all layers x all dims, batch 128)",
        "threads": args.threads, "pairs": args.pairs, "sentences": times["new"][0]["sentences"],
        "cells": len(new_grid), "max_abs_spearman_diff": max_diff,
        "old_eval_s_median": statistics.median(t["eval_s"] for t in times["old"]),
        "new_eval_s_median": statistics.median(t["eval_s"] for t in times["new"]),
        "new_over_old_eval_ratio_median": statistics.median(
            n["eval_s"] / o["eval_s"] for n, o in zip(times["new"], times["old"], strict=True)),
        "old_total_s_median": statistics.median(t["total_s"] for t in times["old"]),
        "new_total_s_median": statistics.median(t["total_s"] for t in times["new"]),
        "runs": {side: [{k: v for k, v in t.items() if k != "records"} for t in ts] for side, ts in times.items()},
        "load_average_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
