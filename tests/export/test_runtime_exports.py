"""Exported exits carry the fields serving runtimes read, and load in every runtime that installs here.

vLLM and SGLang read ``is_matryoshka`` / ``matryoshka_dimensions`` from ``config.json`` to accept a request's
``dimensions``; neither installs on this CPU-only machine (vLLM needs its own torch build), so their side is
pinned by the config fields, and sentence-transformers and transformers load the folders for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.export.exporter import export_model
from tests.conftest import SENTENCES


@pytest.fixture(scope="module")
def bert(tiny_dir: Path) -> MatryoshkaEncoder:
    return MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").eval()


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("fmt", "dims"), [("hf", [8, 16, 32]), ("sentence-transformers", [8, 16]),
                                           ("onnx", [8, 16])])
def test_exports_carry_the_matryoshka_fields(bert, fmt, dims, tmp_path):
    folder = export_model(bert, tmp_path / fmt, layer=2, dim=16, format=fmt)
    config = _config(folder)
    assert config["is_matryoshka"] is True
    assert config["matryoshka_dimensions"] == dims  # hf keeps the full width; the others return 16 coords


def test_transformers_keeps_the_fields_and_the_depth(bert, tmp_path):
    from transformers import AutoConfig, AutoModel

    folder = export_model(bert, tmp_path / "hf", layer=3, dim=32, format="hf")
    config = AutoConfig.from_pretrained(folder)
    assert config.is_matryoshka is True and config.matryoshka_dimensions == [8, 16, 32]
    assert AutoModel.from_pretrained(folder).config.num_hidden_layers == 3


def test_sentence_transformers_loads_the_exit_and_its_truncate_dim(bert, tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    folder = export_model(bert, tmp_path / "st", layer=2, dim=16, format="sentence-transformers")
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    assert st_config["truncate_dim"] == 16
    st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    assert st.encode(["x"], convert_to_numpy=True).shape == (1, 16)
    ours = bert.encode(SENTENCES, layer=2, dim=16)
    np.testing.assert_allclose(st.encode(SENTENCES, convert_to_numpy=True), ours, atol=1e-5)
    # a smaller advertised width through sentence-transformers' own truncate_dim: the same direction as ours
    narrow = SentenceTransformer(str(folder), device="cpu", local_files_only=True, truncate_dim=8)
    got = narrow.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(got, bert.encode(SENTENCES, layer=2, dim=8), atol=1e-5)


# ----------------------------------------------------------------------------------- OpenVINO
@pytest.fixture(scope="module")
def openvino_dir(bert, tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    return export_model(bert, tmp_path_factory.mktemp("ov") / "ov", layer=2, dim=16, format="openvino")


def test_openvino_export_round_trips(bert, openvino_dir):
    from matryoshka2d.export.runtime import OpenVinoEncoder, load_exported

    assert (openvino_dir / "openvino_model.xml").is_file() and not (openvino_dir / "model.onnx").exists()
    assert _config(openvino_dir)["matryoshka_dimensions"] == [8, 16]
    ours = bert.encode(SENTENCES, layer=2, dim=16)
    got = load_exported(openvino_dir, precision="f32").encode(SENTENCES, batch_size=3)
    assert isinstance(load_exported(openvino_dir), OpenVinoEncoder)
    np.testing.assert_allclose(got, ours, atol=1e-4)
    assert float((got * ours).sum(1).min()) >= 0.999
    meta = json.loads((openvino_dir / "matryoshka2d.json").read_text(encoding="utf-8"))
    assert meta["export"]["format"] == "openvino"
    assert meta["export"]["verification"]["openvino_f32_vs_source_max_abs_diff"] <= 1e-4


def test_openvino_streams_give_the_same_vectors_in_input_order(openvino_dir):
    """Several batches in flight (THROUGHPUT mode, an AsyncInferQueue): the same numbers, each row in its place."""
    from matryoshka2d.export.runtime import OpenVinoEncoder, load_exported

    texts = [f"{s} {i}" for i in range(7) for s in SENTENCES]  # many small batches, finishing in any order
    one = OpenVinoEncoder(openvino_dir, threads=2, precision="f32", streams=1).encode(texts, batch_size=3)
    two = load_exported(openvino_dir, threads=2, streams=2, precision="f32")
    assert two.streams == 2
    np.testing.assert_allclose(two.encode(texts, batch_size=3), one, atol=1e-5)
    np.testing.assert_allclose(two.encode(texts[:2], batch_size=8), one[:2], atol=1e-5)  # reusable, one batch
    for bad in (0, 65, True):
        with pytest.raises(ValueError, match="streams .* out of range 1..64"):
            OpenVinoEncoder(openvino_dir, streams=bad)


def test_openvino_export_of_an_exit_with_a_head(tiny_dir, tmp_path):
    pytest.importorskip("openvino")
    from matryoshka2d.export.runtime import load_exported

    headed = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").eval()
    headed.add_exit_heads(layers=[2])
    with torch.no_grad():
        headed.exit_heads["2"].weight.add_(0.1)
    folder = export_model(headed, tmp_path / "ov", layer=2, dim=16, format="openvino")
    np.testing.assert_allclose(load_exported(folder, precision="f32").encode(SENTENCES),
                               headed.encode(SENTENCES, layer=2, dim=16), atol=1e-4)


def test_openvino_refuses_quantize(bert, tmp_path):
    with pytest.raises(ValueError, match="quantize applies to the onnx format only"):
        export_model(bert, tmp_path / "ov", format="openvino", quantize="int8")


def test_cli_encode_runs_an_openvino_export(bert, openvino_dir, tmp_path):
    from matryoshka2d.cli import main

    inputs = tmp_path / "in.txt"
    inputs.write_text("a man is playing the guitar\nthe dog runs\n", encoding="utf-8")
    assert main(["encode", str(openvino_dir), "--input", str(inputs), "--output", str(tmp_path / "e.npy"),
                 "--precision", "f32"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"),
                               bert.encode(["a man is playing the guitar", "the dog runs"], layer=2, dim=16),
                               atol=1e-4)
    many = [f"sentence number {i} about {w}" for i in range(9) for w in ("dogs", "music", "rain")]
    inputs.write_text("\n".join(many) + "\n", encoding="utf-8")
    # more texts than one batch: batches in flight at once on two streams, rows still in input order
    assert main(["encode", str(openvino_dir), "--input", str(inputs), "--output", str(tmp_path / "m.npy"),
                 "--batch-size", "4", "--threads", "2", "--precision", "f32"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), bert.encode(many, layer=2, dim=16), atol=1e-4)
    # precision: auto (the default: bf16 where native and the export's checks allow) and bf16 stay close
    for precision, tolerance in (("f32", 1e-4), ("bf16", 3e-2), ("auto", 3e-2)):
        out = tmp_path / f"p-{precision}.npy"
        assert main(["encode", str(openvino_dir), "--input", str(inputs), "--output", str(out), "--precision",
                     precision, "--batch-size", "4"]) == 0
        np.testing.assert_allclose(np.load(out), bert.encode(many, layer=2, dim=16), atol=tolerance)


def test_cli_precision_is_for_openvino_exports_only(tiny_dir, tmp_path, capsys):
    from matryoshka2d.cli import main

    inputs = tmp_path / "in.txt"
    inputs.write_text("the dog runs\n", encoding="utf-8")
    assert main(["encode", str(tiny_dir), "--input", str(inputs), "--output", str(tmp_path / "e.npy"),
                 "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--precision bf16 is for OpenVINO exports" in err and "not one: drop the flag" in err
