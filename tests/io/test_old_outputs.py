"""Indexes and corpus outputs written before a change still load, search and read the same (issue 37).

``tests/fixtures/v0.2-outputs`` was written by ``tests/fixtures/make_fixtures.py`` with the code of the commit
it names (``expected.json``): the tiny random BERT as a model folder, ``m2d index`` of ten documents (faiss
flat, layer 4, dims 8 and 32) and ``m2d encode --exits 2:16,4:32`` of the same documents in three Parquet
shards. Model folders of an older layout are checked by ``test_old_folders.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from matryoshka2d import MatryoshkaEncoder  # noqa: E402
from matryoshka2d.cli import main  # noqa: E402

OLD = Path(__file__).parents[1] / "fixtures" / "v0.2-outputs"
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))


def corpus() -> tuple[list[str], list[str]]:
    rows = [line.split("\t") for line in (OLD / "corpus.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    return [r[0] for r in rows], [r[1] for r in rows]


def test_old_index_loads_and_searches_as_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matryoshka2d.search.index import CascadeIndex

    index = CascadeIndex.load(OLD / "index")  # every file checked against its manifest digest
    assert (index.layer, index.dims, index.ids) == (4, [8, 32], corpus()[0])
    out = tmp_path / "run.jsonl"
    # --model: the index records the absolute path it was built from, which moves with the checkout
    code = main(["-q", "search", str(OLD / "index"), "--queries", str(OLD / "queries.tsv"), *EXPECTED["search"]["argv"],
                 "--model", str(OLD / "model"), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    want = EXPECTED["search"]["hits"]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g["query_id"] == w["query_id"]
        assert [h["doc_id"] for h in g["results"]] == [h["doc_id"] for h in w["results"]]
        np.testing.assert_allclose([h["score"] for h in g["results"]], [h["score"] for h in w["results"]], atol=1e-5)


def test_old_corpus_output_reads_back_as_todays_model_encodes() -> None:
    from matryoshka2d.corpus.encoded import read_encoded

    ids, texts = corpus()
    model = MatryoshkaEncoder.from_pretrained(OLD / "model")
    for layer, dim in ((2, 16), (4, 32)):
        old = read_encoded(OLD / "encoded", layer=layer, dim=dim)  # every shard checked by SHA-256
        assert (old.ids, old.layer, old.dim) == (ids, layer, dim)
        np.testing.assert_allclose(old.vectors, model.encode(texts, layer=layer, dim=dim), atol=1e-5)


def test_old_corpus_output_builds_the_index_the_corpus_built(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from matryoshka2d.search.index import CascadeIndex

    out = tmp_path / "index"
    code = main(["-q", "index", str(OLD / "model"), "--encoded", str(OLD / "encoded"), "--layer", "4", "--dims",
                 "8,32", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    new, old = CascadeIndex.load(out), CascadeIndex.load(OLD / "index")
    assert new.ids == old.ids and new.dims == old.dims
    np.testing.assert_allclose(np.asarray(new.vectors, dtype=np.float32), np.asarray(old.vectors, dtype=np.float32),
                               atol=1e-5)
