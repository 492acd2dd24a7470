"""Resident memory of a local corpus encode, shard by shard: does it creep up over a long run?

Encodes ``ROWS`` texts of the ``benchmarks/encode_corpus.py`` pool (STS sentences, SciFact / NFCorpus
documents and queries; seed 0) with the real MiniLM at exits 3:128,6:384, shards of 2,000, 2 threads, and
after every shard (``encode_corpus``'s ``on_shard`` callback) records ``VmRSS`` (MiB) and the peak so far
(``VmHWM``). The encoder hands the C heap's free pages back after every shard (``release_free_memory``); here
the callback does it itself (``release_memory=False``), between its two samples, and ``--no-trim`` leaves it
out to show what it changes. Run it alone on the machine (it prints one JSON line at the end):

    flock -x /tmp/m2d-cpu.lock env PYTHONPATH=src python benchmarks/corpus_rss_trace.py 20000 [--no-trim]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_corpus import ROOT, text_pool, write_corpus  # noqa: E402


def status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", type=int)
    p.add_argument("--no-trim", action="store_true", help="do not hand free heap pages back after each shard")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(2)
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.corpus import encode_corpus, make_job
    from matryoshka2d.encoder.memory import release_free_memory

    trace = []

    def sample(spec: object) -> None:  # called once each shard is written; the trim is ours (release_memory=False)
        before = status()["VmRSS"]
        if not args.no_trim:
            release_free_memory()
        after = status()
        trace.append({"rss_after_shard": before, "rss_after_trim": after["VmRSS"], "peak_so_far": after["VmHWM"]})

    with tempfile.TemporaryDirectory(prefix="m2d-rss-") as tmp:
        corpus = write_corpus(text_pool(Path(args.data_dir)), args.rows, Path(tmp) / "corpus.tsv")
        model = MatryoshkaEncoder.from_pretrained("minilm").eval()
        job = make_job(model, "minilm", [str(corpus)], "3:128,6:384", id_column="id", shard_size=2000,
                       batch_size=64)
        start = time.perf_counter()
        encode_corpus(job, Path(tmp) / "out", engine="local", model=model, progress=False, on_shard=sample,
                      release_memory=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"rows": args.rows, "trim": not args.no_trim, "seconds": round(seconds, 1),
                      "per_shard_mib": trace}))


if __name__ == "__main__":
    main()
