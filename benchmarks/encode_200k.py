"""Memory and time of ONE ``model.encode`` call on 200,000 real sentences (issue 8: memory stays bounded).

The sentences are those of the real STS sets (``/work/shared/data``: STS-B, SICK-R, STS12-16, both columns),
repeated in order up to ``--n``. Each run is a fresh subprocess, so its peak RSS is its own: the peak is reset
(``/proc/self/clear_refs``) after the model is loaded and warmed up, and read back (``VmHWM``) after the call.
If encode streams in batches, ``peak - baseline`` is the output array plus a constant, and that constant does
not grow with the number of sentences (compare the small and the large run).

Usage::

    python benchmarks/encode_200k.py --threads 1                        # layer 1 at 20k and at 200k
    python benchmarks/encode_200k.py --runs 1:20000 1:200000 6:200000    # LAYER:N, one process each
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

DATA = Path(os.environ.get("M2D_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STS_FILES = ("stsb/train.tsv", "stsb/dev.tsv", "stsb/test.tsv", "sickr/train.tsv", "sickr/dev.tsv",
             "sickr/test.tsv", "sts12/test.tsv", "sts13/test.tsv", "sts14/test.tsv", "sts15/test.tsv",
             "sts16/test.tsv")
MB = 1024 * 1024


def read_sentences(root: Path) -> tuple[list[str], list[str]]:
    """Both sentences of every row of the STS-type files under ``root`` (TSV, one header, no quoting)."""
    sentences, used = [], []
    for name in STS_FILES:
        path = root / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        sentences += [s for row in rows for s in row[:2]]
        used.append(name)
    if not sentences:
        raise FileNotFoundError(f"no STS files under {root}; set M2D_DATA to the data folder")
    return sentences, used


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_sampler(dim: int, total: int, every: int = 10_000) -> tuple[list[tuple[int, int, int]],
                                                                   Callable[[int], None]]:
    """A trace and the ``progress`` callback of ``model.encode`` that fills it: (texts done, RSS, output bytes
    written so far) every ~``every`` texts and at the end."""
    trace: list[tuple[int, int, int]] = []
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if not trace or done - trace[-1][0] >= every or done == total:
            trace.append((done, _status_kb("VmRSS") * 1024, done * dim * 4))

    return trace, on_batch


def worker(n: int, layer: int, batch_size: int, threads: int) -> dict:
    """One measured encode call (runs in its own process)."""
    import torch

    from matryoshka2d import MatryoshkaEncoder

    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    model = MatryoshkaEncoder.from_pretrained("minilm")
    pool, files = read_sentences(DATA)
    texts = [pool[i % len(pool)] for i in range(n)]  # references to the pool: the input costs n pointers
    model.encode(texts[:512], layer=layer, batch_size=batch_size)  # warm-up: allocator, thread pools
    trace, on_batch = rss_sampler(dim=model.hidden_size, total=n)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    baseline = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    out = model.encode(texts, layer=layer, batch_size=batch_size, show_progress_bar=True, progress=on_batch)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") * 1024
    after = _status_kb("VmRSS") * 1024
    growth = peak - baseline
    return {
        "n": n, "layer": layer, "dim": int(out.shape[1]), "batch_size": batch_size,
        "batches": -(-n // batch_size),
        "unique_sentences": len(set(pool)), "pool_sentences": len(pool), "files": files,
        "seconds": round(seconds, 2), "sentences_per_s": round(n / seconds, 1),
        "baseline_rss_mb": round(baseline / MB, 1), "peak_rss_mb": round(peak / MB, 1),
        "rss_after_mb": round(after / MB, 1), "output_mb": round(out.nbytes / MB, 1),
        "peak_minus_baseline_mb": round(growth / MB, 1),
        "overhead_beyond_output_mb": round((growth - out.nbytes) / MB, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(), "load_avg_1m": [load_before, os.getloadavg()[0]],
        "finite": bool(torch.isfinite(torch.from_numpy(out)).all()),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        # (texts done, RSS - baseline - output rows written so far, in MB) every ~10k texts
        "overhead_trace_mb": [[done, round((rss - baseline - written) / MB, 1)]
                              for done, rss, written in trace],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["1:20000", "1:200000"],
                        help="LAYER:N pairs: encode N sentences at exit LAYER, each in a fresh process")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "encode_200k.json")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(**spec)), flush=True)
        return 0

    from matryoshka2d.io.atomic import atomic_write_json
    from matryoshka2d.io.manifest import library_versions

    runs = [{"layer": int(r.split(":")[0]), "n": int(r.split(":")[1])} for r in args.runs]
    results = []
    for spec in runs:
        spec.update(batch_size=args.batch_size, threads=args.threads)
        print(f"encode {spec['n']:,} sentences at layer {spec['layer']} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                              stdout=subprocess.PIPE, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    atomic_write_json(args.output, {
        "benchmark": "one model.encode call on repeated real STS sentences (all-MiniLM-L6-v2, CPU)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "library_versions": library_versions(),
        "runs": results,
    })
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
