"""Folders written before the package was laid out in subpackages (commit 3e873bb) still load and embed alike.

``tests/fixtures/v0.1-flat-layout`` was written by that commit's code: a tiny BERT with trained-looking
(perturbed) linear exit heads on layers 1..3 and default dim 16, its sentence-transformers export of exit
(2, 16), and the embeddings the old code gave (``expected.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.io.manifest import verify_manifest

OLD = Path(__file__).parents[1] / "fixtures" / "v0.1-flat-layout"
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))


def test_old_model_folder_loads_with_its_heads_and_defaults() -> None:
    verify_manifest(OLD / "model")  # the files are what the old code wrote
    model = MatryoshkaEncoder.from_pretrained(OLD / "model")
    assert (model.num_layers, model.hidden_size, model.default_dim) == (4, 32, 16)
    assert model.exit_head_layers == [1, 2, 3] and model.exit_head_kind == "linear"
    for key, rows in EXPECTED["embeddings"].items():
        if key == "export":
            continue
        layer, dim = map(int, key.split(":"))
        got = model.encode(EXPECTED["sentences"], layer=layer, dim=dim)
        np.testing.assert_allclose(got, np.asarray(rows), atol=2e-6, err_msg=key)


def test_old_model_folder_round_trips_through_the_new_save(tmp_path: Path) -> None:
    model = MatryoshkaEncoder.from_pretrained(OLD / "model")
    again = MatryoshkaEncoder.from_pretrained(model.save(tmp_path / "again"))
    old_meta = json.loads((OLD / "model" / "matryoshka2d.json").read_text(encoding="utf-8"))
    new_meta = json.loads((tmp_path / "again" / "matryoshka2d.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in new_meta.items() if k != "library_versions"} == \
        {k: v for k, v in old_meta.items() if k != "library_versions"}
    texts = EXPECTED["sentences"]
    np.testing.assert_array_equal(again.encode(texts, layer=2), model.encode(texts, layer=2))


def test_old_sentence_transformers_export_loads_in_both_libraries() -> None:
    ours = MatryoshkaEncoder.from_pretrained(OLD / "export-st-l2-d16")
    assert (ours.num_layers, ours.default_layer, ours.default_dim) == (2, 2, 16)
    expected = np.asarray(EXPECTED["embeddings"]["export"])
    np.testing.assert_allclose(ours.encode(EXPECTED["sentences"]), expected, atol=2e-6)
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(OLD / "export-st-l2-d16"), device="cpu", local_files_only=True)
    got = theirs.encode(EXPECTED["sentences"], convert_to_numpy=True)
    assert (got * expected).sum(1).min() > 0.99999
