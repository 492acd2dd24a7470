"""One shared-space training run of the query-exits study: train (a config + --set overrides), then score
SciFact and NFCorpus test queries at every exit against ONE index of the model's own full-exit documents, and
the symmetric grid (queries and documents at the same exit), from one encoding of each corpus. The model is
trained on SciFact train only, so NFCorpus is a transfer set.

With ``--align lora`` the trained model's query exits are then aligned post-hoc (``m2d align``'s LoRA on the
unlabelled texts of ``--texts-dir``), and scored against the same, unchanged, index.

    python research/query-exits/trained.py --name cross --set objective.cross_weight=1.0 --seed 0
    python research/query-exits/trained.py --name dense-heads --align lora --texts-dir TEXTS
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from pathlib import Path

import numpy as np
from common import read_texts, stitch_layers  # beside this script

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.data.beir import load_beir
from matryoshka2d.evaluation.query_exits import evaluate_query_exits
from matryoshka2d.evaluation.retrieval import encode_retrieval_set
from matryoshka2d.evaluation.retrieval_result import RetrievalResult
from matryoshka2d.training.align import AlignConfig, align_query_exits
from matryoshka2d.training.config import load_config
from matryoshka2d.training.loop import train

HERE = Path(__file__).resolve().parent
DIMS = [64, 128, 256, 384]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--config", default=str(HERE / "scifact-dense-heads.toml"))
    p.add_argument("--set", action="append", default=[], help="key=value (a Python literal, else text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/query-exits")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--sets", default="scifact,nfcorpus")
    p.add_argument("--align", choices=["lora"], default=None, help="then align the query exits 1-3 post-hoc")
    p.add_argument("--texts-dir", type=Path, default=None, help="the unlabelled texts (*.txt) for --align")
    p.add_argument("--align-lr", type=float, default=None, help="--align's learning rate (default: m2d align's)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # not training.config.parse_assignment: it reads "none" as None, which model.exit_heads refuses
    overrides = {k: ast.literal_eval(v) if v[:1] in "[{0123456789.-" or v in ("True", "False") else v
                 for k, v in (s.split("=", 1) for s in args.set)}
    run = Path(args.runs) / f"{args.name}-s{args.seed}"
    overrides.update({"run.output_dir": str(run), "train.seed": 42 + args.seed})
    start = time.perf_counter()
    final = run / "final"
    trained_s = None  # a run trained before is only scored again
    if not final.is_dir():
        train(load_config(args.config, overrides=overrides), overwrite=True)
        trained_s = round(time.perf_counter() - start, 1)
    model = MatryoshkaEncoder.from_pretrained(final)
    sets = {name: load_beir(name, "test") for name in args.sets.split(",")}
    docs: dict[str, dict[int, np.ndarray]] = {}
    encoded = {}
    for set_name, data in sets.items():
        _, docs[set_name], encoded[set_name] = encode_retrieval_set(model, data, range(1, model.num_layers + 1))
    name = f"{args.name}-s{args.seed}"
    full = model.num_layers

    def one_index(tag: str) -> RetrievalResult:
        return evaluate_query_exits(model, sets, dims=DIMS, doc_layer=full, model_name=tag,
                                    doc_vectors={s: d[full] for s, d in docs.items()})

    results = {"one-index": one_index(name)}
    symmetric = {n: evaluate_query_exits(model, sets, layers=[n], dims=DIMS, doc_layer=n, input_type="document",
                                         doc_vectors={s: d[n] for s, d in docs.items()}, model_name=name)
                 for n in range(1, full + 1)}
    results["symmetric"] = stitch_layers(symmetric, name, "same as query")
    out = Path(args.out)
    for kind, result in results.items():
        result.metadata.update(train_s=trained_s, overrides=overrides, encode=encoded)
        result.save(out / f"trained-{name}-{kind}.json")
        for s in sets:
            print(kind, s, {n: round(result.score(s, n, 384), 2) for n in result.layers}, flush=True)
    if args.align:
        texts = read_texts(args.texts_dir)
        config = AlignConfig(exits=[1, 2, 3], method=args.align, seed=args.seed, lr=args.align_lr)
        align_start = time.perf_counter()
        stats = align_query_exits(model, texts, config).stats
        aligned = one_index(f"{name}+{args.align}")
        aligned.metadata.update(train_s=trained_s, overrides=overrides, encode=encoded,
                                align={**stats, "lr": config.learning_rate, "rank": config.rank},
                                align_s=round(time.perf_counter() - align_start, 1))
        tag = f"+{args.align}" + (f"-lr{args.align_lr:g}" if args.align_lr else "")
        aligned.save(out / f"trained-{args.name}{tag}-s{args.seed}-one-index.json")
        for s in sets:
            assert aligned.score(s, full, 384) == results["one-index"].score(s, full, 384), "the index moved"
            print(f"+{args.align}", s, {n: round(aligned.score(s, n, 384), 2) for n in aligned.layers}, flush=True)
    print(json.dumps({"name": name, "train_s": trained_s, "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
