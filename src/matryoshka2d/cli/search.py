"""``m2d search IDX --queries FILE --query-layer Lq --shortlist-dim 64 --k 100 --rerank-dim 384 --top 10``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from matryoshka2d.cli.common import add_input_type_arg

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="cascade search of an m2d index: shortlist at a narrow dim, rerank wider")
    p.add_argument("index", help="index folder written by m2d index")
    p.add_argument("--queries", required=True,
                   help="queries file (query_id, text: .tsv/.jsonl), or scifact / nfcorpus (the --split queries)")
    p.add_argument("--model", default=None,
                   help="query encoder (default: the index's model, by the absolute path it recorded)")
    p.add_argument("--force", action="store_true",
                   help="search with a --model whose fingerprint or width differs from the index's model, or at a "
                        "--query-layer that is not aligned to the index's document exit")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="check the index files' sizes only, not their SHA-256 (for huge indexes read often)")
    p.add_argument("--pooling", default=None, help="override pooling (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped in the model folder")
    p.add_argument("--query-layer", type=int, default=None,
                   help="exit layer of the queries (default: the index's); it must be aligned to the index's "
                        "document exit (m2d info MODEL lists the aligned exits), unless --force")
    add_input_type_arg(p, default="query", when="the queries: ")
    p.add_argument("--shortlist-dim", type=int, default=None,
                   help="shortlist dim, one the index stores (default: the index's smallest)")
    p.add_argument("--k", type=int, default=100, help="shortlist size")
    p.add_argument("--rerank-dim", type=int, default=None,
                   help="rerank dim (default: the index's full dim; 0 = no rerank)")
    p.add_argument("--top", type=int, default=10, help="results per query")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (default max(k, 16))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF clusters probed (default nlist / 8)")
    p.add_argument("--split", default="test", help="split of a named query set (its qrels choose the queries)")
    p.add_argument("--qrels", default=None,
                   help="qrels file to score the run with (nDCG@10 ...; named query sets use their own)")
    p.add_argument("--data-dir", default=None, help="data folder for scifact / nfcorpus")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", required=True, help="run file: .trec / .txt / .run (TREC) or .jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.locks import claim_output
    from matryoshka2d.search.cascade import RUN_SUFFIXES

    if Path(args.output).suffix.lower() not in RUN_SUFFIXES:
        raise ValueError(f"--output {args.output}: use a run file suffix, one of {list(RUN_SUFFIXES)}")
    with claim_output(args.output, overwrite=args.overwrite):  # held until the run file is in place
        return search(args)


def search(args: argparse.Namespace) -> int:
    """The work of ``m2d search`` once its output is claimed."""
    from matryoshka2d.data.beir import BEIR_SETS, load_beir, read_qrels, read_queries
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.io.outputs import save_or_rescue
    from matryoshka2d.search.cascade import cascade_search, encode_queries, write_run
    from matryoshka2d.search.index import CascadeIndex
    from matryoshka2d.search.provenance import check_query_exit, check_query_model, query_model_source

    index = CascadeIndex.load(args.index, verify=args.verify)
    qrels = None
    if args.queries in BEIR_SETS and not Path(args.queries).exists():
        data = load_beir(args.queries, args.split, data_dir=args.data_dir)
        qids, texts, qrels = data.query_ids, data.query_texts, data.qrels
    else:
        qids, texts = read_queries(args.queries)
    if args.qrels:
        qrels = {}
        for _, q, d, g in read_qrels(args.qrels):
            qrels.setdefault(q, {})[d] = g
    source = query_model_source(index.manifest, args.model)
    model = MatryoshkaEncoder.from_pretrained(source, pooling=args.pooling or index.manifest.get("pooling"),
                                              trust_remote_code=args.trust_remote_code)
    check_query_model(index.manifest, model, source, force=args.force)
    layer = index.layer if args.query_layer is None else model.check_layer(args.query_layer)
    check_query_exit(model, layer, index.layer, input_type=args.input_type, force=args.force)
    shortlist = index.check_shortlist(index.dims[0] if args.shortlist_dim is None else args.shortlist_dim)
    if qrels:
        warn_unindexed(qrels, index.ids, args.index)
    rerank = index.full_dim if args.rerank_dim is None else args.rerank_dim
    start = time.perf_counter()
    vectors = encode_queries(model, texts, layer, dim=index.full_dim, batch_size=args.batch_size,
                             show_progress_bar=not args.quiet, input_type=args.input_type)
    encoded = time.perf_counter()
    scores, rows = cascade_search(index, vectors, shortlist_dim=shortlist, k=args.k, rerank_dim=rerank,
                                  top=args.top, ef_search=args.ef_search, nprobe=args.nprobe)
    searched = time.perf_counter()
    tag = f"m2d-L{layer}-s{shortlist}-r{rerank or 0}"
    save_or_rescue(args.output, lambda path: write_run(path, qids, index.ids, scores, rows, tag=tag), what="run file")
    print(f"{len(qids)} queries at layer {layer} against the layer-{index.layer} index: shortlist {args.k} at "
          f"dim {shortlist}, rerank at {rerank or 'none'}, top {args.top}; encode {encoded - start:.2f}s, "
          f"search {searched - encoded:.3f}s; index bytes {index.index_bytes(shortlist, rerank)}")
    if qrels:
        from matryoshka2d.evaluation.retrieval import run_metrics

        judged = [i for i, q in enumerate(qids) if q in qrels and any(g > 0 for g in qrels[q].values())]
        if judged:
            metrics = [m for m in ("ndcg@10", "recall@100", "mrr@10", "map@100") if int(m.split("@")[1]) <= args.top]
            values = run_metrics(qrels, [qids[i] for i in judged], index.ids, rows[judged], metrics or ["ndcg@10"])
            print(", ".join(f"{m} {v.mean():.2f}" for m, v in values.items()) + f" (x100, {len(judged)} queries)")
    print(f"wrote {args.output}")
    return 0


def warn_unindexed(qrels: dict[str, dict[str, int]], doc_ids: list[str], index: str) -> None:
    """Warn when relevant documents of ``qrels`` are not in the index (they cannot be found, scores drop)."""
    ids = set(doc_ids)
    missing = sorted({d for docs in qrels.values() for d, g in docs.items() if g > 0 and d not in ids})
    if missing:
        logger.warning("%d relevant document(s) of the qrels are not in the index %s (first: %r); they can never "
                       "be retrieved, so recall and nDCG are lower than on the full corpus", len(missing), index,
                       missing[0])
