"""Exit heads: identity start, exits = truncated model = manual head, save/load, export, config, training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.encoder.pooling import pool
from matryoshka2d.export.exporter import export_model
from matryoshka2d.io.exit_files import HEADS_FILE
from matryoshka2d.training import checkpoint
from matryoshka2d.training.config import Config
from tests.conftest import SENTENCES

COSINE = 0.99999


def _perturb(model: MatryoshkaEncoder, seed: int = 1) -> MatryoshkaEncoder:
    """Move every head away from the identity (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.exit_heads.values():
            head.weight.add_(0.3 * torch.randn(head.weight.shape, generator=gen))
            head.bias.add_(0.1 * torch.randn(head.bias.shape, generator=gen))
    return model


def _manual(model: MatryoshkaEncoder, texts: list[str], layer: int, dim: int) -> np.ndarray:
    """head_n(pool(hidden_states[n])) of the FULL backbone, one text at a time, then [:dim] and L2."""
    out = []
    with torch.inference_mode():
        for text in texts:
            f = model.tokenizer([text], return_tensors="pt", truncation=True, max_length=model.max_seq_length)
            states = model.backbone(**f, output_hidden_states=True).hidden_states
            pooled = pool(states[layer].float(), f["attention_mask"], model.pooling)
            if str(layer) in model.exit_heads:
                head = model.exit_heads[str(layer)]
                pooled = pooled @ head.weight.T + head.bias
            out.append(F.normalize(pooled[:, :dim], dim=-1))
    return torch.cat(out).numpy()


@pytest.fixture()
def headed(tiny_dir: Path) -> MatryoshkaEncoder:
    """The tiny BERT (4 layers, D=32) with trained-looking linear heads on layers 1..3."""
    model = MatryoshkaEncoder.from_pretrained(tiny_dir).eval()
    assert model.add_exit_heads("linear") == [1, 2, 3]
    return _perturb(model)


# ----------------------------------------------------------------------------------- the model
def test_identity_heads_change_no_embedding(tiny_model):
    before = {n: tiny_model.encode(SENTENCES, layer=n) for n in range(1, 5)}
    assert tiny_model.add_exit_heads() == [1, 2, 3]  # the last exit stays the plain backbone output
    assert tiny_model.exit_head_layers == [1, 2, 3] and tiny_model.exit_head_kind == "linear"
    for n in range(1, 5):
        np.testing.assert_array_equal(tiny_model.encode(SENTENCES, layer=n), before[n], err_msg=str(n))
    head = tiny_model.exit_heads["2"]
    assert torch.equal(head.weight, torch.eye(32)) and torch.equal(head.bias, torch.zeros(32))
    assert head.weight.dtype == torch.float32


@pytest.mark.parametrize("dim", [8, 32])
def test_headed_exit_equals_truncated_model_and_manual_head(headed, tiny_dir, dim):
    for n in range(1, 5):
        ours = headed.encode(SENTENCES, layer=n, dim=dim, batch_size=3)
        truncated = headed.truncate(n)
        assert truncated.exit_head_layers == list(range(1, min(n, 3) + 1))  # head n is its last exit's
        np.testing.assert_allclose(truncated.encode(SENTENCES, dim=dim, batch_size=3), ours, atol=1e-6)
        np.testing.assert_allclose(_manual(headed, SENTENCES, n, dim), ours, atol=1e-5)
    plain = MatryoshkaEncoder.from_pretrained(tiny_dir).eval()
    assert not np.allclose(plain.encode(SENTENCES, layer=2, dim=dim), headed.encode(SENTENCES, layer=2, dim=dim))
    np.testing.assert_array_equal(plain.encode(SENTENCES, layer=4), headed.encode(SENTENCES, layer=4))


def test_forward_and_evaluator_apply_the_heads(headed):
    from matryoshka2d.encoder.batching import embed_layers

    out = headed(headed.tokenize(SENTENCES), layers=(1, 2, 4))
    assert all(v.dtype == torch.float32 for v in out.values())
    grid = embed_layers(headed, SENTENCES, [1, 2, 4], batch_size=3)
    for n in (1, 2, 4):
        np.testing.assert_allclose(grid[n], headed.encode(SENTENCES, layer=n, normalize=False), atol=1e-5)


def test_heads_compute_in_float32_in_a_bf16_copy(headed):
    from matryoshka2d.bench.runner import fast_copy

    exact = headed.encode(SENTENCES, layer=2)
    copy32 = fast_copy(headed, 2, "fp32", "cpu")
    assert copy32.exit_head_layers == [1, 2]  # the benchmark's model for exit 2 keeps head 2
    np.testing.assert_allclose(copy32.encode(SENTENCES), exact, atol=1e-6)
    copy16 = fast_copy(headed, 2, "bf16", "cpu")
    assert copy16.exit_heads["2"].weight.dtype == torch.float32
    assert (copy16.encode(SENTENCES) * exact).sum(1).min() > 0.95


def test_add_exit_heads_on_any_layers_and_bad_input(tiny_model):
    assert tiny_model.add_exit_heads(layers=[4, 2]) == [2, 4]
    assert tiny_model.add_exit_heads(layers=[1, 2]) == [1]  # existing heads are kept, not replaced
    assert list(tiny_model.exit_heads) == ["1", "2", "4"]
    with torch.no_grad():
        tiny_model.exit_heads["4"].bias.fill_(1.0)
    assert tiny_model.truncate(3).exit_head_layers == [1, 2]
    assert tiny_model.truncate(4).exit_heads["4"].bias[0] == 1.0
    with pytest.raises(ValueError, match="unknown exit head kind 'mlp'; choose one of linear"):
        tiny_model.add_exit_heads("mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer 5 is out of range: this model has layers 1..4"):
        tiny_model.add_exit_heads(layers=[5])
    with pytest.raises(ValueError, match="layers must be a list of exit layers"):
        tiny_model.add_exit_heads(layers=3)  # type: ignore[arg-type]


def test_describe_reports_head_parameters(headed, tiny_model):
    plain, info = tiny_model.describe(), headed.describe()
    assert plain["exit_heads"] is None
    assert info["exit_heads"] == {"kind": "linear", "layers": [1, 2, 3], "parameters_per_head": 32 * 32 + 32,
                                  "parameters": 3 * (32 * 32 + 32)}
    assert info["parameters"] == plain["parameters"] + 3 * 1056
    for n in (1, 2, 3):
        assert info["parameters_per_exit"][n] == plain["parameters_per_exit"][n] + 1056
    assert info["parameters_per_exit"][4] == plain["parameters_per_exit"][4]


# ----------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(headed, tmp_path):
    path = headed.save(tmp_path / "m")
    meta = json.loads((path / "matryoshka2d.json").read_text())
    assert meta["exit_heads"] == {"kind": "linear", "layers": [1, 2, 3]}
    assert HEADS_FILE in json.loads((path / "manifest.json").read_text())["files"]
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    assert "`linear` on layers [1, 2, 3]" in (path / "README.md").read_text()
    loaded = MatryoshkaEncoder.from_pretrained(path)
    assert loaded.exit_head_layers == [1, 2, 3] and "exit_heads" not in loaded.metadata
    for n in range(1, 5):
        np.testing.assert_array_equal(loaded.encode(SENTENCES, layer=n), headed.encode(SENTENCES, layer=n))
    loaded.save(tmp_path / "again")  # and again: the entry is not duplicated through the metadata
    assert MatryoshkaEncoder.from_pretrained(tmp_path / "again").exit_head_layers == [1, 2, 3]


def test_missing_or_mismatched_heads_file_is_a_clear_error(headed, tmp_path):
    path = headed.save(tmp_path / "m")
    (path / HEADS_FILE).unlink()
    with pytest.raises(ValueError, match=rf"is damaged: .*{HEADS_FILE} \(missing\)"):
        MatryoshkaEncoder.from_pretrained(path)
    (path / "manifest.json").unlink()  # no manifest: the json entry itself catches it
    with pytest.raises(ValueError, match=rf"lists linear exit heads on layers \[1, 2, 3\], but {HEADS_FILE} is "
                                         r"missing, so those exits cannot be computed; copy the whole folder"):
        MatryoshkaEncoder.from_pretrained(path)
    headed.truncate(2).save(tmp_path / "two")
    shutil.copy(tmp_path / "two" / HEADS_FILE, path / HEADS_FILE)
    with pytest.raises(ValueError, match=r"holds tensors \['1.bias', '1.weight', '2.bias', '2.weight'\], but "
                                         r"matryoshka2d.json lists heads on layers \[1, 2, 3\]"):
        MatryoshkaEncoder.from_pretrained(path)
    meta = json.loads((path / "matryoshka2d.json").read_text())
    meta["exit_heads"] = {"kind": "mlp", "layers": [1]}
    (path / "matryoshka2d.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="exit head kind 'mlp' is not known to this version"):
        MatryoshkaEncoder.from_pretrained(path)


# ----------------------------------------------------------------------------------- export
def test_hf_export_of_a_headed_exit_is_refused(headed, tmp_path):
    with pytest.raises(ValueError, match=r"exit layer 2 has a linear exit head, which a plain Hugging Face folder "
                                         r"cannot express .* --format sentence-transformers .* --format onnx"):
        export_model(headed, tmp_path / "out", layer=2, dim=16, format="hf")
    assert not (tmp_path / "out").exists()


def test_hf_export_of_the_plain_exit_keeps_the_shallower_heads(headed, tmp_path):
    folder = export_model(headed, tmp_path / "out", layer=4, dim=16, format="hf")
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    assert loaded.exit_head_layers == [1, 2, 3]
    np.testing.assert_array_equal(loaded.encode(SENTENCES), headed.encode(SENTENCES, layer=4, dim=16))
    np.testing.assert_allclose(loaded.encode(SENTENCES, layer=2, dim=32), headed.encode(SENTENCES, layer=2),
                               atol=1e-6)


@pytest.mark.parametrize(("pooling", "dim"), [("mean", 16), ("mean", 32), ("cls_avg", 8), ("cls_avg", 32)])
def test_sentence_transformers_export_applies_the_head(tiny_dir, pooling, dim, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    source = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling=pooling).eval()
    source.add_exit_heads()
    _perturb(source)
    folder = export_model(source, tmp_path / "st", layer=3, dim=dim, format="sentence-transformers")
    expected = source.encode(SENTENCES, layer=3, dim=dim)
    got = st.SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert got.shape == (len(SENTENCES), dim)
    assert ((got * expected).sum(1) / np.linalg.norm(got, axis=1)).min() >= COSINE
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert kinds == ["Transformer", "Pooling", "Dense", *(["Dense"] if dim < 32 else []), "Normalize"]
    head_cfg = json.loads((folder / modules[2]["path"] / "config.json").read_text())
    width = 64 if pooling == "cls_avg" else 32  # cls_avg: the head also averages the concatenated CLS and mean
    assert (head_cfg["in_features"], head_cfg["out_features"], head_cfg["bias"]) == (width, 32, True)
    assert head_cfg["activation_function"].endswith("Identity")
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    assert loaded.exit_head_layers == [1, 2, 3]
    np.testing.assert_allclose(loaded.encode(SENTENCES), expected, atol=1e-6)


def test_sentence_transformers_export_card_applies_the_head(headed, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    from tests.helpers.modelcard import SNIPPET_SENTENCES, run_snippets

    folder = export_model(headed, tmp_path / "st", layer=2, dim=8, format="sentence-transformers")
    results = run_snippets(folder, monkeypatch)
    assert set(results) == {"matryoshka2d", "sentence-transformers", "transformers"}
    expected = headed.encode(SNIPPET_SENTENCES, layer=2, dim=8)
    for title, got in results.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=title)


def test_onnx_export_holds_the_head(headed, tmp_path):
    pytest.importorskip("onnxruntime")
    from matryoshka2d.export.onnx import OnnxEncoder

    folder = export_model(headed, tmp_path / "onnx", layer=2, dim=16, format="onnx")
    report = json.loads((folder / "matryoshka2d.json").read_text())["export"]
    assert report["exit_head"] == "linear head of layer 2, inside the graph"
    assert report["verification"]["onnxruntime_vs_source_max_abs_diff"] <= 1e-4
    assert np.abs(OnnxEncoder(folder).encode(SENTENCES) - headed.encode(SENTENCES, layer=2, dim=16)).max() <= 1e-4


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.exit_heads", "mlp", r"model.exit_heads = 'mlp' is invalid: choose one of none, linear \(e.g. "
                                r"model.exit_heads = \"linear\"\)"),
    ("model.exit_heads", None, "model.exit_heads = None is invalid: choose one of none, linear"),
    ("train.head_lr", 0, r"train.head_lr = 0.0 is invalid: expected a finite number > 0 \(e.g. 1e-3, .*\), or "
                         "leave it unset to train the exit heads at train.lr"),
    ("train.head_lr", float("inf"), "train.head_lr = inf is invalid: expected a finite number > 0"),
    ("train.head_lr", "fast", "train.head_lr = 'fast' is invalid: expected a finite number > 0"),
    ("train.head_lr", True, "train.head_lr = True is invalid"),
    ("model.head_on_last", True, r"model.head_on_last = True is invalid: a head on the last exit needs a head "
                                 r"kind: set model.exit_heads = \"linear\" too"),
    ("model.head_on_last", "yes", "model.head_on_last = 'yes' is invalid: expected true or false"),
])
def test_invalid_head_settings_name_field_value_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        Config().replace({key: value})


def test_head_settings_round_trip_through_toml(tmp_path):
    from matryoshka2d.training.config import load_config

    config = Config().replace({"exit_heads": "linear", "head_lr": 1})
    assert (config.model.exit_heads, config.train.head_lr) == ("linear", 1.0)
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    assert load_config(path) == config


# ----------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.training import scored_rows

    root = tmp_path_factory.mktemp("data")
    rows = "\n".join(["sentence1\tsentence2\tscore", *scored_rows(0, 64)]) + "\n"
    (root / "train.tsv").write_text(rows, encoding="utf-8")
    return root


def _config(tiny_dir: Path, data_dir: Path, out: Path, **overrides: object) -> Config:
    from tests.helpers.training import make_config

    heads = {"model.exit_heads": "linear", "train.head_lr": 1e-2, "train.max_steps": 4, "run.save_every": 2}
    return make_config(tiny_dir, data_dir, out, **{**heads, **overrides})


def test_build_adds_heads_where_the_objective_trains_and_groups_their_lr(tiny_dir, data_dir, tmp_path, caplog):
    from matryoshka2d.training.setup import build, make_optimizer

    model, _, _, objective = build(_config(tiny_dir, data_dir, tmp_path / "a", **{"objective.layer_pool": [1, 3]}))
    assert model.exit_head_layers == [1, 3]
    optimizer, _ = make_optimizer(objective, _config(tiny_dir, data_dir, tmp_path / "a"), 10)
    assert len(optimizer.param_groups) == 3
    group = optimizer.param_groups[2]
    assert (group["initial_lr"], group["weight_decay"]) == (1e-2, 0.0)  # lr itself starts the warm-up at 0
    assert {id(p) for p in group["params"]} == {id(p) for p in model.exit_heads.parameters()}
    backbone = sum(len(g["params"]) for g in optimizer.param_groups[:2])
    assert backbone == len(list(model.backbone.parameters()))
    for strategy, extra in (("separate", {"objective.separate_layers": 2}), ("full", {})):
        with caplog.at_level("WARNING"):
            model, *_ = build(_config(tiny_dir, data_dir, tmp_path / "b", **{"objective.strategy": strategy,
                                                                               **extra}))
        assert model.exit_head_layers == []
        assert f"strategy '{strategy}' trains only the last exit" in caplog.text
        assert "train.head_lr = 0.01 is unused: the model has no exit heads" in caplog.text


def test_layer_lr_decay_gives_each_block_its_lr_and_keeps_the_heads_lr(tiny_dir, data_dir, tmp_path):
    from matryoshka2d.encoder.architectures import get_blocks
    from matryoshka2d.training.setup import build, make_optimizer

    config = _config(tiny_dir, data_dir, tmp_path / "a", **{"train.layer_lr_decay": 0.5, "train.lr": 1e-3})
    model, _, _, objective = build(config)
    optimizer, _ = make_optimizer(objective, config, 10)
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    n_last = model.num_layers
    for n, block in enumerate(get_blocks(model.backbone), start=1):
        assert [lr_of[id(p)] for p in block.parameters()] == pytest.approx([1e-3 * 0.5 ** (n_last - n)] * len(
            list(block.parameters()))), n
    embeddings = model.backbone.embeddings.word_embeddings.weight
    assert lr_of[id(embeddings)] == pytest.approx(1e-3 * 0.5 ** n_last)
    assert {lr_of[id(p)] for p in model.exit_heads.parameters()} == {1e-2}  # head_lr, not decayed by depth
    assert len(lr_of) == len(list(objective.parameters()))  # every weight in exactly one group
    assert optimizer.param_groups[0]["name"] == "backbone" and optimizer.param_groups[0]["initial_lr"] == 1e-3
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert all(p.ndim >= 2 for g in decayed for p in g["params"])  # biases and LayerNorms stay undecayed
    plain = _config(tiny_dir, data_dir, tmp_path / "b")
    names = [g["name"] for g in make_optimizer(build(plain)[3], plain, 10)[0].param_groups]
    assert names == ["backbone", "backbone-no-decay", "heads"]  # 1.0: the groups of every earlier run


def test_layer_lr_decay_trains_and_logs_the_top_lr(tiny_dir, data_dir, tmp_path):
    import json

    from matryoshka2d.training.loop import train

    out = tmp_path / "run"
    train(_config(tiny_dir, data_dir, out, **{"train.layer_lr_decay": 0.8}))
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert lines and all(0 < x["lr"] <= 1e-3 and x["head_lr"] > x["lr"] for x in lines[1:])


@pytest.mark.parametrize(("strategy", "extra", "layers"), [
    ("full", {}, [4]),
    ("separate", {"objective.separate_layers": 2}, [2]),
    ("dense", {}, [1, 2, 3, 4]),
])
def test_head_on_last_gives_the_last_exit_a_head_that_training_moves(tiny_dir, data_dir, tmp_path, strategy, extra,
                                                                      layers):
    """The controls of issue 19: full + head and separate + head (the head on the model's own last exit)."""
    from matryoshka2d.training.loop import train

    config = _config(tiny_dir, data_dir, tmp_path / strategy, **{"objective.strategy": strategy,
                                                                 "model.head_on_last": True, **extra})
    model = MatryoshkaEncoder.from_pretrained(train(config).final_dir)  # saved and loaded with its last head
    assert model.exit_head_layers == layers and model.num_layers == layers[-1]
    assert not torch.equal(model.exit_heads[str(layers[-1])].weight, torch.eye(32))  # trained away from identity


def test_training_with_heads_moves_them_and_resumes_exactly(tiny_dir, data_dir, tmp_path):
    from matryoshka2d.training.loop import train
    from tests.helpers.training import read_log

    straight = train(_config(tiny_dir, data_dir, tmp_path / "straight"))
    model = MatryoshkaEncoder.from_pretrained(straight.final_dir)
    assert model.exit_head_layers == [1, 2, 3]
    records = read_log(straight.run_dir)
    trained = {n for r in records if r["head_lr"] > 0 for n in r["layers"] if n < 4}  # step 1: warm-up, lr 0
    assert trained
    for n in range(1, 4):  # a head moves exactly when its exit was trained
        moved = not torch.equal(model.exit_heads[str(n)].weight, torch.eye(32))
        assert moved == (n in trained), (n, trained)
    training = model.metadata["training"]
    assert (training["exit_heads"], training["head_lr"]) == ("linear", 1e-2)
    assert records[1]["head_lr"] == pytest.approx(10 * records[1]["lr"])  # same schedule, 10x the peak
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(straight.run_dir))
    assert {"exit_heads.1.weight", "exit_heads.3.bias"} <= set(state.model)
    assert len(state.optimizer["param_groups"]) == 3

    config = _config(tiny_dir, data_dir, tmp_path / "killed")

    def kill(step: int, record: dict) -> None:
        if step == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=kill)
    resumed = train(config, resume=True)
    a, b = MatryoshkaEncoder.from_pretrained(resumed.final_dir).state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
