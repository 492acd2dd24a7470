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

from conftest import SENTENCES
from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.export.exporter import export_model


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
