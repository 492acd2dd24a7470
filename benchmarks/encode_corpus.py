"""Corpus encoding benchmark: rows/s of the local and Ray engines, peak RSS against corpus size, and the cost
of two exits in one pass against the deepest exit alone.

The corpus: ``--rows`` texts drawn (with replacement, seeded) from the unique STS sentences (stsb, sickr,
sts12-16) and the SciFact and NFCorpus documents and queries in ``--data-dir``, with unique ids ``c0..``,
written as one TSV. Model: the real MiniLM (``minilm``, offline), exits ``3:128,6:384``. Every measurement
runs in a fresh subprocess with pinned threads; take the CPU lock exclusively around the whole script:

    flock -x /tmp/m2d-cpu.lock env PYTHONPATH=src python benchmarks/encode_corpus.py \\
        --speed-rows 4000 --rss-rows 10000,40000 --output benchmarks/results/encode_corpus.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STS_SETS = ("stsb", "sickr", "sts12", "sts13", "sts14", "sts15", "sts16")
EXITS_TWO, EXITS_DEEP = "3:128,6:384", "6:384"


def text_pool(data_dir: Path) -> list[str]:
    """Unique texts: STS sentences, SciFact / NFCorpus documents (``text``) and queries."""
    seen: dict[str, None] = {}
    files = [(f, ("sentence1", "sentence2")) for s in STS_SETS for f in sorted((data_dir / s).glob("*.tsv"))]
    for beir in ("scifact", "nfcorpus"):
        files += [(data_dir / beir / "corpus.tsv", ("text",)), (data_dir / beir / "queries.tsv", ("text",))]
    for path, columns in files:
        lines = path.read_text(encoding="utf-8").split("\n")
        header = lines[0].rstrip("\r").split("\t")
        if not all(c in header for c in columns):
            continue
        idx = [header.index(c) for c in columns]
        for line in lines[1:]:
            fields = line.rstrip("\r").split("\t")
            if len(fields) == len(header):
                for i in idx:
                    if fields[i].strip():
                        seen.setdefault(fields[i], None)
    return list(seen)


def write_corpus(pool: list[str], rows: int, path: Path, seed: int = 0) -> Path:
    """``rows`` texts drawn from ``pool`` with replacement, ids ``c0..c{rows-1}``, as a TSV."""
    import numpy as np

    picks = np.random.default_rng(seed).integers(0, len(pool), rows)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\n")
        for i, k in enumerate(picks):
            f.write(f"c{i}\t{pool[k]}\n")
    return path


def child(args: argparse.Namespace) -> None:
    """One measurement (in its own process): encode, print JSON with seconds, rows/s and peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.corpus import encode_corpus, make_job

    model = MatryoshkaEncoder.from_pretrained("minilm").eval()
    job = make_job(model, "minilm", [args.corpus], args.exits, id_column="id", shard_size=args.shard_size,
                   batch_size=args.batch_size)
    ray_init = 0.0
    if args.engine == "ray":
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.workers * args.threads_per_worker, include_dashboard=False,
                 logging_level="WARNING")
        ray_init = time.perf_counter() - start
        del model
        model = None
    start = time.perf_counter()
    result = encode_corpus(job, args.out, engine=args.engine, model=model, workers=args.workers,
                           threads_per_worker=args.threads_per_worker, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": result["rows"], "seconds": seconds, "scan_seconds": result["run"]["scan_seconds"],
                      "rows_per_s": result["rows"] / seconds, "ray_init_seconds": ray_init,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(corpus: Path, exits: str, *, engine: str = "local", threads: int = 2, workers: int = 2,
            threads_per_worker: int = 1, shard_size: int, batch_size: int) -> dict:
    """Run :func:`child` in a fresh process (threads pinned through OMP_NUM_THREADS too)."""
    with tempfile.TemporaryDirectory(prefix="m2d-bench-") as tmp:
        cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--exits", exits, "--engine", engine,
               "--threads", str(threads), "--workers", str(workers), "--threads-per-worker",
               str(threads_per_worker), "--shard-size", str(shard_size), "--batch-size", str(batch_size),
               "--out", str(Path(tmp) / "out")]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads if engine == "local" else threads_per_worker),
               "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--speed-rows", type=int, default=4000, help="corpus size of the rows/s comparisons")
    p.add_argument("--rss-rows", default="10000,40000", help="corpus sizes of the peak-RSS comparison")
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of each speed run (median kept)")
    p.add_argument("--runs", default="", help="speed runs to do, comma-separated (default: all three)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "encode_corpus.json"))
    # child-process arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--corpus", "--exits", "--engine", "--out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--threads", "--workers", "--threads-per-worker"):
        p.add_argument(name, type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    pool = text_pool(Path(args.data_dir))
    common = {"shard_size": args.shard_size, "batch_size": args.batch_size}
    results: dict = {"model": "minilm", "exits": EXITS_TWO, "pool_unique_texts": len(pool), **common,
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "speed": {}, "rss": {}}
    with tempfile.TemporaryDirectory(prefix="m2d-corpus-") as tmp:
        corpus = write_corpus(pool, args.speed_rows, Path(tmp) / f"corpus-{args.speed_rows}.tsv")
        runs = {
            "local_2threads_two_exits": dict(exits=EXITS_TWO, engine="local", threads=2),
            "local_2threads_deepest_exit_only": dict(exits=EXITS_DEEP, engine="local", threads=2),
            "ray_2workers_x1thread_two_exits": dict(exits=EXITS_TWO, engine="ray", workers=2, threads_per_worker=1),
        }
        wanted = [r for r in args.runs.split(",") if r] or list(runs)
        reps: dict[str, list[dict]] = {name: [] for name in wanted}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every run alike
            for name in wanted:
                reps[name].append(measure(corpus, **runs[name], **common))
                print(name, json.dumps(reps[name][-1]), flush=True)
        for name, runs_of in reps.items():
            median = sorted(runs_of, key=lambda r: r["seconds"])[len(runs_of) // 2]
            results["speed"][name] = {**median, "seconds_all": [r["seconds"] for r in runs_of]}
        s = results["speed"]
        results["rows"] = args.speed_rows
        if "local_2threads_deepest_exit_only" in s and "local_2threads_two_exits" in s:
            results["two_exits_over_deepest"] = (s["local_2threads_two_exits"]["seconds"]
                                                 / s["local_2threads_deepest_exit_only"]["seconds"])
        if "ray_2workers_x1thread_two_exits" in s and "local_2threads_two_exits" in s:
            results["ray_over_local_rows_per_s"] = (s["ray_2workers_x1thread_two_exits"]["rows_per_s"]
                                                    / s["local_2threads_two_exits"]["rows_per_s"])
        for rows in (int(r) for r in args.rss_rows.split(",") if r):
            corpus = write_corpus(pool, rows, Path(tmp) / f"corpus-{rows}.tsv")
            results["rss"][str(rows)] = measure(corpus, EXITS_TWO, engine="local", threads=2, **common)
            print("rss", rows, json.dumps(results["rss"][str(rows)]), flush=True)
    sizes = sorted(results["rss"], key=int)
    if sizes:
        results["rss_growth_mib"] = (results["rss"][sizes[-1]]["peak_rss_mib"]
                                     - results["rss"][sizes[0]]["peak_rss_mib"])
    results["repeats"] = args.repeats
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: results.get(k) for k in ("two_exits_over_deepest", "ray_over_local_rows_per_s",
                                                  "rss_growth_mib")}))


if __name__ == "__main__":
    main()
