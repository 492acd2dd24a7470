"""The multi-exit encoder: exits, early exit, truncation, pooling, padding, save/load, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.encoder import architectures
from matryoshka2d.encoder.pooling import POOLING_MODES, pool
from tests.conftest import SENTENCES


def _reference(model: MatryoshkaEncoder, texts: list[str], layer: int) -> np.ndarray:
    """Pool hidden_states[layer] of the full model (no early exit), one sentence at a time (no padding)."""
    out = []
    with torch.inference_mode():
        for text in texts:
            f = model.tokenizer([text], return_tensors="pt", truncation=True, max_length=model.max_seq_length)
            hs = model.backbone(**f, output_hidden_states=True).hidden_states
            out.append(F.normalize(pool(hs[layer], f["attention_mask"], model.pooling).float(), dim=-1))
    return torch.cat(out).numpy()


@pytest.mark.parametrize(
    ("arch", "pooling"),
    [("bert", mode) for mode in POOLING_MODES] + [("distilbert", "mean"), ("distilbert", "cls"), ("mpnet", "mean"),
                                                 ("mpnet", "last")],
)
def test_every_exit_equals_truncated_model_and_hidden_states(tiny_dirs, arch, pooling):
    model = MatryoshkaEncoder.from_pretrained(tiny_dirs[arch], pooling=pooling)
    for layer in range(1, model.num_layers + 1):
        ours = model.encode(SENTENCES, layer=layer, batch_size=3)
        truncated = model.truncate(layer)
        assert truncated.num_layers == layer
        np.testing.assert_allclose(truncated.encode(SENTENCES, batch_size=3), ours, atol=1e-5)
        np.testing.assert_allclose(_reference(model, SENTENCES, layer), ours, atol=1e-5)


def test_blocks_past_exit_never_run(tiny_model):
    calls: list[int] = []
    for i, block in enumerate(architectures.get_blocks(tiny_model.backbone)):
        block.register_forward_hook(lambda *_, i=i: calls.append(i + 1))
    tiny_model.encode(SENTENCES, layer=2, batch_size=100)
    assert sorted(set(calls)) == [1, 2]
    calls.clear()
    out = tiny_model(tiny_model.tokenize(SENTENCES), layers=(1, 3))
    assert sorted(out) == [1, 3] and calls == [1, 2, 3]  # one pass, stopped after block 3


def test_padding_never_changes_an_embedding(tiny_model):
    for mode in POOLING_MODES:
        tiny_model.pooling = mode
        alone = np.stack([tiny_model.encode(t) for t in SENTENCES])
        batched = tiny_model.encode(SENTENCES, batch_size=len(SENTENCES))
        np.testing.assert_allclose(alone, batched, atol=1e-5, err_msg=mode)


def test_dim_is_prefix_then_renormalise(tiny_model):
    full = tiny_model.encode(SENTENCES, layer=3, normalize=False)
    cut = tiny_model.encode(SENTENCES, layer=3, dim=8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    assert cut.shape == (len(SENTENCES), 8)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)


def test_input_order_restored_after_length_sorting(tiny_model):
    emb = tiny_model.encode(SENTENCES, batch_size=2)
    for i, text in enumerate(SENTENCES):
        np.testing.assert_allclose(emb[i], tiny_model.encode([text])[0], atol=1e-5)
    assert tiny_model.encode(SENTENCES[0]).shape == (tiny_model.hidden_size,)


def test_empty_string_embeds_like_special_tokens_only(tiny_model):
    emb = tiny_model.encode(["", "cat"])
    assert np.isfinite(emb).all() and not np.allclose(emb[0], emb[1])


def test_truncation_is_reported(tiny_model, caplog):
    long = " ".join(["word"] * 500)
    with caplog.at_level("WARNING"):
        tiny_model.encode([long, "cat"])
    assert "1 of 2 texts were longer than max_seq_length=128" in caplog.text


def test_save_load_round_trip(tiny_model, tmp_path):
    tiny_model.metadata["trained_dims"] = [8, 16, 32]
    path = tiny_model.save(tmp_path / "m")
    meta = json.loads((path / "matryoshka2d.json").read_text())
    assert meta["format_version"] == 1 and meta["pooling"] == "mean" and meta["num_layers"] == 4
    assert {"torch", "transformers", "matryoshka2d"} <= set(meta["library_versions"])
    assert (path / "model.safetensors").exists() and (path / "README.md").exists()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    loaded = MatryoshkaEncoder.load(path)
    assert loaded.metadata["trained_dims"] == [8, 16, 32]
    for layer in (1, 4):
        np.testing.assert_array_equal(loaded.encode(SENTENCES, layer=layer), tiny_model.encode(SENTENCES, layer=layer))
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        tiny_model.save(path)
    tiny_model.save(path, overwrite=True)


def test_truncated_save_has_consistent_config(tiny_model, tmp_path):
    path = tiny_model.truncate(2).save(tmp_path / "t")
    backbone = AutoModel.from_pretrained(path)
    assert backbone.config.num_hidden_layers == 2 and len(backbone.encoder.layer) == 2
    assert json.loads((path / "matryoshka2d.json").read_text())["truncated_from"] == 4


def test_newer_format_version_is_refused(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m")
    meta = json.loads((path / "matryoshka2d.json").read_text())
    meta["format_version"] = 99
    (path / "matryoshka2d.json").write_text(json.dumps(meta))
    (path / "manifest.json").unlink()  # a deliberate edit: without this, the manifest refuses the folder
    with pytest.raises(ValueError, match="format_version 99 is newer than this library supports"):
        MatryoshkaEncoder.load(path)


def test_sentence_transformers_folder_pooling_is_read(tiny_dir, tmp_path):
    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    import shutil

    shutil.copytree(tiny_dir, folder / "0_Transformer")
    (folder / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    model = MatryoshkaEncoder.from_pretrained(folder)
    assert model.pooling == "cls" and model.max_seq_length == 64


def test_default_model_aliases_resolve_offline():
    from matryoshka2d.io.folder import resolve_model_path

    paths = {resolve_model_path(name) for name in (None, "minilm", "sentence-transformers/all-MiniLM-L6-v2")}
    assert len(paths) == 1 and paths.pop().endswith("model")


def test_a_fetched_model_is_an_ordinary_folder_not_an_alias(tiny_dirs, tmp_path):
    """io/ knows no cache of the research scripts: mpnet names stay hub ids, the fetched folder is a path."""
    import shutil

    from matryoshka2d.io.folder import resolve_model_path

    for name in ("mpnet", "sentence-transformers/all-mpnet-base-v2"):
        assert resolve_model_path(name) == name
    folder = tmp_path / "models" / "all-mpnet-base-v2"
    shutil.copytree(tiny_dirs["mpnet"], folder)
    model = MatryoshkaEncoder.from_pretrained(str(folder))
    assert model.backbone.config.model_type == "mpnet" and model.num_layers == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer": 0}, r"layer 0 is out of range: this model has layers 1..4 .*pass 1..4"),
        ({"layer": -1}, r"layer -1 is out of range"),
        ({"layer": 5}, r"layer 5 is out of range"),
        ({"layer": 2.0}, r"layer 2.0 is out of range"),
        ({"dim": 0}, r"dim 0 is out of range: this model's embeddings have 1..32 dims; pass 1..32"),
        ({"dim": 33}, r"dim 33 is out of range"),
        ({"batch_size": 0}, r"batch_size 0 must be a positive integer"),
    ],
)
def test_bad_exit_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(["cat"], **kwargs)


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts is empty: encode needs at least one string"),
        (["ok", 3], r"texts\[1\] is int \(3\), not str; convert every item to str first"),
        (["ok", None], r"texts\[1\] is NoneType"),
        (b"bytes", "texts must be a list of strings, got bytes"),
    ],
)
def test_bad_texts(tiny_model, texts, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(texts)


def test_bad_model_paths(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="model path './nope/model' does not exist"):
        MatryoshkaEncoder.from_pretrained("./nope/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a model folder \\(no config.json\\)"):
        MatryoshkaEncoder.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        MatryoshkaEncoder.from_pretrained(tiny_dir / "config.json")
    with pytest.raises(ValueError, match="unknown pooling 'avg'; choose one of cls, mean, cls_avg, max, last"):
        MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="avg")


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported: bert, camembert"):
        MatryoshkaEncoder.from_pretrained(tmp_path / "gpt2")


def test_config_and_weights_disagreeing_is_refused(tiny_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "bad")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json says 6 layers but the weights hold 4 blocks"):
        MatryoshkaEncoder.from_pretrained(folder)


def test_describe_counts_parameters_per_exit(tiny_model):
    info = tiny_model.describe()
    per_exit = info["parameters_per_exit"]
    assert list(per_exit) == [1, 2, 3, 4] and per_exit[4] == info["parameters"]
    assert per_exit[1] < per_exit[2] < per_exit[4]


@pytest.mark.slow
def test_real_minilm_matches_transformers_and_sentence_transformers(shared_data):
    from transformers import AutoTokenizer

    from matryoshka2d.io.folder import resolve_model_path

    texts = [line.split("\t")[0] for line in (shared_data / "stsb/test.tsv").read_text().splitlines()[1:201]]
    model = MatryoshkaEncoder.from_pretrained("minilm")
    ours = model.encode(texts, layer=6)
    path = resolve_model_path("minilm")
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        f = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = hf(**f).last_hidden_state
        m = f["attention_mask"].unsqueeze(-1).float()
        ref = F.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert (ours * ref).sum(1).min() >= 0.99999
    st = pytest.importorskip("sentence_transformers")
    st_emb = st.SentenceTransformer(path, device="cpu").encode(texts, normalize_embeddings=True)
    assert (ours * st_emb).sum(1).min() >= 0.99999
