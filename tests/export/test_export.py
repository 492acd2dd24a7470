"""Export of one exit (hf, sentence-transformers, onnx) and import of folders trained elsewhere."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import main
from matryoshka2d.encoder import architectures
from matryoshka2d.export.exporter import VERIFY_TEXTS, export_model
from matryoshka2d.io.manifest import verify_manifest
from tests.conftest import SENTENCES

COSINE = 0.99999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _tensor_names(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def _block_ids(names: list[str]) -> set[int]:
    return {int(m.group(1)) for k in names if (m := re.search(r"\.layer\.(\d+)\.", k))}


@pytest.fixture(scope="module")
def models(tiny_dirs: dict[str, Path]) -> dict[str, MatryoshkaEncoder]:
    return {arch: MatryoshkaEncoder.from_pretrained(folder).eval() for arch, folder in tiny_dirs.items()}


@pytest.fixture(scope="module")
def bert(models: dict[str, MatryoshkaEncoder]) -> MatryoshkaEncoder:
    return models["bert"]


# ----------------------------------------------------------------------------------- hf
@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet"])
def test_hf_export_round_trips_at_the_same_exit(models, arch, tmp_path):
    from transformers import AutoConfig, AutoModel

    source = models[arch]
    folder = export_model(source, tmp_path / "out", layer=2, dim=16, format="hf")
    config = AutoConfig.from_pretrained(folder)
    assert architectures.config_depth(config) == 2
    assert architectures.get_depth(AutoModel.from_pretrained(folder)) == 2
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    assert (loaded.num_layers, loaded.default_layer, loaded.default_dim) == (2, 2, 16)
    np.testing.assert_allclose(loaded.encode(SENTENCES), source.encode(SENTENCES, layer=2, dim=16), atol=1e-6)
    # the shallower exits and wider dims of the exported model are still the source's
    np.testing.assert_allclose(loaded.encode(SENTENCES, layer=1, dim=32),
                               source.encode(SENTENCES, layer=1, dim=32), atol=1e-6)
    meta = json.loads((folder / "matryoshka2d.json").read_text())
    space = {"document_exit": 4, "query_exits": [4], "query_path": None, "exit": 2, "input_type": "document"}
    assert meta["exported_from"] == {"source": str(source.metadata["source"]), "layer": 2, "dim": 16,
                                     "num_layers": 4, "hidden_size": 32, "document_space": space}
    assert json.loads((folder / "config.json").read_text())["matryoshka2d_document_space"] == space
    assert meta["export"]["verification"]["matryoshka2d_max_abs_diff"] <= 1e-6
    assert (folder / "README.md").exists()
    verify_manifest(folder)  # every file, the card included, is listed with its checksum


def test_hf_export_holds_no_weights_of_dropped_blocks(bert, tiny_dir, tmp_path):
    folder = export_model(bert, tmp_path / "out", layer=1, dim=8)
    names = _tensor_names(folder)
    assert _block_ids(names) == {0}
    full = export_model(bert, tmp_path / "full", layer=4, dim=32)
    full_names = _tensor_names(full)
    assert _block_ids(full_names) == {0, 1, 2, 3}
    per_block = len([k for k in full_names if ".layer.3." in k])
    assert len(names) == len(full_names) - 3 * per_block
    assert (folder / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size


def test_hf_export_truncates_the_tokenizer_where_the_model_does(bert, tmp_path):
    from transformers import AutoTokenizer

    bert.max_seq_length = 16
    try:
        folder = export_model(bert, tmp_path / "out", layer=2, dim=16)
        reference = bert.encode(VERIFY_TEXTS[-1:], layer=2, dim=16)
    finally:
        bert.max_seq_length = 128
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 16
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    assert loaded.max_seq_length == 16
    np.testing.assert_allclose(loaded.encode(VERIFY_TEXTS[-1:]), reference, atol=1e-6)


def test_default_exit_is_the_models_default(bert, tmp_path):
    bert.metadata["default_dim"] = 8
    try:
        folder = export_model(bert, tmp_path / "out")
    finally:
        del bert.metadata["default_dim"]
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    assert (loaded.num_layers, loaded.default_dim) == (4, 8)


# ----------------------------------------------------------------------------------- sentence-transformers
@pytest.mark.parametrize(("pooling", "dim"), [("mean", 16), ("mean", 32), ("cls", 8), ("cls_avg", 16),
                                              ("max", 12), ("last", 32)])
def test_sentence_transformers_export_matches_the_exit(tiny_dir, pooling, dim, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    source = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling=pooling).eval()
    folder = export_model(source, tmp_path / "st", layer=3, dim=dim, format="sentence-transformers")
    model = st.SentenceTransformer(str(folder), device="cpu")
    got = model.encode(SENTENCES, convert_to_numpy=True)
    expected = source.encode(SENTENCES, layer=3, dim=dim)
    assert got.shape == (len(SENTENCES), dim)
    assert _cosines(got, expected).min() >= COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # truncated, then normalised
    assert model.truncate_dim == dim
    assert model.max_seq_length == source.max_seq_length
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    needs_dense = dim < 32 or pooling == "cls_avg"
    assert modules == ["Transformer", "Pooling", *(["Dense"] if needs_dense else []), "Normalize"]
    # our loader reads the folder back at the same exit
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    assert (loaded.num_layers, loaded.default_dim, loaded.pooling) == (3, dim, pooling)
    np.testing.assert_allclose(loaded.encode(SENTENCES), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["distilbert", "mpnet"])
def test_sentence_transformers_export_other_architectures(models, arch, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = export_model(models[arch], tmp_path / "st", layer=2, dim=16, format="st")
    got = st.SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert _cosines(got, models[arch].encode(SENTENCES, layer=2, dim=16)).min() >= COSINE


# ----------------------------------------------------------------------------------- onnx
@pytest.mark.parametrize(("arch", "inputs"), [("bert", ["input_ids", "attention_mask", "token_type_ids"]),
                                              ("distilbert", ["input_ids", "attention_mask"]),
                                              ("mpnet", ["input_ids", "attention_mask"])])
def test_onnx_export_matches_pytorch(models, arch, inputs, tmp_path):
    pytest.importorskip("onnxruntime")
    from matryoshka2d.export.onnx import OnnxEncoder

    folder = export_model(models[arch], tmp_path / "onnx", layer=2, dim=16, format="onnx")
    meta = json.loads((folder / "matryoshka2d.json").read_text())
    assert meta["export"]["inputs"] == inputs
    assert meta["export"]["verification"]["onnxruntime_vs_pytorch_max_abs_diff"] <= 1e-4
    runner = OnnxEncoder(folder)
    assert runner.input_names == inputs
    expected = models[arch].encode(SENTENCES, layer=2, dim=16)
    assert np.abs(runner.encode(SENTENCES) - expected).max() <= 1e-4
    # dynamic axes: one sentence, and batches split differently, give the same vectors
    assert np.abs(runner.encode(SENTENCES, batch_size=1) - expected).max() <= 1e-4
    assert np.abs(runner.encode(SENTENCES, batch_size=3) - expected).max() <= 1e-4
    assert {"model.onnx", "config.json", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}


def test_onnx_opset_is_applied(bert, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = export_model(bert, tmp_path / "onnx", layer=2, dim=16, format="onnx", opset=14)
    graph = onnx.load(str(folder / "model.onnx"))
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {14}
    assert json.loads((folder / "matryoshka2d.json").read_text())["export"]["opset"] == 14


def test_onnx_int8_quantization(bert, tmp_path):
    pytest.importorskip("onnxruntime")
    from matryoshka2d.data.datasets import ScoredPairs
    from matryoshka2d.export.onnx import OnnxEncoder

    pairs = ScoredPairs("toy", SENTENCES[:-1], SENTENCES[1:], np.arange(len(SENTENCES) - 1, dtype=float))
    folder = export_model(bert, tmp_path / "onnx", layer=3, dim=16, format="onnx", quantize="int8", sts=pairs)
    report = json.loads((folder / "matryoshka2d.json").read_text())["export"]
    quant = report["quantization"]
    assert quant["file"] == "model_int8.onnx" and (folder / "model_int8.onnx").exists()
    int8 = OnnxEncoder(folder, file="model_int8.onnx").encode(SENTENCES)
    fp32 = OnnxEncoder(folder).encode(SENTENCES)
    assert int8.shape == fp32.shape == (len(SENTENCES), 16)
    assert np.isclose(quant["cosine_to_fp32_min"], _cosines(int8, fp32).min(), atol=1e-5)
    assert quant["cosine_to_fp32_min"] > 0.9
    change = quant["toy_spearman_int8"] - quant["toy_spearman_fp32"]
    assert quant["toy_spearman_change"] == pytest.approx(change, abs=1e-3)
    assert report["verification"]["toy_spearman_onnx_fp32"] == pytest.approx(
        report["verification"]["toy_spearman_source"], abs=1e-6)


def test_onnx_folder_is_refused_by_our_loader_with_a_clear_message(bert, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = export_model(bert, tmp_path / "onnx", layer=1, dim=8, format="onnx")
    with pytest.raises(ValueError, match="is an ONNX export .* run it with onnxruntime"):
        MatryoshkaEncoder.from_pretrained(folder)


def test_untraceable_graph_is_a_clear_error_and_leaves_nothing(bert, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")

    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ValueError, match=r"could not trace architecture 'bert' into ONNX opset 17 .*"
                                         r"frobnicate.*--format hf or sentence-transformers"):
        export_model(bert, tmp_path / "onnx", layer=2, dim=16, format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_trace_that_bakes_a_branch_is_caught(bert, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import matryoshka2d.export.onnx as onnx_export
    from matryoshka2d.encoder.pooling import pool

    def shape_dependent_pool(hidden, mask, mode):  # Python branch on a value: tracing freezes one side
        return pool(hidden, mask, "mean" if hidden.shape[0] == 2 else "cls")

    monkeypatch.setattr(onnx_export, "pool", shape_dependent_pool)
    with pytest.raises(ValueError, match="onnxruntime differs from PyTorch by .* does not trace faithfully"):
        export_model(bert, tmp_path / "onnx", layer=2, dim=16, format="onnx")
    assert not (tmp_path / "onnx").exists()


# ----------------------------------------------------------------------------------- import
def _train_one_step_with(loss_name: str, st, model) -> None:
    """One optimiser step of sentence-transformers' Matryoshka2dLoss / AdaptiveLayerLoss on a tiny batch."""
    from sentence_transformers import losses

    base = losses.CoSENTLoss(model)
    loss = (losses.Matryoshka2dLoss(model, base, [32, 16, 8]) if loss_name == "Matryoshka2dLoss"
            else losses.AdaptiveLayerLoss(model, base))
    prepare = getattr(model, "preprocess", None) or model.tokenize
    features = [prepare(SENTENCES[:3]), prepare(SENTENCES[4:7])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss(features, torch.tensor([0.9, 0.1, 0.5])).backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("loss_name", ["Matryoshka2dLoss", "AdaptiveLayerLoss"])
def test_sentence_transformers_folder_trained_elsewhere_loads_at_every_exit(tiny_dir, loss_name, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel

    transformer = st.models.Transformer(str(tiny_dir), max_seq_length=64)
    modules = [transformer, st.models.Pooling(32, "mean"), st.models.Normalize()]
    model = st.SentenceTransformer(modules=modules, device="cpu")
    _train_one_step_with(loss_name, st, model)
    model.save(str(tmp_path / "trained"))
    ours = MatryoshkaEncoder.from_pretrained(tmp_path / "trained")
    assert (ours.pooling, ours.num_layers, ours.max_seq_length) == ("mean", 4, 64)
    full = model.encode(SENTENCES, convert_to_numpy=True)
    assert _cosines(ours.encode(SENTENCES), full).min() >= COSINE
    # every shallower exit is the masked mean of hidden_states[n] of the trained weights
    hf = AutoModel.from_pretrained(tmp_path / "trained").eval()
    batch = ours.tokenize(SENTENCES)
    batch.pop("num_truncated", None)
    with torch.no_grad():
        states = hf(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for n in (1, 2, 3):
        expected = ((states[n] * mask).sum(1) / mask.sum(1))[:, :8]
        expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
        np.testing.assert_allclose(ours.encode(SENTENCES, layer=n, dim=8), expected, atol=1e-5)


def test_sentence_transformers_concatenated_pooling_is_refused(tiny_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(modules=[st.models.Transformer(str(tiny_dir)),
                                            st.models.Pooling(32, ["cls", "mean"])], device="cpu")
    model.save(str(tmp_path / "concat"))
    with pytest.raises(ValueError, match=r"pooling \['cls', 'mean'\] has no matryoshka2d equivalent"):
        MatryoshkaEncoder.from_pretrained(tmp_path / "concat")


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layer": 0}, r"layer 0 is out of range: this model has layers 1\.\.4"),
    ({"layer": 5}, r"layer 5 is out of range"),
    ({"dim": 33}, r"dim 33 is out of range: this model's embeddings have 1\.\.32 dims"),
    ({"dim": 0}, r"dim 0 is out of range"),
    ({"format": "tflite"}, r"unknown export format 'tflite'; choose one of hf, sentence-transformers, onnx"),
    ({"quantize": "int8"}, r"quantize and opset apply to the onnx format only, not 'hf'"),
    ({"format": "onnx", "quantize": "int4"}, r"unknown quantization 'int4'"),
])
def test_bad_arguments_are_refused_before_writing(bert, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_model(bert, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(bert, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        export_model(bert, folder, layer=2, dim=16)
    assert (folder / "keep.txt").read_text() == "mine"
    export_model(bert, folder, layer=2, dim=16, overwrite=True)
    assert not (folder / "keep.txt").exists()
    assert MatryoshkaEncoder.from_pretrained(folder).num_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings left


def test_missing_onnxruntime_names_the_extra(bert, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name))
    hint = r"^ONNX export needs onnxruntime: pip install -e '\.\[onnx\]' in the matryoshka2d repository$"
    with pytest.raises(ImportError, match=hint):
        export_model(bert, tmp_path / "out", format="onnx")


def test_missing_sentence_transformers_names_the_extra(bert, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[st\]' in the matryoshka2d repository \(or skip"):
        export_model(bert, tmp_path / "out", format="sentence-transformers")
    # without the check the folder is still written (sentence-transformers is not needed to write it)
    folder = export_model(bert, tmp_path / "out", format="sentence-transformers", verify=False)
    assert (folder / "modules.json").exists()


# ----------------------------------------------------------------------------------- CLI
def test_cli_export_in_process(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["export", str(tiny_dir), "--layer", "2", "--dim", "16", "--format", "sentence-transformers",
            "--output", str(out), "--no-verify"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"exported layer 2 (of 4), dim 16 (of 32) as sentence-transformers to {out}" in printed
    assert main(args) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["export", str(tiny_dir), "--layer", "9", "--output", str(tmp_path / "x")]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err


def test_cli_onnx_int8_with_sts_set(tiny_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    data = tmp_path / "data" / "stsb"
    data.mkdir(parents=True)
    texts = [t for t in SENTENCES if t]
    rows = [f"{a}\t{b}\t{i % 5}.0" for i, (a, b) in enumerate(zip(texts[:-1], texts[1:], strict=True))]
    (data / "test.tsv").write_text("sentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n")
    out = tmp_path / "onnx"
    code = main(["export", str(tiny_dir), "--layer", "1", "--dim", "8", "--format", "onnx", "--quantize",
                 "int8", "--output", str(out), "--sts", "stsb", "--data-dir", str(tmp_path / "data")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "verification: onnxruntime_vs_pytorch_max_abs_diff" in printed
    assert "quantization: stsb_spearman_change" in printed
    assert (out / "model_int8.onnx").exists()


# ----------------------------------------------------------------------------------- real model
def _stsb_test(shared_data: Path):
    try:
        from matryoshka2d.data.datasets import load_sts

        return load_sts("stsb", data_dir=shared_data)
    except ImportError:  # the data module is optional here: read the TSV directly
        from matryoshka2d.data.datasets import ScoredPairs

        lines = (shared_data / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
        rows = [line.rstrip("\n").split("\t") for line in lines]
        return ScoredPairs("stsb", [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows])


@pytest.mark.slow
def test_real_minilm_exit_scores_the_same_in_a_fresh_sentence_transformer(shared_data, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from matryoshka2d.evaluation.metrics import sts_spearman

    pairs = _stsb_test(shared_data)
    model = MatryoshkaEncoder.from_pretrained("minilm")
    ours = sts_spearman(lambda t: model.encode(t, layer=3, dim=128), pairs)
    folder = export_model(model, tmp_path / "minilm-L3-d128", layer=3, dim=128,
                          format="sentence-transformers")
    fresh = st.SentenceTransformer(str(folder), device="cpu")
    assert fresh.get_embedding_dimension() == 128
    theirs = sts_spearman(lambda t: fresh.encode(list(t), batch_size=64, convert_to_numpy=True), pairs)
    assert abs(theirs - ours) <= 0.01
    # the original MiniLM was not trained for early exit: its (3, 128) exit scores about 45 (full: 82.0)
    assert ours == pytest.approx(44.98, abs=0.5)


def test_export_of_a_trained_model_carries_its_own_facts(tiny_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Issue 35: a trained model's matryoshka2d.json says num_layers 4; its 2-layer export must say 2."""
    data = tmp_path / "train.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a man {i}\tthe dog {i % 3}\t{i % 4}\n"
                                                              for i in range(8)), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["-q", "train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(run),
                 "--max-steps", "1", "--batch-size", "4", "--no-progress-bar", "--set", "run.eval_every=0"]) == 0
    trained = run / "final"
    assert json.loads((trained / "matryoshka2d.json").read_text())["num_layers"] == 4
    out = tmp_path / "export"
    assert main(["-q", "export", str(trained), "--layer", "2", "--dim", "16", "--output", str(out)]) == 0
    capsys.readouterr()
    meta = json.loads((out / "matryoshka2d.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert meta["num_layers"] == config["num_hidden_layers"] == 2
    assert (meta["default_layer"], meta["default_dim"], meta["hidden_size"]) == (2, 16, 32)
    assert meta["exported_from"] == {"source": str(trained), "layer": 2, "dim": 16, "num_layers": 4,
                                     "hidden_size": 32, "document_space": {
                                         "document_exit": 4, "query_exits": [4], "query_path": None, "exit": 2,
                                         "input_type": "document"}}
    card = (out / "README.md").read_text()
    assert f"of `{trained}` (4 layers, 32 dims)" in card and "| layers stored | 2 |" in card.replace("`", "")
    assert MatryoshkaEncoder.from_pretrained(out).num_layers == 2
