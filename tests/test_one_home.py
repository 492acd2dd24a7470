"""One home for each concept: the vocabularies the CLI offers, the one rule for a corpus's columns, and the
table of export writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from matryoshka2d import vocab
from matryoshka2d.cli import main
from matryoshka2d.data.datasets import read_sentences
from matryoshka2d.data.files import pick_columns


# ------------------------------------------------------------------------------------------ vocabularies
@pytest.mark.parametrize(("argv", "choices"), [
    (["index", "m", "--corpus", "c", "--dims", "8", "--output", "o", "--type", "bogus"], vocab.INDEX_TYPES),
    (["index", "m", "--corpus", "c", "--dims", "8", "--output", "o", "--rerank-dtype", "bogus"],
     vocab.RERANK_DTYPES),
    (["encode", "m", "--input", "x", "--output", "o", "--engine", "bogus"], vocab.CORPUS_ENGINES),
    (["encode", "m", "--input", "x", "--output", "o", "--format", "bogus"], vocab.STORAGE_FORMATS),
    (["eval", "m", "--metric", "bogus"], vocab.METRICS),
    (["serve", "m", "--backend", "bogus"], vocab.SERVE_BACKENDS),
])
def test_cli_choices_come_from_vocab(argv: list[str], choices: tuple[str, ...],
                                     capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(repr(c) in err for c in choices), err


def test_export_quantization_checked_against_vocab() -> None:
    from matryoshka2d.export.formats import WRITERS

    assert set(WRITERS) == set(vocab.FORMATS)  # one writer per format, none without a row
    with pytest.raises(ValueError, match=r"unknown quantization 'int4'; choose one of int8 \(or none\)"):
        WRITERS["onnx"].check(None, 1, "int4", None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ corpus columns
@pytest.mark.parametrize(("header", "expected"), [
    (["id", "text"], ("id", "text", None)),
    (["text", "id"], ("id", "text", None)),
    (["doc_id", "title", "text"], ("doc_id", "text", "title")),
    (["_id", "title", "text", "metadata"], ("_id", "text", "title")),
    (["id", "sentence"], ("id", "sentence", None)),  # no text column: the first column that is not the id
    (["sentence1", "sentence2", "score"], (None, "sentence1", None)),
])
def test_pick_columns_defaults(header: list[str], expected: tuple) -> None:
    assert tuple(pick_columns(Path("c.tsv"), header)) == expected


def test_encode_and_index_read_a_corpus_alike(tiny_dir: Path, tmp_path: Path) -> None:
    """A column named id is the id and title + text the text, in every reader (m2d encode's --exits and .npy
    paths, m2d index)."""
    from matryoshka2d.corpus.readers import CorpusReader, read_corpus

    corpus = tmp_path / "c.tsv"
    corpus.write_text("title\ttext\tid\nT1\tfirst doc\tx\n\tsecond doc\ty\n", encoding="utf-8")
    records = list(CorpusReader([corpus]).records())
    assert [(r.id, r.text) for r in records] == [("x", "T1 first doc"), ("y", "second doc")]
    assert read_corpus(corpus) == (["x", "y"], ["T1 first doc", "second doc"])
    assert read_sentences(corpus) == ["T1 first doc", "second doc"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in (("a", "one"), ("b", "two"))),
                     encoding="utf-8")
    assert read_sentences(jsonl) == ["one", "two"]  # the text, not the id in the first column
    out = tmp_path / "index"
    assert main(["-q", "index", str(tiny_dir), "--pooling", "mean", "--corpus", str(corpus), "--dims", "8,32",
                 "--output", str(out)]) == 0
    assert json.loads((out / "ids.json").read_text()) == ["x", "y"]
    corpus.write_text("id\ttext\nx\tone\ny\t \n", encoding="utf-8")  # an empty document: the reader's rule
    args = ["-q", "index", str(tiny_dir), "--pooling", "mean", "--corpus", str(corpus), "--dims", "8,32",
            "--output", str(out), "--overwrite"]
    assert main(args) == 2
    assert main([*args, "--skip-empty"]) == 0 and json.loads((out / "ids.json").read_text()) == ["x"]


# ------------------------------------------------------------------------------------------ logging
def test_applications_set_up_logging_in_one_place_and_quiet_third_parties(monkeypatch):
    import logging

    from matryoshka2d.logs import setup_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(logging.getLogger("faiss.loader"), "level", logging.NOTSET)
    setup_logging(logging.INFO, verbose=True)  # -v: nothing silenced
    assert logging.getLogger("faiss.loader").level == logging.NOTSET
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    with setup_logging(logging.INFO):
        assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING  # "Could not load ..." hidden
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # no "Writing model shards" bars
    assert logging.getLogger("matryoshka2d").getEffectiveLevel() == logging.INFO


# ------------------------------------------------------------------------------------------ figures, studies
def test_figures_are_saved_as_palette_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from matryoshka2d.evaluation.plots import new_figure, save_figure

    fig = new_figure(4, 3)
    ax = fig.add_subplot()
    for k in range(6):
        ax.plot(range(10), [v * k for v in range(10)], label=f"layer {k}")
    ax.legend()
    path = save_figure(fig, tmp_path / "f.png")
    with Image.open(path) as image:
        assert image.mode == "P" and image.size == (600, 450)  # 150 dpi, a palette of at most 128 colours
        assert len(image.getcolors(256)) <= 128


@pytest.mark.parametrize("field", ["verdict_within", "verdict_full_exit"])
def test_study_verdict_thresholds_are_checked(field):
    from matryoshka2d.study.config import StudyConfig

    assert StudyConfig().verdict_within == 1.0 and StudyConfig().verdict_full_exit == 0.5
    with pytest.raises(ValueError, match=rf"study\.{field} -1: expected a number >= 0"):
        StudyConfig(**{field: -1})
