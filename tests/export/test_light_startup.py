"""Light startup: ``m2d --help`` and ``m2d encode`` of an exported ONNX exit import neither torch nor transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import main
from matryoshka2d.encoder.tokenization import TokenizerFile, tokenize_unpadded
from matryoshka2d.export.exporter import export_model
from tests.conftest import SENTENCES

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ("torch", "transformers", "sentence_transformers")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def bert(tiny_dir: Path) -> MatryoshkaEncoder:
    return MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").eval()


@pytest.fixture(scope="module")
def onnx_dir(bert, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    return export_model(bert, tmp_path_factory.mktemp("light") / "onnx", layer=2, dim=16, format="onnx",
                        quantize="int8")


def test_help_imports_nothing_heavy():
    done = _python(
        "import sys, contextlib, io\n"
        "import matryoshka2d.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['--help']) == 0\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_tokenizer_file_matches_the_transformers_tokenizer(bert, tmp_path):
    bert.tokenizer.save_pretrained(tmp_path)
    texts = [*SENTENCES, " ".join(["word"] * 300)]
    ours = tokenize_unpadded(TokenizerFile(tmp_path), texts, 24)
    theirs = tokenize_unpadded(bert.tokenizer, texts, 24)
    assert ours.input_ids == theirs.input_ids and ours.token_type_ids == theirs.token_type_ids
    assert ours.num_truncated == theirs.num_truncated == 2
    assert ours.pad_id == theirs.pad_id


def test_encode_of_an_onnx_export_runs_without_torch(bert, onnx_dir, tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(s for s in SENTENCES if s) + "\n", encoding="utf-8")
    out, narrow = tmp_path / "e.npy", tmp_path / "e8.npy"
    done = _python(
        "import sys\n"
        "from matryoshka2d.cli import main\n"
        f"assert main(['encode', {str(onnx_dir)!r}, '--input', {str(inputs)!r}, '--output', {str(out)!r}]) == 0\n"
        f"assert main(['encode', {str(onnx_dir)!r}, '--dim', '8', '--input', {str(inputs)!r}, "
        f"'--output', {str(narrow)!r}]) == 0\n"
        f"print({HEAVY!r}, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]"), done.stdout
    texts = [s for s in SENTENCES if s]
    np.testing.assert_allclose(np.load(out), bert.encode(texts, layer=2, dim=16), atol=1e-4)
    np.testing.assert_allclose(np.load(narrow), bert.encode(texts, layer=2, dim=8), atol=1e-4)


def test_int8_is_explicit_and_close(bert, onnx_dir, tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(s for s in SENTENCES if s) + "\n", encoding="utf-8")
    fp32, int8 = tmp_path / "fp32.npy", tmp_path / "int8.npy"
    assert main(["encode", str(onnx_dir), "--input", str(inputs), "--output", str(fp32)]) == 0
    assert main(["encode", str(onnx_dir), "--int8", "--input", str(inputs), "--output", str(int8)]) == 0
    a, b = np.load(fp32), np.load(int8)
    assert not np.array_equal(a, b)  # another graph ran
    assert float((a * b).sum(1).min()) > 0.9


@pytest.mark.parametrize(("extra", "message"), [
    (["--layer", "3"], "--layer 3: .* is exit layer 2 only"),
    (["--dim", "17"], r"--dim 17 is out of range 1\.\.16"),
    (["--no-normalize"], "returns L2-normalised embeddings"),
])
def test_bad_options_for_an_export_exit_2(onnx_dir, tmp_path, capsys, extra, message):
    import re

    inputs = tmp_path / "in.txt"
    inputs.write_text("a man\n", encoding="utf-8")
    assert main(["encode", str(onnx_dir), *extra, "--input", str(inputs), "--output", str(tmp_path / "e.npy")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_int8_of_a_torch_model_is_refused(tiny_dir, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("a man\n", encoding="utf-8")
    assert main(["encode", str(tiny_dir), "--int8", "--input", str(inputs), "--output", str(tmp_path / "e.npy")]) == 2
    assert "--int8 runs the int8 graph of an ONNX/OpenVINO export" in capsys.readouterr().err


def test_export_meta_names_the_format(onnx_dir):
    meta = json.loads((onnx_dir / "matryoshka2d.json").read_text(encoding="utf-8"))
    assert meta["export"]["format"] == "onnx" and (onnx_dir / "tokenizer.json").is_file()
