"""The model card: facts, result tables, and copy-paste snippets that really run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import main
from matryoshka2d.export.exporter import export_model
from matryoshka2d.io.modelcard import quality_tables, read_bench_results, read_eval_results, render_model_card
from tests.helpers.modelcard import SNIPPET_SENTENCES, run_snippets


def _eval_results(layers: int = 4) -> dict:
    records = []
    for name, offset in (("stsb", 0.0), ("sickr", 10.0)):
        for n in range(1, layers + 1):
            for d in (8, 16, 32):
                records.append({"set": name, "layer": n, "dim": d, "spearman": 50 + n * 5 + d / 8 + offset,
                                "pearson": 0.0, "n": 100})
    return {"model": "tiny", "results": records}


# ----------------------------------------------------------------------------------- snippets
@pytest.mark.parametrize("pooling", ["mean", "cls_avg", "last"])
def test_hf_export_card_snippets_run_and_match_the_exit(tiny_dir, pooling, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    source = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling=pooling).eval()
    folder = export_model(source, tmp_path / "tiny-L2-d16", layer=2, dim=16)
    results = run_snippets(folder, monkeypatch)
    expected = source.encode(SNIPPET_SENTENCES, layer=2, dim=16)
    wanted = {"matryoshka2d", "transformers"} | ({"sentence-transformers"} if pooling != "cls_avg" else set())
    assert set(results) == wanted
    for title, got in results.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=title)
    text = (folder / "README.md").read_text()
    assert "Only transformer blocks 1..2 are stored" in text
    if pooling == "cls_avg":
        assert "m2d export tiny-L2-d16 --layer 2 --dim 16 --format sentence-transformers" in text


def test_sentence_transformers_export_cardsnippets(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    source = MatryoshkaEncoder.from_pretrained(tiny_dir).eval()
    folder = export_model(source, tmp_path / "st", layer=3, dim=8, format="sentence-transformers")
    text = (folder / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: sentence-transformers\n")
    results = run_snippets(folder, monkeypatch)
    assert set(results) == {"matryoshka2d", "sentence-transformers", "transformers"}
    expected = source.encode(SNIPPET_SENTENCES, layer=3, dim=8)
    for title, got in results.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=title)


def test_onnx_export_card_snippet(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    source = MatryoshkaEncoder.from_pretrained(tiny_dir).eval()
    folder = export_model(source, tmp_path / "onnx", layer=1, dim=16, format="onnx", quantize="int8")
    results = run_snippets(folder, monkeypatch)
    assert set(results) == {"onnxruntime"}
    expected = source.encode(SNIPPET_SENTENCES, layer=1, dim=16)
    np.testing.assert_allclose(results["onnxruntime"], expected, atol=1e-4)
    text = (folder / "README.md").read_text()
    assert "`model_int8.onnx` is the same graph" in text
    assert "int8 quantisation, cosine_to_fp32_min" in text


def test_saved_model_card_at_a_shallow_default_exit(tiny_dir, tmp_path, monkeypatch):
    model = MatryoshkaEncoder.from_pretrained(tiny_dir).eval()
    model.metadata.update({"default_layer": 2, "default_dim": 8,
                           "training": {"strategy": "2dmse", "data": "nli", "steps": 1000}})
    folder = model.save(tmp_path / "saved")
    text = (folder / "README.md").read_text()
    assert "## Training\n\n- strategy: `2dmse`\n- data: `nli`\n- steps: `1000`" in text
    assert "hidden_states[2]" in text and "Plain transformers runs all 4 blocks here" in text
    assert "sentence-transformers cannot stop at layer 2 of this folder by itself" in text
    results = run_snippets(folder, monkeypatch)
    assert set(results) == {"matryoshka2d", "transformers"}
    expected = model.encode(SNIPPET_SENTENCES, layer=2, dim=8)
    for title, got in results.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=title)


# ----------------------------------------------------------------------------------- tables
def test_export_card_shows_the_quality_and_speed_of_the_kept_exits(tiny_dir, tmp_path):
    source = MatryoshkaEncoder.from_pretrained(tiny_dir).eval()
    (tmp_path / "eval.json").write_text(json.dumps(_eval_results()))
    bench = {"records": [{"impl": "matryoshka2d", "layer": n, "dtype": "fp32", "batch_size": 64,
                          "sentences_per_s": 1000.0 / n} for n in range(1, 5)]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    folder = export_model(source, tmp_path / "out", layer=2, dim=16, eval_results=tmp_path / "eval.json",
                          bench_results=tmp_path / "bench.json")
    meta = json.loads((folder / "matryoshka2d.json").read_text())
    assert {r["layer"] for r in meta["evaluation"]["results"]} == {1, 2}
    assert [r["layer"] for r in meta["benchmark"]["records"]] == [1, 2]
    text = (folder / "README.md").read_text()
    # stsb at (2, 16) = 50 + 10 + 2 = 62; sickr = 72; average 67, the exported exit in bold
    assert "Average over 2 sets (sickr, stsb):" in text
    assert "| 2 | 66.00 | **67.00** | 69.00 |" in text
    assert "| 3 |" not in text.split("## Quality")[1].split("## Encoding speed")[0]
    assert "| layer | matryoshka2d fp32 bs=64 |\n|---|---:|\n| 1 | 1000 |\n| 2 | 500 |" in text


def test_quality_table_of_one_set_has_no_average():
    one = {"results": [r for r in _eval_results(2)["results"] if r["set"] == "stsb"]}
    table = quality_tables(one, highlight=(1, 8))
    assert "Average" not in table and table.startswith("stsb:")
    assert "| layer \\ dim | 8 | 16 | 32 |" in table and "| 1 | **56.00** | 57.00 | 59.00 |" in table


def test_card_renders_with_minimal_metadata():
    text = render_model_card({"num_layers": 4, "hidden_size": 32, "default_layer": 4, "default_dim": 32})
    assert "# model" in text and "### matryoshka2d" in text and "pooled = (hidden * mask).sum(1)" in text


# ----------------------------------------------------------------------------------- bad result files
def test_bad_results_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation results file .*nope.json does not exist"):
        read_eval_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_eval_results(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"results\[0\] lacks spearman; every record needs set, layer, dim"):
        read_eval_results({"results": [{"set": "stsb", "layer": 1, "dim": 8}]})
    with pytest.raises(ValueError, match="no non-empty 'records' list; pass the JSON written by m2d bench"):
        read_bench_results({"results": []})


def test_cli_rejects_a_bad_results_file_before_writing(tiny_dir, tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps({"results": [{"set": "stsb"}]}))
    code = main(["export", str(tiny_dir), "--output", str(tmp_path / "out"), "--eval-results",
                 str(tmp_path / "eval.json")])
    assert code == 2
    assert "lacks layer, dim, spearman" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
