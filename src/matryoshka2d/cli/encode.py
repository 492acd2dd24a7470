"""``m2d encode MODEL --layer N --dim D --input FILE --output OUT.npy``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import IO

import numpy as np

from matryoshka2d.cli.common import add_model_args, load_model
from matryoshka2d.io.outputs import save_or_rescue

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="embed sentences from a file at one exit")
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="exit layer 1..N (default: the model's default)")
    p.add_argument("--dim", type=int, default=None, help="embedding dims 1..D (default: full width)")
    p.add_argument("--input", required=True, help=".txt (one sentence per line) or .tsv/.csv/.jsonl")
    p.add_argument("--column", default=None, help="column of a .tsv/.csv/.jsonl input (default: first)")
    p.add_argument("--output", required=True, help="output .npy file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="skip L2 normalisation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.data.datasets import read_sentences
    from matryoshka2d.io.locks import claim_output

    with claim_output(args.output, overwrite=args.overwrite) as out:  # held until the file is in place
        texts = read_sentences(args.input, column=args.column)
        model = load_model(args)
        start = time.perf_counter()
        emb = model.encode(
            texts, layer=args.layer, dim=args.dim, batch_size=args.batch_size, normalize=args.normalize,
            show_progress_bar=not args.quiet,
        )
        seconds = time.perf_counter() - start
        save_or_rescue(out, lambda path: save_array(path, emb), what="embeddings")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} in {seconds:.2f}s "
          f"({emb.shape[0] / seconds:.0f} sentences/s)")
    return 0


class _Writer:
    """A file seen by numpy as a plain writable object, so ``np.save`` writes through Python's ``write``.

    On a real file numpy writes with C ``fwrite`` on a duplicate of the descriptor and loses its errors: past
    a file size limit (``ulimit -f``) it left a truncated ``.npy`` and exit 0. Python's ``write`` raises.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f

    def write(self, data: bytes) -> int:
        return self.f.write(data)


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary sibling and a rename; every write error is raised."""
    from matryoshka2d.io.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(_Writer(f), array)  # type: ignore[arg-type]
