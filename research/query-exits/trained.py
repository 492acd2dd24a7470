"""One shared-space training run of the query-exits study: train (a config + --set overrides), then score
SciFact test queries at every exit against ONE index of the model's own full-exit documents, and the
symmetric grid (queries and documents at the same exit), from one encoding of the corpus.

    python research/query-exits/trained.py --name cross --set objective.cross_weight=1.0 --seed 0
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from pathlib import Path

import numpy as np

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.data.beir import load_beir
from matryoshka2d.evaluation.query_exits import evaluate_query_exits
from matryoshka2d.evaluation.retrieval import encode_retrieval_set
from matryoshka2d.evaluation.retrieval_result import RetrievalResult
from matryoshka2d.training.config import load_config
from matryoshka2d.training.loop import train

HERE = Path(__file__).resolve().parent
DIMS = [64, 128, 256, 384]


def stitch(parts: dict[int, RetrievalResult], name: str) -> RetrievalResult:
    layers = sorted(parts)
    first = parts[layers[0]]
    per_query = {s: np.concatenate([parts[n].per_query[s] for n in layers], axis=1) for s in first.per_query}
    return RetrievalResult(name, [r for n in layers for r in parts[n].records], first.metrics, per_query,
                           first.query_ids, {**first.metadata, "layers": layers, "doc_layer": "same as query"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--config", default=str(HERE / "scifact-dense-heads.toml"))
    p.add_argument("--set", action="append", default=[], help="key=value (a Python literal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/query-exits")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {k: ast.literal_eval(v) if v[:1] in "[{0123456789.-" or v in ("True", "False") else v
                 for k, v in (s.split("=", 1) for s in args.set)}
    run = Path(args.runs) / f"{args.name}-s{args.seed}"
    overrides.update({"run.output_dir": str(run), "train.seed": 42 + args.seed})
    start = time.perf_counter()
    final = run / "final"
    if not final.is_dir():
        train(load_config(args.config, overrides=overrides), overwrite=True)
    trained_s = time.perf_counter() - start
    model = MatryoshkaEncoder.from_pretrained(final)
    data = load_beir("scifact", "test")
    queries, docs, info = encode_retrieval_set(model, data, range(1, model.num_layers + 1))
    sets = {"scifact": data}
    name = f"{args.name}-s{args.seed}"
    one_index = evaluate_query_exits(model, sets, dims=DIMS, doc_layer=model.num_layers,
                                     doc_vectors={"scifact": docs[model.num_layers]}, model_name=name)
    symmetric = stitch({n: evaluate_query_exits(model, sets, layers=[n], dims=DIMS, doc_layer=n,
                                                doc_vectors={"scifact": docs[n]}, input_type="document",
                                                model_name=name)
                        for n in range(1, model.num_layers + 1)}, name)
    out = Path(args.out)
    for kind, result in (("one-index", one_index), ("symmetric", symmetric)):
        result.metadata.update(train_s=round(trained_s, 1), overrides=overrides, encode=info)
        result.save(out / f"trained-{name}-{kind}.json")
        print(kind, {n: round(result.score("scifact", n, 384), 2) for n in result.layers}, flush=True)
    print(json.dumps({"name": name, "train_s": round(trained_s, 1), "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
