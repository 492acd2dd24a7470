"""Cascade search quality vs cost on BEIR sets (issue 14): exhaustive, width funnels, shallow query exits.

For each set the corpus is encoded once at the full exit ``N`` and put in a flat
:class:`~matryoshka2d.search.CascadeIndex` with shortlist dims 32 / 64 / 128 and rerank vectors at ``D``.
The test queries are encoded at every exit. Configurations (``top`` = 100 results, so every metric is
defined; the headline is nDCG@10):

* (a) ``exhaustive``: queries at ``N``, exact search at ``D``;
* (b) ``funnel``: queries at ``N``, shortlist ``k`` = 100 at ``d`` = 32 / 64 / 128, rerank at ``D``;
  ``narrow``: the shortlist at ``d`` alone (no rerank; only the ``d``-dim index is needed);
* (d) ``sq8`` / ``sq4``: queries at ``N``, exhaustive search over 8-bit scalar-quantised vectors at 128 / ``D``
  or 6- / 4-bit ones at ``D``
  (faiss ``IndexScalarQuantizer``; no rerank, so only that index is needed);
* (c) ``shallow``: queries at exit ``n`` = 1..N-1 against the full-exit index, exhaustive and with the
  ``d`` = 64 funnel.
* (e) ``aligned``: the same full-exit index searched by the query exits of other models given with
  ``--query-models label=PATH,...`` (method.md section 8): a model aligned post-hoc (``m2d align``; its query
  exits with their own path, its full exit checked bit-identical to ``--model``'s on the first documents), or
  a standalone shallower query encoder (``m2d align --method separate``: its last exit). Timing runs the exit
  as a standalone model (``model.query_encoder(n)``: adapters merged, heads folded), as a deployment would.

Cost per query = query encode time (one query per call, the physically truncated model
``model.truncate(n)``) + search time (one query per call), medians over ``--repeats`` rounds after a
warm-up, with torch and faiss pinned to ``--threads`` threads. Index bytes = the files a configuration
reads. Encoding the corpus and scoring (all sets) run under a shared ``/tmp/m2d-cpu.lock``; then one timing
phase for all sets takes it exclusively. Corpus vectors are cached under ``--cache``.

    python benchmarks/cascade.py [--sets scifact,nfcorpus] [--threads 1] [--repeats 3] [--timing-queries 200]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FUNNEL_DIMS = (32, 64, 128)


@contextlib.contextmanager
def cpu_lock(exclusive: bool) -> Iterator[None]:
    with open("/tmp/m2d-cpu.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def corpus_vectors(model, data, layer: int, cache: Path, tag: str) -> np.ndarray:
    from matryoshka2d.encoder.batching import embed_layers

    path = cache / f"{tag}-{data.name}-L{layer}-{data.num_docs}.npy"
    if path.is_file():
        return np.load(path)
    parts = [embed_layers(model, data.doc_texts[i:i + 2048], [layer])[layer] for i in range(0, data.num_docs, 2048)]
    vectors = np.concatenate(parts)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def configs(num_layers: int) -> list[dict]:
    full = num_layers
    out = [{"group": "a", "name": "exhaustive", "query_layer": full, "shortlist_dim": None, "rerank": False}]
    for d in FUNNEL_DIMS:
        out.append({"group": "b", "name": f"funnel d{d}", "query_layer": full, "shortlist_dim": d, "rerank": True})
        out.append({"group": "b", "name": f"narrow d{d}", "query_layer": full, "shortlist_dim": d, "rerank": False})
    for kind, d in (("sq8", 128), ("sq8", None), ("sq6", None), ("sq4", None)):  # d = None: the full dim
        out.append({"group": "d", "name": f"{kind} d{d or 'full'}", "query_layer": full, "shortlist_dim": d,
                    "rerank": False, "index": kind})
    for n in range(1, full):
        out.append({"group": "c", "name": f"L{n} exhaustive", "query_layer": n, "shortlist_dim": None,
                    "rerank": False})
        out.append({"group": "c", "name": f"L{n} funnel d64", "query_layer": n, "shortlist_dim": 64, "rerank": True})
    return out


def aligned_query_exits(base, spec: str) -> dict:
    """``{(label, n): (encoder, standalone timed model)}`` of every query exit of the ``label=PATH`` models."""
    from matryoshka2d import MatryoshkaEncoder

    out = {}
    for item in filter(None, spec.split(",")):
        label, _, path = item.partition("=")
        m = MatryoshkaEncoder.from_pretrained(path).eval()
        if m.hidden_size != base.hidden_size:
            raise SystemExit(f"{path}: width {m.hidden_size} differs from the index model's {base.hidden_size}")
        if m.query_path is not None:
            probe = ["a test document about proteins", "another one"]
            if not np.array_equal(m.encode(probe, layer=base.num_layers), base.encode(probe, layer=base.num_layers)):
                raise SystemExit(f"{path}: its full exit differs from {base.metadata.get('source')}'s; it cannot "
                                 "search that index")
            out.update({(label, n): (m, m.query_encoder(n)) for n in m.query_path.layers})
        elif m.num_layers < base.num_layers:  # a standalone query encoder
            out[(label, m.num_layers)] = (m, m)
        else:
            raise SystemExit(f"{path}: neither aligned post-hoc (no query exits) nor a shallower query encoder")
    return out


def aligned_configs(query_exits: dict) -> list[dict]:
    out = []
    for label, n in query_exits:
        key = f"{label} L{n}"
        out.append({"group": "e", "name": f"{key} exhaustive", "query_layer": key, "shortlist_dim": None,
                    "rerank": False})
        out.append({"group": "e", "name": f"{key} funnel d64", "query_layer": key, "shortlist_dim": 64,
                    "rerank": True})
    return out


def search_args(cfg: dict, full_dim: int, k: int, top: int) -> dict:
    d = cfg["shortlist_dim"] or full_dim
    return {"shortlist_dim": d, "k": max(k, top), "rerank_dim": full_dim if cfg["rerank"] else 0, "top": top}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--sets", default="scifact,nfcorpus", help="named sets or BEIR folders")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--k", type=int, default=100, help="shortlist size of the funnels")
    parser.add_argument("--top", type=int, default=100, help="results per query")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-queries", type=int, default=200, help="queries timed per round (first n)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "m2d-cascade-cache"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cascade.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "retrieval-pareto.png"))
    parser.add_argument("--replot", default=None, help="only redraw --plot from this results JSON")
    parser.add_argument("--query-models", default="",
                        help="label=PATH,...: models whose query exits search --model's full-exit index (group e)")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text(encoding="utf-8"))["records"], args.plot)
        print(f"wrote {args.plot}")
        return 0
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.data.beir import load_beir
    from matryoshka2d.encoder.batching import embed_layers
    from matryoshka2d.evaluation.retrieval import run_metrics
    from matryoshka2d.io.atomic import atomic_write_json
    from matryoshka2d.search import CascadeIndex, cascade_search

    model = MatryoshkaEncoder.from_pretrained(args.model).eval()
    full, width = model.num_layers, model.hidden_size
    tag = Path(args.model).name
    query_exits = aligned_query_exits(model, args.query_models)  # {(label, n): (encoder for quality, for timing)}
    records: list[dict] = []
    prepared = []  # quality first, for every set, under the shared lock
    for set_name in args.sets.split(","):
        data = load_beir(set_name, data_dir=args.data_dir)
        with cpu_lock(exclusive=False):
            docs = corpus_vectors(model, data, full, Path(args.cache), tag)
            queries: dict = embed_layers(model, data.query_texts, list(range(1, full + 1)))
            for (label, n), (enc, _) in query_exits.items():
                queries[f"{label} L{n}"] = embed_layers(enc, data.query_texts, [n], input_type="query")[n]
            indexes = {"flat": CascadeIndex.from_vectors(data.doc_ids, docs, [*FUNNEL_DIMS, width], layer=full),
                       "sq8": CascadeIndex.from_vectors(data.doc_ids, docs, [128, width], layer=full, kind="sq8"),
                       **{k: CascadeIndex.from_vectors(data.doc_ids, docs, [width], layer=full, kind=k)
                          for k in ("sq6", "sq4")}}
            with tempfile.TemporaryDirectory() as tmp:
                for kind, index in indexes.items():
                    index.save(Path(tmp) / kind)  # for the file sizes
            rows = []
            for cfg in configs(full) + aligned_configs(query_exits):
                sargs = search_args(cfg, width, args.k, args.top)
                index = indexes[cfg.setdefault("index", "flat")]
                _, ranking = cascade_search(index, queries[cfg["query_layer"]], **sargs)
                scores = run_metrics(data.qrels, data.query_ids, data.doc_ids, ranking)
                rows.append({**cfg, **sargs, **{m: round(float(v.mean()), 3) for m, v in scores.items()},
                             "index_bytes": index.index_bytes(sargs["shortlist_dim"], sargs["rerank_dim"])})
        prepared.append((data, queries, indexes, rows))
        print(f"{data.name}: quality done", flush=True)
    # timing: one query per call, medians over rounds, every set in one exclusive hold of the CPU lock
    truncated: dict = {n: model.truncate(n).eval() for n in range(1, full + 1)}
    truncated.update({f"{label} L{n}": timed.eval() for (label, n), (_, timed) in query_exits.items()})
    with cpu_lock(exclusive=True), torch.inference_mode():
        for data, queries, indexes, rows in prepared:
            texts = data.query_texts[: args.timing_queries]
            encode_s: dict[int, list[float]] = {n: [] for n in truncated}
            search_s: dict[str, list[float]] = {r["name"]: [] for r in rows}
            for rnd in range(args.repeats + 1):  # round 0 warms up
                for n, m in truncated.items():
                    start = time.perf_counter()
                    for t in texts:
                        embed_layers(m, [t], [m.num_layers])
                    if rnd:
                        encode_s[n].append((time.perf_counter() - start) / len(texts))
                for r in rows:
                    qv = queries[r["query_layer"]][: len(texts)]
                    sargs = {k: r[k] for k in ("shortlist_dim", "k", "rerank_dim", "top")}
                    index = indexes[r["index"]]
                    start = time.perf_counter()
                    for i in range(len(qv)):
                        cascade_search(index, qv[i:i + 1], **sargs)
                    if rnd:
                        search_s[r["name"]].append((time.perf_counter() - start) / len(qv))
            for r in rows:
                enc, sea = statistics.median(encode_s[r["query_layer"]]), statistics.median(search_s[r["name"]])
                r.update(set=data.name, queries=len(data), docs=data.num_docs, encode_ms=round(1e3 * enc, 4),
                         search_ms=round(1e3 * sea, 4), cost_ms=round(1e3 * (enc + sea), 4))
    for data, _, _, rows in prepared:
        base = rows[0]
        for r in rows:
            r["ndcg_rel_loss"] = round(1 - r["ndcg@10"] / base["ndcg@10"], 5)
            r["cost_ratio"] = round(base["cost_ms"] / r["cost_ms"], 3)
            r["bytes_ratio"] = round(base["index_bytes"] / r["index_bytes"], 3)
            r["meets_goal"] = bool(r["ndcg_rel_loss"] <= 0.01 and (r["cost_ratio"] >= 3 or r["bytes_ratio"] >= 4))
            # issue 38's query-exit goals: >= 2x cheaper within 3%, >= 3x cheaper within 5% of exhaustive
            r["meets_2x_3pct"] = bool(r["ndcg_rel_loss"] <= 0.03 and r["cost_ratio"] >= 2)
            r["meets_3x_5pct"] = bool(r["ndcg_rel_loss"] <= 0.05 and r["cost_ratio"] >= 3)
        records += rows
        print(f"{data.name}: " + "; ".join(f"{r['name']} {r['ndcg@10']:.2f} {r['cost_ms']:.2f}ms" for r in rows),
              flush=True)
    out = {"benchmark": "cascade", "model": args.model, "threads": args.threads, "repeats": args.repeats,
           "timing_queries": args.timing_queries, "k": args.k, "top": args.top,
           "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "faiss": faiss.__version__,
                       "platform": platform.platform(), "processor": platform.processor()},
           "records": records}
    atomic_write_json(args.output, out)
    print(f"wrote {args.output}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot(records: list[dict], path: str) -> None:
    """Per set: nDCG@10 against cost per query (top) and against index bytes (bottom), Pareto fronts dashed."""
    from matplotlib.figure import Figure

    from matryoshka2d.io.atomic import atomic_open

    sets = list(dict.fromkeys(r["set"] for r in records))
    fig = Figure(figsize=(6.5 * len(sets), 9.5), layout="constrained")
    axes = fig.subplots(2, len(sets), squeeze=False)
    colors = {"a": "black", "b": "tab:blue", "c": "tab:orange", "d": "tab:green", "e": "tab:purple"}
    for col, s in enumerate(sets):
        rows = [r for r in records if r["set"] == s]
        for ax, key, label in ((axes[0, col], "cost_ms", "query encode + search per query (ms, log scale)"),
                               (axes[1, col], "index_mib", "index size (MiB, log scale)")):
            for r in rows:
                x = r["index_bytes"] / 2**20 if key == "index_mib" else r[key]
                marker = "s" if r["rerank"] else ("o" if r["group"] != "b" else "^")
                ax.scatter(x, r["ndcg@10"], color=colors[r["group"]], marker=marker, s=36, zorder=3)
                ax.annotate(r["name"], (x, r["ndcg@10"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
            front, best = [], -1.0
            for r in sorted(rows, key=lambda r: r["index_bytes"] if key == "index_mib" else r[key]):
                if r["ndcg@10"] > best:
                    front.append((r["index_bytes"] / 2**20 if key == "index_mib" else r[key], r["ndcg@10"]))
                    best = r["ndcg@10"]
            ax.plot(*zip(*front, strict=True), color="grey", linestyle="--", linewidth=1, zorder=2)
            ax.axhline(0.99 * rows[0]["ndcg@10"], color="red", linewidth=0.8, linestyle=":",
                       label="-1% of exhaustive (a)")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("nDCG@10 x100")
            ax.set_title(f"{s}: (a) black, (b) blue, (c) orange, (d) green, (e) aligned purple; squares = rerank",
                         fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
