"""``m2d index MODEL --corpus FILE --layer L --dims 64,384 --output IDX``: a cascade index of one exit."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from matryoshka2d.cli.common import add_model_args, int_list, load_model
from matryoshka2d.vocab import INDEX_TYPES, RERANK_DTYPES

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="encode a corpus at one exit into a cascade index (faiss shortlist + rerank)")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus",
                        help="corpus file (.tsv/.csv/.jsonl/.parquet, read as m2d encode reads it: id column id / "
                             "_id / doc_id, text = title + text), a BEIR folder, or scifact / nfcorpus")
    source.add_argument("--encoded",
                        help="an m2d encode --exits output folder: index its vectors of --layer instead of "
                             "encoding the corpus again (float32/float16 shards, checked against its manifest)")
    p.add_argument("--layer", default=None, help="exit layer of the documents (default: the last; with "
                                                 "--encoded, the deepest exit encoded)")
    p.add_argument("--dims", required=True,
                   help="comma-separated dims: the smaller ones get shortlist indexes, the largest holds the rerank "
                        "vectors (e.g. 64,384)")
    p.add_argument("--type", dest="index_type", choices=INDEX_TYPES, default="flat",
                   help="shortlist index: flat (exact, default), hnsw, ivf, sq8 / sq6 / sq4 (scalar quantised)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    p.add_argument("--ivf-nlist", type=int, default=None, help="IVF clusters (default ~4 sqrt(N))")
    p.add_argument("--rerank-dtype", choices=RERANK_DTYPES, default="float32",
                   help="storage of the rerank vectors")
    p.add_argument("--data-dir", default=None, help="data folder for scifact / nfcorpus")
    p.add_argument("--skip-empty", action="store_true", help="skip documents with an empty text instead of failing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", required=True, help="index folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.locks import claim_output

    with claim_output(args.output, kind="folder", overwrite=args.overwrite):  # held until the index is in place
        return build(args)


def build(args: argparse.Namespace) -> int:
    """The work of ``m2d index`` once its output folder is claimed."""
    from matryoshka2d.corpus.readers import read_corpus
    from matryoshka2d.data.beir import BEIR_SETS, find_beir_file, resolve_beir_dir
    from matryoshka2d.search.index import CascadeIndex

    model = load_model(args)
    layer = None if args.layer is None else int_list(args.layer, name="layer", upper=model.num_layers,
                                                     allow_all=False)[0]
    dims = int_list(args.dims, name="dim", upper=model.hidden_size, allow_all=False)
    start = time.perf_counter()
    if args.encoded:
        index, ids = from_encoded(args, model, layer, dims)
    else:
        corpus = Path(resolve_beir_dir(args.corpus, args.data_dir) if args.corpus in BEIR_SETS else args.corpus)
        ids, texts = read_corpus(find_beir_file(corpus, "corpus") if corpus.is_dir() else corpus,
                                 skip_empty=args.skip_empty)
        layer = model.num_layers if layer is None else layer
        index = CascadeIndex.build(model, ids, texts, layer=layer, dims=dims, kind=args.index_type,
                                   batch_size=args.batch_size, hnsw_m=args.hnsw_m, ivf_nlist=args.ivf_nlist,
                                   rerank_dtype=args.rerank_dtype, show_progress_bar=not args.quiet,
                                   source=args.model)
    layer = index.layer
    index.save(args.output, overwrite=args.overwrite)
    files = index.manifest["files"]
    print(f"indexed {len(ids)} documents at layer {layer}, dims {index.dims} ({args.index_type}) in "
          f"{time.perf_counter() - start:.1f}s: "
          + ", ".join(f"{k} {v['size'] / 2**20:.2f} MB" for k, v in files.items()))
    print(f"wrote {args.output}")
    return 0


def from_encoded(args: argparse.Namespace, model: object, layer: int | None, dims: list[int]) -> tuple[object, list]:
    """The index of ``--encoded``'s vectors at ``layer``, after checking they come from ``model``."""
    from matryoshka2d.corpus.encoded import encoded_metadata, read_encoded
    from matryoshka2d.io.folder import model_fingerprint
    from matryoshka2d.search.index import CascadeIndex, index_metadata

    encoded = read_encoded(args.encoded, layer)
    ours, theirs = model_fingerprint(args.model), model_fingerprint(encoded.model)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"--encoded {args.encoded} was encoded with {encoded.model!r}, whose fingerprint "
                         f"{theirs[:12]} differs from {args.model!r}'s {ours[:12]}; pass the model it was encoded with")
    if max(dims) > encoded.dim:
        raise ValueError(f"--dims {dims} go beyond the {encoded.dim} dims encoded at layer {encoded.layer} in "
                         f"{args.encoded}; pass dims up to {encoded.dim}")
    meta = {**index_metadata(model, encoded.layer, args.model), **encoded_metadata(encoded)}
    index = CascadeIndex.from_vectors(encoded.ids, encoded.vectors, dims, layer=encoded.layer, kind=args.index_type,
                                      hnsw_m=args.hnsw_m, ivf_nlist=args.ivf_nlist, rerank_dtype=args.rerank_dtype,
                                      metadata=meta)
    return index, encoded.ids
