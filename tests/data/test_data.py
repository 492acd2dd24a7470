"""Loaders of matryoshka2d.data.datasets: real row counts, formats, and every kind of bad input."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from matryoshka2d.data import datasets as data
from matryoshka2d.data.datasets import (
    STS_SETS,
    ScoredPairs,
    TrainingData,
    load_sts,
    load_training_data,
    read_sentences,
    resolve_data_dir,
    sts_subsets,
)

# ----------------------------------------------------------------------------------- real data
COUNTS = {
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("stsb", "test"): 1379,
    ("sickr", "train"): 4500, ("sickr", "dev"): 500, ("sickr", "test"): 4927,
    ("sts12", "test"): 3108, ("sts13", "test"): 1500, ("sts14", "test"): 3750,
    ("sts15", "test"): 3000, ("sts16", "test"): 1186,
}


@pytest.mark.parametrize("variant", ["original", "senteval_tok"])
@pytest.mark.parametrize(("name", "split"), list(COUNTS))
def test_real_sts_row_counts(shared_data: Path, name: str, split: str, variant: str) -> None:
    pairs = load_sts(name, split, variant=variant, data_dir=shared_data)
    assert len(pairs) == COUNTS[(name, split)]
    assert pairs.scores.dtype == np.float64
    low, high = (1.0, 5.0) if name == "sickr" else (0.0, 5.0)
    assert low <= pairs.scores.min() and pairs.scores.max() <= high  # raw gold scale kept
    assert pairs.name == (name if split == "test" else f"{name}-{split}")


SUBSETS = {
    "sts12": {"MSRpar": 750, "MSRvid": 750, "SMTeuroparl": 459, "surprise.OnWN": 750,
              "surprise.SMTnews": 399},
    "sts13": {"FNWN": 189, "headlines": 750, "OnWN": 561},
    "sts14": {"deft-forum": 450, "deft-news": 300, "headlines": 750, "images": 750, "OnWN": 750,
              "tweet-news": 750},
    "sts15": {"answers-forums": 375, "answers-students": 750, "belief": 375, "headlines": 750, "images": 750},
    "sts16": {"answer-answer": 254, "headlines": 249, "plagiarism": 230, "postediting": 244,
              "question-question": 209},
}


@pytest.mark.parametrize("name", list(SUBSETS))
def test_real_subsets_partition_the_pooled_set(shared_data: Path, name: str) -> None:
    assert sts_subsets(name, data_dir=shared_data) == list(SUBSETS[name])
    pooled = load_sts(name, data_dir=shared_data)
    parts = [load_sts(name, subset=s, data_dir=shared_data) for s in SUBSETS[name]]
    assert [len(p) for p in parts] == list(SUBSETS[name].values())
    assert sum(len(p) for p in parts) == len(pooled)
    assert [s for p in parts for s in p.sentences1] == pooled.sentences1
    assert parts[0].name == f"{name}/{list(SUBSETS[name])[0]}"


def test_real_training_sets(shared_data: Path) -> None:
    stsb = load_training_data("stsb", data_dir=shared_data)
    assert (stsb.kind, len(stsb), list(stsb.columns)) == ("scored", 5749, ["sentence1", "sentence2"])
    assert stsb.scores is not None and stsb.scores.max() == 5.0
    sick = load_training_data("sickr", split="dev", data_dir=shared_data)
    assert (sick.kind, len(sick), sick.name) == ("scored", 500, "sickr-dev")
    nli = load_training_data("nli", data_dir=shared_data)
    assert (nli.kind, len(nli), nli.scores) == ("triplets", 2954, None)
    assert list(nli.columns) == ["anchor", "positive", "negative"]
    assert len(load_training_data("nli", split="test", data_dir=shared_data)) == 2927
    assert len(load_training_data("nli", data_dir=shared_data, limit=10)) == 10


def test_real_read_sentences_of_a_named_set(shared_data: Path) -> None:
    pairs = load_sts("stsb", data_dir=shared_data)
    unique = read_sentences("stsb", data_dir=shared_data)
    rows = zip(pairs.sentences1, pairs.sentences2, strict=True)
    assert unique == list(dict.fromkeys(s for pair in rows for s in pair))
    assert len(unique) == len(set(unique))


# ----------------------------------------------------------------------------------- helpers
def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def tsv(rows: list[list[str]], header: str = "sentence1\tsentence2\tscore") -> str:
    return header + "\n" + "".join("\t".join(r) + "\n" for r in rows)


GOOD = [["a man plays", "a man is playing", "4.5"], ["a dog", "a cat", "1.0"], ["x", "y", "0"]]


def make_data_dir(root: Path) -> Path:
    (root / "stsb").mkdir(parents=True)
    write(root / "stsb" / "test.tsv", tsv(GOOD))
    write(root / "stsb" / "train.tsv", tsv(GOOD * 2))
    (root / "sts12").mkdir()
    write(root / "sts12" / "test.tsv", tsv(GOOD + [["p", "q", "2"], ["r", "s", "3"]]))
    write(root / "sts12" / "subsets.tsv", "subset\tfirst_row\tlast_row\trows\nA\t1\t3\t3\nB\t4\t5\t2\n")
    return root


# ----------------------------------------------------------------------------------- locating data
def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arg, env, local = tmp_path / "arg", tmp_path / "env", tmp_path / "cwd" / "data"
    for p in (arg, env, local / "stsb"):
        p.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("M2D_DATA_DIR", str(env))
    assert resolve_data_dir(arg) == arg
    assert resolve_data_dir() == env
    monkeypatch.delenv("M2D_DATA_DIR")
    assert resolve_data_dir() == local.resolve()


def test_resolve_data_dir_errors_list_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("M2D_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_SOURCE_ROOT", tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match=r"looked at data_dir \(not given\), \$M2D_DATA_DIR \(not "
                                                r"set\), .*data, .*shared.data, .*shared.data; pass "):
        resolve_data_dir()
    with pytest.raises(FileNotFoundError, match=r"data_dir '.*nope' is not a directory"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("M2D_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"\$M2D_DATA_DIR '.*gone' is not a directory"):
        resolve_data_dir()


def test_data_folder_is_found_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last place looked at is <checkout>/../shared/data, whatever the working directory (issue 35)."""
    repo = Path(__file__).resolve().parents[2]
    assert data._SOURCE_ROOT == repo  # the checkout, not src/
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("M2D_DATA_DIR", raising=False)
    shared = repo.parent / "shared" / "data"
    if any((shared / name).is_dir() for name in data.NAMED_SETS):
        assert resolve_data_dir() == shared.resolve()
    else:
        with pytest.raises(FileNotFoundError, match=re.escape(str(shared.resolve()))):
            resolve_data_dir()


# ----------------------------------------------------------------------------------- load_sts
def test_load_sts_synthetic_and_subsets(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path)
    pairs = load_sts("stsb", data_dir=root)
    assert pairs.sentences1 == ["a man plays", "a dog", "x"]
    np.testing.assert_array_equal(pairs.scores, [4.5, 1.0, 0.0])
    b = load_sts("sts12", subset="B", data_dir=root)
    assert (b.name, b.sentences1) == ("sts12/B", ["p", "r"])


def test_load_sts_argument_errors(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown STS set 'sts17'; known sets: sts12, sts13, sts14, sts15, "
                                         "sts16, stsb, sickr"):
        load_sts("sts17", data_dir=root)
    with pytest.raises(ValueError, match="sts12 has no split 'dev'; valid splits: test"):
        load_sts("sts12", "dev", data_dir=root)
    with pytest.raises(ValueError, match="stsb has no split 'validation'; valid splits: train, dev, test"):
        load_sts("stsb", "validation", data_dir=root)
    with pytest.raises(ValueError, match="variant 'tok' is not one of"):
        load_sts("stsb", variant="tok", data_dir=root)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sts12 has no subset 'C'; known subsets: A, B"):
        load_sts("sts12", subset="C", data_dir=root)
    with pytest.raises(ValueError, match="stsb has no sub-corpora"):
        load_sts("stsb", subset="A", data_dir=root)
    with pytest.raises(FileNotFoundError, match=r"sickr.test\.tsv: no such file"):
        load_sts("sickr", data_dir=root)


def test_scored_pairs_validation() -> None:
    with pytest.raises(ValueError, match="must have equal lengths"):
        ScoredPairs("x", ["a", "b"], ["c"], [1, 2])
    with pytest.raises(ValueError, match="a correlation needs at least 2"):
        ScoredPairs("x", ["a"], ["c"], [1])
    with pytest.raises(ValueError, match="NaN or inf"):
        ScoredPairs("x", ["a", "b"], ["c", "d"], [1, math.nan])
    pairs = ScoredPairs("x", ["a", "b", "a"], ["b", "c", "d"], [1, 2, 3])
    unique, i1, i2 = pairs.unique_sentences()
    assert unique == ["a", "b", "c", "d"]
    assert [unique[i] for i in i1] == pairs.sentences1 and [unique[i] for i in i2] == pairs.sentences2


def test_training_data_validation() -> None:
    with pytest.raises(ValueError, match=r"needs columns \['anchor', 'positive'\]"):
        TrainingData("x", "pairs", {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="of kind 'scored' needs scores"):
        TrainingData("x", "scored", {"sentence1": ["x"], "sentence2": ["y"]})
    with pytest.raises(ValueError, match="kind 'quad' is not one of"):
        TrainingData("x", "quad", {})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- formats
def test_tsv_csv_jsonl_give_the_same_data(tmp_path: Path) -> None:
    rows = [['he said "hi", then left', "a, b", "3.25"], ["x\x12y", "tab-free", "-1e3"], ["é ü 中", "q", "7"]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["sentence1", "sentence2", "score"], *rows])
    files = [write(tmp_path / "d.tsv", tsv(rows)), write(tmp_path / "d.csv", buf.getvalue()),
             write(tmp_path / "d.jsonl", "".join(json.dumps(dict(zip(["sentence1", "sentence2", "score"], r,
                                                                     strict=True))) + "\n" for r in rows))]
    for f in files:
        d = load_training_data(f)
        assert d.kind == "scored" and d.name == "d"
        assert d.columns == {"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows]}
        np.testing.assert_array_equal(d.scores, [3.25, -1000.0, 7.0])  # raw scale, no rescaling


def test_kind_detection_and_columns(tmp_path: Path) -> None:
    trip = write(tmp_path / "t.tsv", "negative\tanchor\tpositive\nn1\ta1\tp1\n")
    d = load_training_data(trip)
    assert d.kind == "triplets" and d.columns == {"anchor": ["a1"], "positive": ["p1"], "negative": ["n1"]}
    pairs = write(tmp_path / "p.jsonl", '{"anchor": "a", "positive": "p", "id": 3}\n')
    assert load_training_data(pairs).kind == "pairs"
    custom = write(tmp_path / "c.csv", "s1,s2,label\na,b,1\nc,d,0\n")
    d = load_training_data(custom, columns=["s1", "s2", "label"])
    assert d.kind == "scored" and d.columns["sentence2"] == ["b", "d"]
    swapped = load_training_data(custom, columns=["s2", "s1"])
    assert swapped.columns == {"anchor": ["b", "d"], "positive": ["a", "c"]}
    with pytest.raises(ValueError, match=r"cannot tell the kind of columns \['s1', 's2', 'x'\]; pass kind="):
        load_training_data(write(tmp_path / "x.tsv", "s1\ts2\tx\na\tb\tc\n"), columns=["s1", "s2", "x"])
    with pytest.raises(ValueError, match=r"x\.tsv:1: cannot tell the data kind from columns \['s1', 's2', "):
        load_training_data(tmp_path / "x.tsv")
    forced = load_training_data(tmp_path / "x.tsv", kind="triplets", columns=["s1", "s2", "x"])
    assert forced.kind == "triplets"
    with pytest.raises(ValueError, match=r"kind 'pairs' takes 2 columns"):
        load_training_data(custom, kind="pairs", columns=["s1", "s2", "label"])
    assert len(load_training_data(custom, columns=["s1", "s2", "label"], limit=1)) == 1
    with pytest.raises(ValueError, match="limit 0 must be >= 1"):
        load_training_data(custom, limit=0)


def test_named_set_errors(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path)
    assert len(load_training_data("stsb", data_dir=root)) == 6
    with pytest.raises(ValueError, match="sts12 has no split 'train'; valid splits: test"):
        load_training_data("sts12", data_dir=root)
    with pytest.raises(ValueError, match="nli has no split 'x'; valid splits: train, dev, test"):
        load_training_data("nli", split="x", data_dir=root)
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv: no such file \(named sets are sts12"):
        load_training_data("missing.tsv", data_dir=root)


def test_relative_path_falls_back_to_data_dir(tmp_path: Path) -> None:
    root = make_data_dir(tmp_path)
    assert len(load_training_data("stsb/test.tsv", data_dir=root)) == 3


# ----------------------------------------------------------------------------------- bad input, pinned
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"f\.tsv:1: file is empty"),
        (b"sentence1\tsentence2\tscore\n", r"f\.tsv:2: no data rows after the header"),
        (b"sentence1\tsentence2\tscore\na\tb\t1\nc\td\n",
         r"f\.tsv:3: 2 fields, expected 3 \(\['sentence1', 'sentence2', 'score'\]\); row: 'c\\\\td'"),
        (b"sentence1\tsentence2\tscore\na\tb\t1\tx\n", r"f\.tsv:2: 4 fields, expected 3"),
        (b"sentence1\tsentence2\tscore\na\tb\thigh\n", r"f\.tsv:2: 'score' value 'high' is not a finite"),
        (b"sentence1\tsentence2\tscore\na\tb\tnan\n", r"f\.tsv:2: 'score' value 'nan' is not a finite"),
        (b"sentence1\tsentence2\tscore\na\tb\t1\nc\td\t-inf\n", r"f\.tsv:3: 'score' value '-inf' is not a"),
        (b"sentence1\tsentence2\tscore\na\tb\t1e400\n", r"f\.tsv:2: 'score' value '1e400' is not a finite"),
        (b"sentence1\tsentence2\tscore\na\tb\t\n", r"f\.tsv:2: 'score' value '' is not a finite number"),
        (b"sentence1\tsentence2\tscore\na\t\t1\n", r"f\.tsv:2: empty 'sentence2' field"),
        (b"sentence1\tsentence2\tscore\n  \tb\t1\n", r"f\.tsv:2: empty 'sentence1' field"),
        (b"sentence1\tsentence2\tscore\na\tb\t1\nc\x00d\te\t2\n", r"f\.tsv:3: NUL byte in the file"),
        (b"sentence1\tsentence2\tscore\na\t\xff\t1\n", r"f\.tsv:2: not valid UTF-8"),
        (b"sentence1\tsentence2\tlabel\na\tb\t1\n",
         r"f\.tsv:1: cannot tell the data kind from columns \['sentence1', 'sentence2', 'label'\]"),
        (b"sentence1\t\tscore\na\tb\t1\n", r"f\.tsv:1: header .* has empty or repeated column names"),
        (b"\xff\xfes\x00", r"f\.tsv:1: NUL byte in the file; it must be UTF-8 text \(is it UTF-16"),
    ],
)
def test_bad_tsv_is_rejected_with_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_training_data(write(tmp_path / "f.tsv", content))


def test_missing_column_lists_found_and_expected(tmp_path: Path) -> None:
    f = write(tmp_path / "f.tsv", "sentence1\tsentence2\tscore\na\tb\t1\n")
    with pytest.raises(ValueError, match=r"f\.tsv:1: missing column\(s\) \['s1'\]; found \['sentence1', "
                                         r"'sentence2', 'score'\], expected \['s1', 'sentence2', 'score'\]"):
        load_training_data(f, columns=["s1", "sentence2", "score"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]; found"):
        read_sentences(f, "text")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("f.csv", 'sentence1,sentence2,score\n"a,b",c,1\nd,e\n', r"f\.csv:3: 2 fields, expected 3"),
        ("f.csv", 'sentence1,sentence2,score\na,"b"x,1\n', r"f\.csv:2: malformed CSV"),
        ("f.csv", "sentence1,sentence2,score\na,b,1\nc,,2\n", r"f\.csv:3: empty 'sentence2' field"),
        ("f.csv", 'sentence1,sentence2,score\n"multi\nline",b,1\nc,d,x\n', r"f\.csv:4: 'score' value 'x'"),
        ("f.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"\n',
         r"f\.jsonl:2: invalid JSON"),
        ("f.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n[1, 2]\n',
         r"f\.jsonl:2: expected a non-empty JSON object per line"),
        ("f.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "score": 2}\n',
         r"f\.jsonl:2: keys \['score', 'sentence1'\] differ from the first object's keys"),
        ("f.jsonl", '{"sentence1": "a", "sentence2": "b", "score": NaN}\n', r"f\.jsonl:1: 'score' value nan"),
        ("f.jsonl", '{"sentence1": "a", "sentence2": "b", "score": true}\n', r"f\.jsonl:1: 'score' value Tr"),
        ("f.jsonl", '{"sentence1": "a", "sentence2": 5, "score": 1}\n',
         r"f\.jsonl:1: column 'sentence2' must be text, got 5"),
        ("f.txt", "a\nb\n", r"f\.txt: unsupported file type '\.txt'; use one of"),
    ],
)
def test_bad_csv_jsonl_are_rejected_with_file_and_line(tmp_path: Path, name: str, content: str,
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_training_data(write(tmp_path / name, content))


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    content = "\ufeffsentence1\tsentence2\tscore\r\na\tb\t1\r\n\r\nc\td\t 2.5 \r\n"
    d = load_training_data(write(tmp_path / "f.tsv", content))
    assert d.columns == {"sentence1": ["a", "c"], "sentence2": ["b", "d"]}
    np.testing.assert_array_equal(d.scores, [1.0, 2.5])
    csv_d = load_training_data(write(tmp_path / "f.csv", "\ufeffsentence1,sentence2,score\r\na,b,1\r\n"))
    assert csv_d.columns["sentence1"] == ["a"]
    jl = load_training_data(write(tmp_path / "f.jsonl", '\ufeff{"anchor": "a", "positive": "b"}\r\n'))
    assert jl.columns == {"anchor": ["a"], "positive": ["b"]}


# ----------------------------------------------------------------------------------- read_sentences
def test_read_sentences_formats(tmp_path: Path) -> None:
    assert read_sentences(write(tmp_path / "s.txt", "\ufeffone\r\n\r\ntwo\n")) == ["one", "", "two"]
    assert read_sentences(write(tmp_path / "n.txt", "no newline at end")) == ["no newline at end"]
    f = write(tmp_path / "s.tsv", "id\ttext\n1\thello\n2\tworld\n")
    assert read_sentences(f) == ["hello", "world"]  # the text column, not the id in the first column
    assert read_sentences(f, "text") == ["hello", "world"]
    assert read_sentences(write(tmp_path / "s.jsonl", '{"text": "a"}\n{"text": "b"}\n')) == ["a", "b"]
    root = make_data_dir(tmp_path / "data")
    expected = ["a man plays", "a man is playing", "a dog", "a cat", "x", "y"]  # first seen, row by row
    assert read_sentences("stsb", data_dir=root) == expected


def test_read_sentences_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"e\.txt:1: file is empty"):
        read_sentences(write(tmp_path / "e.txt", ""))
    with pytest.raises(ValueError, match=r"n\.txt:2: NUL byte"):
        read_sentences(write(tmp_path / "n.txt", "a\nb\x00\n"))
    with pytest.raises(ValueError, match=r"s\.txt: a \.txt file has no columns"):
        read_sentences(write(tmp_path / "s.txt", "a\n"), "text")
    with pytest.raises(ValueError, match=r"s\.tsv:3: empty 'text' field"):
        read_sentences(write(tmp_path / "s.tsv", "id\ttext\n1\ta\n2\t \n"), "text")
    with pytest.raises(ValueError, match=r"s\.npy: unsupported file type"):
        read_sentences(write(tmp_path / "s.npy", "x"))
    with pytest.raises(FileNotFoundError, match=r"nothere\.txt: no such file"):
        read_sentences(tmp_path / "nothere.txt")


# ----------------------------------------------------------------------------------- properties
# Any UTF-8-encodable text, including tabs, CR/LF, NUL, BOM, unicode separators and long lines.
TEXT = st.one_of(st.text(st.characters(codec="utf-8"), max_size=20),
                 st.text(st.characters(codec="utf-8"), min_size=500, max_size=3000),
                 st.sampled_from(["", " ", "\t", "\r", "\n", "\x00", "\ufeff", "\u2028", "a\tb", "ok"]))
SCORE = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.floats(min_value=-1e308, max_value=1e308).map(str),
                  st.sampled_from(["nan", "inf", "-inf", "1e400", "", " 3 ", "x", "4.5"]), TEXT)
# Valid fields are drawn often enough that whole files are clean, not only rejected.
SAFE_CHARS = st.characters(codec="utf-8", exclude_characters="\t\n\r\x00")
SAFE_TEXT = st.one_of(st.text(SAFE_CHARS, min_size=1, max_size=30),
                      st.text(SAFE_CHARS, min_size=1000, max_size=5000)).filter(lambda t: bool(t.strip()))
GOOD_SCORE = st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr),
                       st.integers(-10, 10).map(str))
GOOD_ROW = st.tuples(SAFE_TEXT, SAFE_TEXT, GOOD_SCORE).map(list)
ROW = st.one_of(GOOD_ROW, GOOD_ROW, GOOD_ROW, GOOD_ROW,
                st.lists(st.one_of(TEXT, SCORE), min_size=3, max_size=3),
                st.lists(TEXT, min_size=0, max_size=5))
FILES = st.tuples(st.lists(ROW, min_size=0, max_size=6), st.booleans(), st.booleans())
PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LINE_ERROR = r"^{}:\d+: "


def _clean_text(t: object) -> bool:
    return isinstance(t, str) and bool(t.strip()) and not any(c in t for c in "\t\n\r\x00")


def _finite(s: object) -> bool:
    try:
        return math.isfinite(float(s))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def _check(path: Path, load, expected) -> None:  # noqa: ANN001
    try:
        got = load(path)
    except ValueError as e:
        event("rejected with file:line")
        assert re.match(LINE_ERROR.format(re.escape(str(path))), str(e)), str(e)
        assert expected is None, f"a clean file was rejected: {e}"
        return
    event("clean, loaded exactly" if expected is not None else "not clean, loaded")
    if expected is not None:
        assert got == expected


def _scored(d: TrainingData) -> tuple[list[str], list[str], list[float]]:
    return d.columns["sentence1"], d.columns["sentence2"], list(d.scores)  # type: ignore[arg-type]


@PROPERTY
@given(FILES)
def test_property_tsv(capsys: pytest.CaptureFixture[str], spec) -> None:  # noqa: ANN001
    rows, bom, crlf = spec
    end = "\r\n" if crlf else "\n"
    header = ["sentence1", "sentence2", "score"]
    text = ("\ufeff" if bom else "") + end.join("\t".join(r) for r in [header, *rows])
    clean = rows and all(len(r) == 3 and _clean_text(r[0]) and _clean_text(r[1]) and _finite(r[2])
                         and "\t" not in r[2] and "\n" not in r[2] and "\r" not in r[2] and "\x00" not in r[2]
                         for r in rows)
    expected = ([r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]) if clean else None
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "p.tsv", text + end)
        _check(path, lambda p: _scored(load_training_data(p)), expected)
    assert capsys.readouterr() == ("", "")


@PROPERTY
@given(FILES)
def test_property_csv(capsys: pytest.CaptureFixture[str], spec) -> None:  # noqa: ANN001
    rows, bom, crlf = spec
    buf = io.StringIO()
    header = ["sentence1", "sentence2", "score"]
    csv.writer(buf, lineterminator="\r\n" if crlf else "\n").writerows([header, *rows])
    clean = rows and all(len(r) == 3 and all(f.strip() and "\x00" not in f for f in r[:2]) and _finite(r[2])
                         and "\x00" not in r[2] for r in rows)
    expected = ([r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]) if clean else None
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "p.csv", ("\ufeff" if bom else "") + buf.getvalue())
        _check(path, lambda p: _scored(load_training_data(p)), expected)
    assert capsys.readouterr() == ("", "")


@PROPERTY
@given(st.lists(st.tuples(TEXT, TEXT, st.one_of(SCORE, st.floats(), st.integers(), st.none()))
                | GOOD_ROW.map(lambda r: (r[0], r[1], float(r[2]))), max_size=6), st.booleans())
def test_property_jsonl(capsys: pytest.CaptureFixture[str], rows, crlf) -> None:  # noqa: ANN001
    lines = [json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in rows]
    clean = rows and all(isinstance(a, str) and a.strip() and b.strip() and s is not None and _finite(s)
                         for a, b, s in rows)
    expected = ([r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]) if clean else None
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "p.jsonl", ("\r\n" if crlf else "\n").join(lines))
        _check(path, lambda p: _scored(load_training_data(p)), expected)
    assert capsys.readouterr() == ("", "")


@PROPERTY
@given(st.lists(st.one_of(SAFE_TEXT, SAFE_TEXT, st.just(""), TEXT), max_size=8), st.booleans(), st.booleans())
def test_property_txt(capsys: pytest.CaptureFixture[str], lines, bom, crlf) -> None:  # noqa: ANN001
    end = "\r\n" if crlf else "\n"
    clean = lines and not any(c in t for t in lines for c in "\n\r\x00") and not lines[0].startswith("\ufeff")
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "p.txt", ("\ufeff" if bom else "") + end.join(lines) + end)
        _check(path, read_sentences, lines if clean else None)
    assert capsys.readouterr() == ("", "")


def test_sts_sets_constant() -> None:
    assert STS_SETS == ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
