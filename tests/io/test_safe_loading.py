"""Loading a stranger's folder runs none of its code, unpickles nothing, and refuses inconsistent weights."""

from __future__ import annotations

import ast
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import build_parser, main
from tests.conftest import SENTENCES

SRC = Path(__file__).resolve().parents[2] / "src" / "matryoshka2d"

_CUSTOM_CODE = '''
from pathlib import Path

Path({marker!r}).write_text("custom code ran")

from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evil-bert"


class EvilModel(BertModel):
    config_class = EvilConfig
'''


def _with_custom_code(tiny_dir: Path, folder: Path, model_type: str) -> tuple[Path, Path]:
    """A copy of the tiny model whose config.json maps AutoConfig/AutoModel to ``evil.py``; returns the marker
    file that the module writes when it is imported."""
    shutil.copytree(tiny_dir, folder)
    marker = folder.parent / f"{folder.name}.ran"
    (folder / "evil.py").write_text(_CUSTOM_CODE.format(marker=str(marker)), encoding="utf-8")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, marker


@pytest.fixture()
def isolated_remote_code(tmp_path, monkeypatch):
    """Where transformers copies and imports trusted code: a temp folder, dropped from sys.modules after."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


# ----------------------------------------------------------------------------------- remote code
def test_custom_code_of_a_known_architecture_is_not_run(tiny_dir, tmp_path, caplog):
    folder, marker = _with_custom_code(tiny_dir, tmp_path / "m", "bert")
    with caplog.at_level(logging.WARNING, logger="matryoshka2d.io.folder"):
        model = MatryoshkaEncoder.from_pretrained(folder)
    assert not marker.exists()
    assert type(model.backbone).__name__ == "BertModel"  # the standard class, not evil.EvilModel
    assert "names custom code (evil.py) that was NOT run" in caplog.text
    reference = MatryoshkaEncoder.from_pretrained(tiny_dir).encode(SENTENCES)
    np.testing.assert_allclose(model.encode(SENTENCES), reference, atol=1e-6)


def test_custom_architecture_is_refused_without_the_flag(tiny_dir, tmp_path, capsys):
    folder, marker = _with_custom_code(tiny_dir, tmp_path / "m", "evil-bert")
    with pytest.raises(ValueError, match=r"needs its own code \(evil\.py, named by auto_map.*--trust-remote"):
        MatryoshkaEncoder.from_pretrained(folder)
    assert main(["info", str(folder)]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_asked(isolated_remote_code, tiny_dir, tmp_path):
    assert build_parser().parse_args(["info", "x"]).trust_remote_code is False
    folder, marker = _with_custom_code(tiny_dir, tmp_path / "m", "evil-bert")
    # the control: with the flag, the folder's code does run (so the checks above would have seen it)
    assert main(["info", str(folder), "--trust-remote-code"]) == 2  # then refused: unsupported architecture
    assert marker.read_text() == "custom code ran"


# ----------------------------------------------------------------------------------- no pickle
class _Payload:
    """An object whose unpickling writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "unpickled"))


def _bin_folder(tiny_dir: Path, folder: Path, extra: dict | None = None) -> Path:
    shutil.copytree(tiny_dir, folder)
    state = dict(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, **(extra or {})}, folder / "pytorch_model.bin")
    return folder


def test_pickled_objects_in_bin_weights_are_never_unpickled(tiny_dir, tmp_path):
    marker = tmp_path / "pickle.ran"
    folder = _bin_folder(tiny_dir, tmp_path / "m", {"evil": _Payload(marker)})
    with pytest.raises(ValueError, match=r"hold objects other than tensors; they were NOT unpickled"):
        MatryoshkaEncoder.from_pretrained(folder)
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the control: a full unpickle runs it
    assert marker.read_text() == "unpickled"


def test_plain_tensor_bin_weights_load_with_weights_only(tiny_dir, tmp_path):
    folder = _bin_folder(tiny_dir, tmp_path / "m")
    expected = MatryoshkaEncoder.from_pretrained(tiny_dir).encode(SENTENCES)
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    np.testing.assert_allclose(loaded.encode(SENTENCES), expected, atol=1e-6)


_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}


def _unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls in ``source`` that could unpickle: torch.load without weights_only=True, pickle/joblib/dill
    loads, numpy loads with allow_pickle, pandas read_pickle, any weights_only=False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
            found += [f"{where} from {node.module} import {a.name}"
                      for a in node.names if a.name in _PICKLE_CALLS]
        if not isinstance(node, ast.Call):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        flag = kwargs.get("weights_only")
        if isinstance(flag, ast.Constant) and flag.value is False:
            found.append(f"{where} weights_only=False")
        if "allow_pickle" in kwargs and not (isinstance(kwargs["allow_pickle"], ast.Constant)
                                             and kwargs["allow_pickle"].value is False):
            found.append(f"{where} allow_pickle is not False")
        func = node.func
        if not isinstance(func, ast.Attribute):
            continue
        owner = func.value.id if isinstance(func.value, ast.Name) else ast.unparse(func.value)
        if func.attr == "read_pickle":
            found.append(f"{where} {owner}.read_pickle")
        if owner in _PICKLE_MODULES and func.attr in _PICKLE_CALLS:
            found.append(f"{where} {owner}.{func.attr}")
        if owner in ("torch", "torch.serialization") and func.attr == "load":
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where} torch.load without weights_only=True")
    return found


def test_the_static_pickle_check_catches_unsafe_calls():
    bad = ("import pickle, torch, numpy as np, pandas as pd\nfrom dill import loads\npickle.load(f)\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
           "pd.read_pickle(p)\nAutoModel.from_pretrained(p, weights_only=False)\n")
    assert len(_unsafe_loads(bad, "bad.py")) == 8
    good = ("import torch, numpy as np, pickle\ntorch.load(p, map_location='cpu', weights_only=True)\n"
            "np.load(p)\nnp.load(p, allow_pickle=False)\nexcept_type = pickle.UnpicklingError\n")
    assert _unsafe_loads(good, "good.py") == []


def test_the_package_never_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files
             for hit in _unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(SRC)))]
    assert found == []


# ----------------------------------------------------------------------------------- inconsistent folders
def _edit_config(tiny_dir: Path, folder: Path, **changes: object) -> Path:
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_hidden_size_mismatch_is_refused(tiny_dir, tmp_path):
    folder = _edit_config(tiny_dir, tmp_path / "m", hidden_size=64, intermediate_size=128)
    message = (rf"{folder}: config.json says hidden_size=64 but the weights have 32 "
               r"\(embeddings.word_embeddings.weight has shape \(\d+, 32\)\)")
    with pytest.raises(ValueError, match=message):
        MatryoshkaEncoder.from_pretrained(folder)


def test_depth_mismatch_is_refused(tiny_dir, tmp_path):
    folder = _edit_config(tiny_dir, tmp_path / "m", num_hidden_layers=2)
    with pytest.raises(ValueError, match="config.json says 2 layers but the weights hold 4 blocks"):
        MatryoshkaEncoder.from_pretrained(folder)


def test_other_shape_mismatch_is_a_value_error(tiny_dir, tmp_path):
    folder = _edit_config(tiny_dir, tmp_path / "m", intermediate_size=48)
    with pytest.raises(ValueError, match=r"the weights' shapes do not match config.json"):
        MatryoshkaEncoder.from_pretrained(folder)


def test_missing_weights_are_refused_not_randomly_initialised(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "m")
    state = dict(load_file(folder / "model.safetensors"))
    dropped = next(k for k in state if "layer.1.output.dense.weight" in k)
    del state[dropped]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 weights are missing from the checkpoint \(encoder.layer.1.out"):
        MatryoshkaEncoder.from_pretrained(folder)


def test_tokenizer_larger_than_the_embedding_table_is_refused(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = shutil.copytree(tiny_dir, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"newtoken{i}" for i in range(rows + 10)])
    tokenizer.save_pretrained(folder)
    message = rf"the tokenizer has {len(tokenizer)} tokens but the model's embedding table has {rows} rows"
    with pytest.raises(ValueError, match=message):
        MatryoshkaEncoder.from_pretrained(folder)


@pytest.mark.parametrize("with_manifest", [False, True], ids=["hf-folder", "saved-with-manifest"])
def test_truncated_safetensors_is_named(tiny_model, tiny_dir, tmp_path, with_manifest):
    folder = tiny_model.save(tmp_path / "m") if with_manifest else shutil.copytree(tiny_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    message = "truncated or altered" if with_manifest else "is damaged or not a safetensors file"
    with pytest.raises(ValueError, match=rf"{weights}.*{message}"):
        MatryoshkaEncoder.from_pretrained(folder)
