"""Cascade index on faiss: build / save / load, cascade search vs exact search, run files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from matryoshka2d.cli import main  # noqa: E402
from matryoshka2d.evaluation.retrieval import exact_topk, normalized_prefix  # noqa: E402
from matryoshka2d.search import CascadeIndex, cascade_search, write_run  # noqa: E402
from tests.helpers.beir import write_beir  # noqa: E402


@pytest.fixture()
def pooled() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(80, 32)).astype(np.float32)


@pytest.fixture()
def queries() -> np.ndarray:
    return np.random.default_rng(2).normal(size=(7, 32)).astype(np.float32)


def _ids(n: int) -> list[str]:
    return [f"doc-{i:03d}" for i in range(n)]


def test_round_trip_and_manifest(pooled: np.ndarray, queries: np.ndarray, tmp_path: Path) -> None:
    index = CascadeIndex.from_vectors(_ids(80), pooled, [8, 16, 32], layer=3)
    path = index.save(tmp_path / "idx")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["dims"] == [8, 16, 32] and manifest["layer"] == 3 and manifest["index_type"] == "flat"
    assert set(manifest["files"]) == {"ids.json", "vectors-32.npy", "shortlist-8.faiss", "shortlist-16.faiss"}
    loaded = CascadeIndex.load(path)
    assert loaded.ids == index.ids
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    a = cascade_search(index, queries, shortlist_dim=8, k=20, rerank_dim=32, top=5)
    b = cascade_search(loaded, queries, shortlist_dim=8, k=20, rerank_dim=32, top=5)
    np.testing.assert_array_equal(a[1], b[1])
    assert loaded.index_bytes(8, 32) == (manifest["files"]["shortlist-8.faiss"]["size"]
                                         + manifest["files"]["vectors-32.npy"]["size"])
    assert loaded.index_bytes(32) == manifest["files"]["vectors-32.npy"]["size"] > 80 * 32 * 4
    with pytest.raises(FileExistsError):
        index.save(path)
    (path / "vectors-32.npy").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"vectors-32.npy \(6 bytes, the manifest says"):
        CascadeIndex.load(path)


def test_exhaustive_cascade_equals_flat_search(pooled: np.ndarray, queries: np.ndarray) -> None:
    index = CascadeIndex.from_vectors(_ids(80), pooled, [8, 32], layer=1)
    full_q, full_d = normalized_prefix(queries, 32), normalized_prefix(pooled, 32)
    exact_s, exact_i = exact_topk(full_q, full_d, 10)
    s, i = cascade_search(index, queries, shortlist_dim=8, k=80, rerank_dim=32, top=10)  # k = corpus size
    np.testing.assert_array_equal(i, exact_i)
    np.testing.assert_allclose(s, exact_s, atol=1e-5)
    s2, i2 = cascade_search(index, queries, shortlist_dim=32, top=10)  # exhaustive at the full dim
    np.testing.assert_array_equal(i2, exact_i)
    # no rerank: the shortlist at dim 8 is exact search at dim 8
    _, i3 = cascade_search(index, queries, shortlist_dim=8, rerank_dim=0, top=10)
    np.testing.assert_array_equal(i3, exact_topk(normalized_prefix(queries, 8), normalized_prefix(pooled, 8), 10)[1])
    # rerank at 16 from the stored 32-dim vectors = exact search at 16 when the shortlist is everything
    _, i4 = cascade_search(index, queries, shortlist_dim=8, k=80, rerank_dim=16, top=10)
    np.testing.assert_array_equal(i4, exact_topk(normalized_prefix(queries, 16), normalized_prefix(pooled, 16), 10)[1])


def test_cascade_ties_by_row() -> None:
    pooled = np.zeros((6, 4), dtype=np.float32)
    pooled[:, 0] = 1  # all documents identical
    index = CascadeIndex.from_vectors(_ids(6), pooled, [2, 4], layer=1)
    _, rows = cascade_search(index, np.ones((1, 4), dtype=np.float32), shortlist_dim=2, k=6, rerank_dim=4, top=4)
    assert rows.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "sq8", "sq6", "sq4"])
def test_approximate_indexes(kind: str, pooled: np.ndarray, queries: np.ndarray, tmp_path: Path) -> None:
    index = CascadeIndex.from_vectors(_ids(80), pooled, [16, 32], layer=2, kind=kind, ivf_nlist=4, hnsw_m=8)
    loaded = CascadeIndex.load(index.save(tmp_path / kind))
    assert loaded.manifest["index_type"] == kind
    _, rows = cascade_search(loaded, queries, shortlist_dim=16, k=40, rerank_dim=32, top=5, nprobe=4)
    exact = exact_topk(normalized_prefix(queries, 32), normalized_prefix(pooled, 32), 5)[1]
    assert rows.shape == (7, 5) and (rows >= 0).all()
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, exact, strict=True)]) >= 0.6
    assert sorted(loaded.shortlists) == [16, 32]  # a non-flat index searches the full dim itself
    _, alone = cascade_search(loaded, queries, shortlist_dim=32, rerank_dim=0, top=5, nprobe=4)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(alone, exact, strict=True)]) >= 0.6
    assert loaded.index_bytes(32) == loaded.manifest["files"]["shortlist-32.faiss"]["size"]


def test_bad_arguments(pooled: np.ndarray, queries: np.ndarray) -> None:
    index = CascadeIndex.from_vectors(_ids(80), pooled, [8, 32], layer=1)
    with pytest.raises(ValueError, match="shortlist dim 16 is not stored"):
        cascade_search(index, queries, shortlist_dim=16)
    with pytest.raises(ValueError, match="top 20 must be <= k 10"):
        cascade_search(index, queries, shortlist_dim=8, k=10, rerank_dim=32, top=20)
    with pytest.raises(ValueError, match="rerank dim 4 must be in 8..32"):
        cascade_search(index, queries, shortlist_dim=8, rerank_dim=4)
    with pytest.raises(ValueError, match="ids repeat"):
        CascadeIndex.from_vectors(["a"] * 80, pooled, [8, 32], layer=1)
    with pytest.raises(ValueError, match="dims"):
        CascadeIndex.from_vectors(_ids(80), pooled, [8, 64], layer=1)
    with pytest.raises(ValueError, match="index type"):
        CascadeIndex.from_vectors(_ids(80), pooled, [8, 32], layer=1, kind="lsh")  # type: ignore[arg-type]


def test_run_files(tmp_path: Path) -> None:
    scores = np.array([[0.9, 0.5], [0.7, -np.inf]], dtype=np.float32)
    rows = np.array([[1, 0], [0, -1]])
    trec = write_run(tmp_path / "r.trec", ["q1", "q2"], ["a", "b"], scores, rows, tag="t")
    assert trec.read_text().splitlines() == ["q1 Q0 b 1 0.900000 t", "q1 Q0 a 2 0.500000 t", "q2 Q0 a 1 0.700000 t"]
    lines = write_run(tmp_path / "r.jsonl", ["q1", "q2"], ["a", "b"], scores, rows).read_text().splitlines()
    assert json.loads(lines[1]) == {"query_id": "q2", "results": [{"doc_id": "a", "rank": 1,
                                                                   "score": pytest.approx(0.7)}]}
    with pytest.raises(ValueError, match="unknown run format"):
        write_run(tmp_path / "r.csv", ["q1"], ["a"], scores[:1], rows[:1])


def test_cli_index_and_search(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_beir(tmp_path / "beir")
    idx, run = tmp_path / "idx", tmp_path / "run.trec"
    assert main(["index", str(tiny_dir), "--pooling", "mean", "--corpus", str(folder / "corpus.tsv"),
                 "--layer", "4", "--dims", "8,32", "--output", str(idx)]) == 0
    args = ["search", str(idx), "--queries", str(folder / "queries.tsv"), "--query-layer", "2", "--shortlist-dim",
            "8", "--k", "5", "--rerank-dim", "32", "--top", "3", "--qrels", str(folder / "qrels" / "test.tsv"),
            "--force"]  # layer 2 is not aligned to the layer-4 index (tests/training/test_query_exits.py)
    assert main([*args, "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "4 queries" in out  # 4 judged queries with a relevant document
    lines = run.read_text().splitlines()
    assert len(lines) == 6 * 3 and lines[0].split()[:2] == ["q1", "Q0"]
    corpus_ids = {line.split("\t")[0] for line in (folder / "corpus.tsv").read_text().splitlines()[1:]}
    assert {ln.split()[2] for ln in lines} <= corpus_ids
    assert main([*args, "--output", str(run)]) == 2  # exists
    assert main([*args[:-2], "--output", str(tmp_path / "r.csv")]) == 2  # bad suffix
    assert main(["search", str(tmp_path / "nope"), "--queries", "x.tsv", "--output", str(tmp_path / "a.trec")]) == 2
