"""``m2d encode MODEL --layer N --dim D --input FILE --output OUT.npy``, or, for a corpus at several exits,
``m2d encode MODEL --input PATH... --exits 3:128,6:384 --output DIR`` (Parquet shards, resumable; see
``docs/encoding.md``).

MODEL may be an ``m2d export --format onnx|openvino`` folder: the ``.npy`` path then runs on onnxruntime /
OpenVINO with the ``tokenizers`` library, importing neither torch nor transformers (about a second for a small
input).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import IO

import numpy as np

from matryoshka2d.cli.common import add_input_type_arg, add_model_args, load_model
from matryoshka2d.io.outputs import save_or_rescue
from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import CORPUS_ENGINES, RUNTIME_PRECISIONS, STORAGE_FORMATS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="embed sentences from a file at one exit, or a corpus at several exits")
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="exit layer 1..N (default: the model's default)")
    p.add_argument("--dim", type=int, default=None, help="embedding dims 1..D (default: full width)")
    add_input_type_arg(p, default="document")
    p.add_argument("--input", required=True, nargs="+",
                   help=".txt (one sentence per line) or .tsv/.csv/.jsonl; with --exits also .parquet, several "
                        "files, globs or folders")
    p.add_argument("--column", default=None,
                   help="text column of a .tsv/.csv/.jsonl input (default: text, with a title joined, else the first "
                        "column that is not an id)")
    p.add_argument("--output", required=True, help="output .npy file (with --exits: output folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="skip L2 normalisation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c = p.add_argument_group("corpus encoding (with --exits; see docs/encoding.md)")
    c.add_argument("--exits", default=None, help="exits LAYER:DIM,... from one pass, e.g. 3:128,6:384")
    c.add_argument("--engine", choices=CORPUS_ENGINES, default="local", help="this process, or Ray Data")
    c.add_argument("--format", default="float32", choices=STORAGE_FORMATS, help="storage of the vectors")
    c.add_argument("--id-column", default=None, help="column of unique ids (default: id, _id or doc_id, else lines)")
    c.add_argument("--text-column", default=None, help="column of the texts (default: as --column)")
    c.add_argument("--shard-size", type=int, default=100_000, help="rows per Parquet shard")
    c.add_argument("--skip-empty", action="store_true", help="skip (and count) empty texts instead of failing")
    p.add_argument("--int8", action="store_true",
                   help="ONNX/OpenVINO export: run its int8 graph (faster, slightly different numbers)")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads: torch's (also the local corpus engine's), or an export's runtime")
    p.add_argument("--precision", choices=RUNTIME_PRECISIONS, default="auto",
                   help="OpenVINO export: auto (default; bf16 on CPUs with native bf16 such as AMX when the "
                        "export's recorded bf16 checks hold, else f32; the same rule as load_exported and m2d "
                        "serve), or f32 / bf16")
    c.add_argument("--workers", type=int, default=2, help="Ray actors (each loads the model once)")
    c.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (Ray CPUs) per actor")
    c.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto); default: a local one")
    c.add_argument("--ray-timeout", type=float, default=60.0,
                   help="seconds to wait for the cluster at --ray-address before giving up (exit 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.data.datasets import read_sentences
    from matryoshka2d.io.locks import claim_output

    if args.exits is not None:
        return run_corpus(args)
    if len(args.input) != 1:
        raise ValueError(f"--input got {len(args.input)} paths; the .npy output takes one file, pass "
                         "--exits L:D,... and an output folder to encode several")
    args.input = args.input[0]
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be a positive integer")
    from matryoshka2d.export.runtime import exported_format

    fmt = exported_format(args.model)
    if args.precision != "auto" and fmt != "openvino":
        raise ValueError(f"--precision {args.precision} is for OpenVINO exports (m2d export --format openvino); "
                         f"{args.model} is {'an ONNX export' if fmt else 'not one'}: drop the flag")
    with claim_output(args.output, overwrite=args.overwrite) as out:  # held until the file is in place
        texts = read_sentences(args.input, column=args.column)
        blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if blank is not None:  # a row of the .npy per input line: a blank one would be silent garbage
            where = f"{args.input}:{blank + 1}" if str(args.input).endswith(".txt") else f"{args.input} row {blank + 1}"
            raise ValueError(f"{where}: the text is blank ({sum(not t.strip() for t in texts)} blank in all); the "
                             ".npy has one row per input line, so remove blank lines, or encode with --exits "
                             "L:D --skip-empty to skip and count them")
        if fmt:
            start = time.perf_counter()
            emb = _encode_exported(args, texts)
        else:
            if args.int8:
                raise ValueError("--int8 runs the int8 graph of an ONNX/OpenVINO export; export one with "
                                 "m2d export --format onnx --quantize int8 and pass that folder")
            model = load_model(args)
            if args.threads is not None:
                import torch

                torch.set_num_threads(args.threads)
            start = time.perf_counter()
            emb = model.encode(
                texts, layer=args.layer, dim=args.dim, batch_size=args.batch_size, normalize=args.normalize,
                show_progress_bar=not args.quiet, input_type=args.input_type,
            )
        seconds = time.perf_counter() - start
        save_or_rescue(out, lambda path: save_array(path, emb), what="embeddings")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} in {seconds:.2f}s "
          f"({emb.shape[0] / seconds:.0f} sentences/s)")
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    """``--exits``: the corpus pipeline (:func:`matryoshka2d.corpus.pipeline.encode_corpus`)."""
    import torch

    from matryoshka2d.corpus.job import make_job
    from matryoshka2d.corpus.pipeline import encode_corpus
    from matryoshka2d.io.locks import output_lock

    if args.layer is not None or args.dim is not None:
        raise ValueError("--layer/--dim pick the one exit of a .npy output; with --exits give LAYER:DIM pairs")
    if args.int8:
        raise ValueError("--int8 applies to an ONNX/OpenVINO export's .npy output, not to --exits")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be a positive integer")
        torch.set_num_threads(args.threads)
    model = load_model(args)
    job = make_job(model, args.model, args.input, args.exits, fmt=args.format, normalize=args.normalize,
                   id_column=args.id_column, text_column=args.text_column or args.column, skip_empty=args.skip_empty,
                   shard_size=args.shard_size, batch_size=args.batch_size, pooling=args.pooling,
                   trust_remote_code=args.trust_remote_code, input_type=args.input_type)
    if args.engine == "ray":
        del model  # the actors load their own
        model = None
    with output_lock(args.output, what="corpus output folder"):  # one writer per folder, resumable after a kill
        result = encode_corpus(job, args.output, engine=args.engine, model=model, workers=args.workers,
                               threads_per_worker=args.threads_per_worker, ray_address=args.ray_address,
                               ray_timeout=args.ray_timeout, overwrite=args.overwrite, progress=not args.quiet)
    run = result["run"]
    exits = ",".join(f"{e['layer']}:{e['dim']}" for e in result["exits"])
    rate = run["encoded_rows"] / run["seconds"] if run["seconds"] > 0 else 0.0
    print(f"wrote {result['rows']} rows at exits {exits} ({result['format']}) in {result['num_shards']} shards "
          f"to {args.output} ({run['resumed_shards']} shards already done, {result['skipped_empty']} empty texts "
          f"skipped) in {run['seconds']:.1f}s ({rate:.0f} texts/s)")
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
    # OpenVINO: the library's defaults (export.runtime.auto_precision, auto_streams): with more than one batch,
    # one stream per thread (the same numbers, in bf16 1.14-1.34x the sentences/s of one batch on all threads
    # at exit 6, docs/benchmarks.md)
    encoder = load_exported(args.model, int8=args.int8, threads=args.threads, precision=args.precision)
    emb = encoder.encode(texts, batch_size=args.batch_size)
    if args.dim is not None and args.dim < width:  # a prefix of the normalised vector, normalised again
        emb = truncate(emb, args.dim)
    return emb
