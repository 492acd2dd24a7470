"""The m2d entry point: info and encode in-process, exit codes and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import main


def test_info(tiny_dir, capsys):
    assert main(["info", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "architecture:   bert" in out and "layers:         4" in out and "hidden size:    32" in out


def test_encode_txt_round_trip(tiny_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a man plays guitar\nthe dog runs\n", encoding="utf-8")  # blank lines: test_query_exits.py
    out = tmp_path / "emb.npy"
    args = ["encode", str(tiny_dir), "--layer", "2", "--dim", "16", "--input", str(src), "--output", str(out)]
    assert main(args) == 0
    emb = np.load(out)
    expected = MatryoshkaEncoder.from_pretrained(tiny_dir).encode(["a man plays guitar", "the dog runs"],
                                                                   layer=2, dim=16)
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    assert main(["encode", str(tiny_dir), "--input", str(src), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "0"], "m2d encode: error: layer 0 is out of range: this model has layers 1..4"),
        (["--layer", "9"], "layer 9 is out of range"),
        (["--dim", "0"], "dim 0 is out of range: this model's embeddings have 1..32 dims"),
        (["--dim", "64"], "dim 64 is out of range"),
    ],
)
def test_encode_bad_exit_exits_2_with_one_line(tiny_dir, tmp_path, capsys, args, message):
    src = tmp_path / "in.txt"
    src.write_text("cat\n", encoding="utf-8")
    code = main(["encode", str(tiny_dir), "--input", str(src), "--output", str(tmp_path / "o.npy"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_model_and_input_exit_2(tmp_path, capsys, tiny_dir):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["encode", str(tiny_dir), "--input", str(tmp_path / "nope.txt"), "--output", "x.npy"]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_usage_errors_exit_2():
    assert main(["no-such-command"]) == 2
    assert main(["--version"]) == 0


def test_max_seq_length_flag_sets_the_token_limit_and_is_range_checked(tiny_dir, tmp_path, capsys):
    """``--max-seq-length`` overrides the folder's limit (e.g. a model trained on short STS sentences, evaluated on
    documents); out of range it exits 2 naming the value and the range."""
    assert main(["info", str(tiny_dir), "--max-seq-length", "5"]) == 0
    assert "max seq length: 5" in capsys.readouterr().out
    src = tmp_path / "in.txt"
    long_text = "a man plays a guitar on the corner of the street in the rain"
    src.write_text(long_text + "\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    assert main(["encode", str(tiny_dir), "--input", str(src), "--output", str(out), "--max-seq-length", "5"]) == 0
    expected = MatryoshkaEncoder.from_pretrained(tiny_dir, max_seq_length=5).encode([long_text])
    full = MatryoshkaEncoder.from_pretrained(tiny_dir).encode([long_text])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    assert not np.allclose(expected, full, atol=1e-3)  # the limit really cut the text
    capsys.readouterr()
    for bad in ("0", "100000"):
        assert main(["info", str(tiny_dir), "--max-seq-length", bad]) == 2
        err = capsys.readouterr().err
        assert f"--max-seq-length {bad} is out of range 1.." in err and err.count("\n") == 1
