"""``m2d encode MODEL --layer N --dim D --input FILE --output OUT.npy``.

MODEL may be an ``m2d export --format onnx|openvino`` folder: it then runs on onnxruntime / OpenVINO with the
``tokenizers`` library, importing neither torch nor transformers (about a second for a small input).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from matryoshka2d.cli.common import add_model_args, load_model

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
    p.add_argument("--int8", action="store_true",
                   help="ONNX/OpenVINO export: run its int8 graph (faster, slightly different numbers)")
    p.add_argument("--threads", type=int, default=None, help="ONNX/OpenVINO export: inference threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.data.datasets import read_sentences
    from matryoshka2d.io.atomic import atomic_open

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    from matryoshka2d.export.runtime import exported_format

    texts = read_sentences(args.input, column=args.column)
    if exported_format(args.model):
        start = time.perf_counter()
        emb = _encode_exported(args, texts)
    else:
        if args.int8:
            raise ValueError("--int8 runs the int8 graph of an ONNX/OpenVINO export; export one with "
                             "m2d export --format onnx --quantize int8 and pass that folder")
        model = load_model(args)
        start = time.perf_counter()
        emb = model.encode(
            texts, layer=args.layer, dim=args.dim, batch_size=args.batch_size, normalize=args.normalize,
            show_progress_bar=True,
        )
    seconds = time.perf_counter() - start
    with atomic_open(out, "wb") as f:
        np.save(f, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} in {seconds:.2f}s "
          f"({emb.shape[0] / seconds:.0f} sentences/s)")
    return 0


def _encode_exported(args: argparse.Namespace, texts: list[str]) -> np.ndarray:
    """An ONNX/OpenVINO export's embeddings: its one exit, optionally cut to a smaller ``--dim``."""
    from matryoshka2d.export.runtime import load_exported, read_export_meta

    meta = read_export_meta(args.model) or {}
    layer, width = int(meta["default_layer"]), int(meta["default_dim"])
    if args.layer is not None and args.layer != layer:
        raise ValueError(f"--layer {args.layer}: {args.model} is exit layer {layer} only; pass --layer {layer} "
                         "or export that layer")
    if args.dim is not None and not 1 <= args.dim <= width:
        raise ValueError(f"--dim {args.dim} is out of range 1..{width} for this export; pass a dim in 1..{width}")
    if not args.normalize:
        raise ValueError("--no-normalize: an exported graph returns L2-normalised embeddings; drop the flag, "
                         "or encode the source model")
    encoder = load_exported(args.model, int8=args.int8, threads=args.threads)
    emb = encoder.encode(texts, batch_size=args.batch_size)
    if args.dim is not None and args.dim < width:  # a prefix of the normalised vector, normalised again
        emb = emb[:, : args.dim]
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb
