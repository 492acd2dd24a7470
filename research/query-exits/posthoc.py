"""One post-hoc alignment run of the query-exits study: align MiniLM's query exits on unlabelled text, then
score queries at every exit against ONE index of full-exit documents (SciFact and NFCorpus test, NFCorpus
dev for the learning-rate choice).

The full exit never changes, so the corpora are encoded once (``--docs``: the ``.npz`` files of
``encode_docs.py``, pooled vectors ``d6``) and every variant only encodes its queries.

    python research/query-exits/posthoc.py --method lora --exits 1,2,3 --seed 0 \
        --texts-dir TEXTS --docs CACHE --out research/query-exits/results/lora-s0.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from common import read_texts, stitch_layers  # beside this script

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.data.beir import load_beir
from matryoshka2d.evaluation.query_exits import evaluate_query_exits
from matryoshka2d.training.align import AlignConfig, align_query_exits, teacher_vectors

DIMS = [64, 128, 256, 384]


def evaluate(model, sets, docs, layers, name):  # noqa: ANN001, ANN201
    return evaluate_query_exits(model, sets, layers=layers, dims=DIMS, doc_layer=6, doc_vectors=docs,
                                model_name=name)


def evaluate_separate(students, sets, docs, name):  # noqa: ANN001, ANN201
    """One grid from standalone query encoders of depth n (each scored at its own last exit)."""
    return stitch_layers({n: evaluate_query_exits(sub, sets, layers=[n], dims=DIMS, doc_layer=n, doc_vectors=docs,
                                                  model_name=name) for n, sub in students.items()}, name, 6)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["none", "head", "lora", "separate"], required=True)
    p.add_argument("--exits", default="1,2,3")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts-dir", type=Path, required=True)
    p.add_argument("--docs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--save-model", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exits = [int(x) for x in args.exits.split(",")]
    sets = {"scifact": load_beir("scifact", "test"), "nfcorpus": load_beir("nfcorpus", "test"),
            "nfcorpus-dev": load_beir("nfcorpus", "dev")}
    model = MatryoshkaEncoder.from_pretrained("minilm")
    stats: dict = {"method": args.method}
    start = time.perf_counter()
    def documents() -> dict[str, np.ndarray]:  # loaded after training: the cache may still be being written
        for name in ("scifact", "nfcorpus"):
            while not (args.docs / f"{name}.npz").is_file():
                time.sleep(10)
        cached = {name: np.load(args.docs / f"{name}.npz")["d6"] for name in ("scifact", "nfcorpus")}
        return {"scifact": cached["scifact"], "nfcorpus": cached["nfcorpus"], "nfcorpus-dev": cached["nfcorpus"]}

    if args.method == "none":
        docs = documents()
        result = evaluate(model, sets, docs, list(range(1, 7)), "minilm")
    else:
        texts = read_texts(args.texts_dir)
        config = AlignConfig(exits=exits, method=args.method, rank=args.rank, epochs=args.epochs, lr=args.lr,
                             seed=args.seed)
        cache = args.texts_dir / f"vectors-{config.max_seq_length}.npz"  # every layer of every text, once
        if not cache.is_file():
            vectors = teacher_vectors(model, texts, range(1, 7), config.max_seq_length)
            np.savez(cache, **{str(n): v for n, v in vectors.items()})
        vectors = {int(n): v for n, v in np.load(cache).items()}
        out = align_query_exits(model, texts, config, vectors=vectors)
        stats = {**out.stats, "lr": config.learning_rate, "rank": args.rank if args.method == "lora" else None}
        name = f"minilm-{args.method}-s{args.seed}"
        docs = documents()
        if out.separate:
            result = evaluate_separate(out.separate, sets, docs, name)
            for n, sub in out.separate.items() if args.save_model else ():
                sub.save(args.save_model / f"query-encoder-L{n}", overwrite=True)
        else:
            result = evaluate(model, sets, docs, [*exits, 6], name)
            if args.save_model:
                model.save(args.save_model, overwrite=True)
    result.metadata["align"] = stats
    result.metadata["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.save(args.out)
    for s in ("scifact", "nfcorpus", "nfcorpus-dev"):
        full = result.score(s, 6, 384) if 6 in result.layers else None
        row = {n: round(result.score(s, n, 384), 2) for n in result.layers}
        print(s, "nDCG@10 d384 by query layer:", row, "full:", full, flush=True)
    print(json.dumps(stats, default=str))


if __name__ == "__main__":
    main()
