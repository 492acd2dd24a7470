"""``m2d align MODEL --texts FILE... --exits 1,2,3 --output DIR``: shallow query exits into the document space.

Post-hoc, on unlabelled text, with the document exit untouched (an index built from MODEL stays valid).
"""

from __future__ import annotations

import argparse
import json
import logging

from matryoshka2d.cli.common import add_model_args, int_list, load_model
from matryoshka2d.vocab import ALIGN_DISTANCES, ALIGN_METHODS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="align shallow query exits to the full exit's space (no labels, no re-indexing)")
    add_model_args(p)
    p.add_argument("--texts", nargs="+", required=True,
                   help="unlabelled texts: .txt (one per line; blank lines skipped), or .tsv/.csv/.jsonl (--column)")
    p.add_argument("--column", default=None, help="the text column of table files (default: the first)")
    p.add_argument("--exits", required=True, help="query exits to align, e.g. 1,2,3 (each below --document-exit)")
    p.add_argument("--document-exit", type=int, default=None, help="the exit the index is built at (default: N)")
    p.add_argument("--output", required=True, help="output model folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--method", choices=ALIGN_METHODS, default="lora",
                   help="head: a query head per exit; lora: head + low-rank adapters on blocks 1..n (default); "
                        "separate: the baseline, a fine-tuned copy of the first n layers per exit")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (method lora)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the texts")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: lora 3e-3, head 1e-3, separate 5e-4)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per step")
    p.add_argument("--train-seq-length", type=int, default=128, help="tokens per text while training")
    p.add_argument("--distance", choices=ALIGN_DISTANCES, default="cosine", help="alignment distance")
    p.add_argument("--seed", type=int, default=0, help="shuffling and initialisation seed")
    p.add_argument("--data-dir", default=None, help="folder to resolve relative --texts against")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.data.datasets import read_sentences
    from matryoshka2d.io.locks import claim_output
    from matryoshka2d.training.align import AlignConfig, align_query_exits

    with claim_output(args.output, kind="folder", overwrite=args.overwrite, what="--output folder"):
        texts: list[str] = []
        for path in args.texts:
            got = read_sentences(path, args.column, data_dir=args.data_dir)
            if not any(t.strip() for t in got):
                raise ValueError(f"{path}: every line is blank; pass a file with one text per line")
            texts += got
        model = load_model(args)
        exits = int_list(args.exits, name="--exits", upper=model.num_layers, allow_all=False)
        config = AlignConfig(exits=exits, method=args.method, rank=args.rank, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, max_seq_length=args.train_seq_length,
                             distance=args.distance, seed=args.seed, document_exit=args.document_exit)
        result = align_query_exits(model, texts, config)
        if result.separate:
            from pathlib import Path

            from matryoshka2d.io.atomic import atomic_dir

            with atomic_dir(Path(args.output), overwrite=args.overwrite) as tmp:
                for n, sub in result.separate.items():
                    sub.save(tmp / f"query-encoder-L{n}")
        else:
            model.save(args.output, overwrite=args.overwrite)
    stats = result.stats
    print(f"aligned query exits {stats['exits']} to exit {stats['document_exit']} ({stats['method']}) on "
          f"{stats['texts']} texts ({stats['dropped_texts']} blank or repeated dropped), {stats['steps']} steps in "
          f"{stats['seconds']:.0f}s: loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f}; "
          f"saved to {args.output}")
    print(f"  own parameters per exit: {json.dumps(stats['parameters'])}")
    if not result.separate:
        print("  encode queries with input_type='query' (m2d search/eval: --input-type query); documents and the "
              "index are unchanged")
    return 0
