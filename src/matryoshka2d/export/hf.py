"""The Hugging Face and sentence-transformers folder layouts of an exit (see :mod:`matryoshka2d.export.exporter`).

The ``hf`` layout is the physically truncated backbone and its tokenizer; the sentence-transformers layout
adds ``modules.json``, ``1_Pooling``, the ``Dense`` modules that apply the exit's head and keep the first
``dim`` coordinates, and ``Normalize``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from matryoshka2d.encoder.heads import folded_dense
from matryoshka2d.io.manifest import library_versions
from matryoshka2d.vocab import ST_POOLING_FLAGS, ST_POOLING_MODES

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder


def _hf(model: MatryoshkaEncoder) -> Any:
    """The backbone as the transformers model it is (``nn.Module`` attribute typing hides ``config``)."""
    return model.backbone


def dropped_pooler(model: MatryoshkaEncoder) -> bool:
    """True when the backbone class builds a task pooler that our weights lack (loaders must skip it)."""
    import inspect

    init = inspect.signature(type(model.backbone).__init__).parameters
    return "add_pooling_layer" in init and getattr(model.backbone, "pooler", None) is None


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (``None`` when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(package.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------- runtime fields
def runtime_dims(model: MatryoshkaEncoder, width: int) -> list[int]:
    """The Matryoshka widths an exported folder of output ``width`` advertises to serving runtimes.

    The widths the model was trained at (``trained_dims`` in its metadata; otherwise the default doubling
    ladder of :func:`matryoshka2d.encoder.model.matryoshka_dims`) that do not exceed ``width``, and ``width``.
    """
    from matryoshka2d.encoder.model import matryoshka_dims

    trained = model.metadata.get("trained_dims") or matryoshka_dims(model.hidden_size)
    return sorted({int(d) for d in trained if 0 < int(d) <= width} | {int(width)})


def write_runtime_fields(folder: Path, dims: list[int]) -> None:
    """Add ``is_matryoshka`` and ``matryoshka_dimensions`` to ``folder/config.json``.

    vLLM and SGLang read these fields to accept a request's ``dimensions`` (the OpenAI embeddings
    parameter): ``is_matryoshka`` allows truncation, ``matryoshka_dimensions`` lists the widths to accept.
    transformers keeps unknown config keys as attributes, so the folder still loads everywhere.

    Raises:
        FileNotFoundError: ``folder`` has no ``config.json``.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write the backbone's config before its runtime fields")
    write_config_fields(folder, {"is_matryoshka": True, "matryoshka_dimensions": [int(d) for d in dims]})


def write_config_fields(folder: Path, fields: dict[str, Any]) -> None:
    """Add ``fields`` to ``folder/config.json`` when the folder has one (transformers keeps unknown keys)."""
    path = folder / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(fields)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------- writers
def write_tokenizer(model: MatryoshkaEncoder, folder: Path) -> None:
    """Save the tokenizer with ``model_max_length`` set to the model's ``max_seq_length``.

    Plain ``tokenizer(..., truncation=True)`` then truncates where the exported model was evaluated.
    """
    model.tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["model_max_length"] = model.max_seq_length
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_backbone(sub: MatryoshkaEncoder, folder: Path) -> None:
    """Save the (truncated) backbone as safetensors and its tokenizer (see :func:`write_tokenizer`)."""
    _hf(sub).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(sub, folder)


def write_sentence_transformers_layout(sub: MatryoshkaEncoder, folder: Path, dim: int) -> None:
    """Transformer (the root) -> Pooling -> [Dense: the exit's head] -> [Dense: keep ``dim`` coords /
    average CLS+mean] -> Normalize.

    sentence-transformers applies ``truncate_dim`` after all modules, i.e. after ``Normalize``, which would
    leave vectors of norm < 1; the Dense module truncates before normalising instead. ``truncate_dim`` is
    still recorded so ``get_sentence_embedding_dimension()`` and tools reading the config see ``dim``.
    The head acts on the pooled vector before truncation, as in :meth:`MatryoshkaEncoder.forward`; with
    ``cls_avg`` it also takes over the averaging of the concatenated CLS and mean vectors.
    """
    hidden = sub.hidden_size
    modes = ST_POOLING_MODES[sub.pooling]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    sbert: dict[str, Any] = {"max_seq_length": sub.max_seq_length, "do_lower_case": False}
    if dropped_pooler(sub):
        sbert["model_args"] = {"add_pooling_layer": False}  # read by every sentence-transformers since 2.x
    _json(folder / "sentence_bert_config.json", sbert)
    _json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, **{key: mode in modes for mode, key in ST_POOLING_FLAGS.items()},
        "include_prompt": True,
    })
    width = hidden * len(modes)  # what Pooling returns (the modes concatenated)
    if sub.num_layers in sub.exit_head_layers:
        weight, bias = folded_dense(sub.exit_heads[str(sub.num_layers)], len(modes))
        _write_dense(folder, modules, weight, bias)
        width = hidden
    if dim < hidden or width > hidden:
        # row i picks coordinate i of each concatenated pooled vector, weighted 1/len(modes): exact in fp32
        parts = width // hidden
        weight = torch.zeros(dim, width)
        for k in range(parts):
            weight[:, k * hidden : k * hidden + dim] = torch.eye(dim) / parts
        _write_dense(folder, modules, weight, None)
    idx = len(modules)
    _json(folder / f"{idx}_Normalize" / "config.json", {})
    modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    _json(folder / "modules.json", modules)
    versions = {"transformers": library_versions()["transformers"], "pytorch": torch.__version__}
    st_version = installed_version("sentence_transformers")
    if st_version:
        versions["sentence_transformers"] = st_version
    _json(folder / "config_sentence_transformers.json", {
        "__version__": versions, "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
        "truncate_dim": dim,
    })


def _write_dense(folder: Path, modules: list[dict[str, Any]], weight: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
    """Append a sentence-transformers ``Dense`` (identity activation) computing ``x @ weight.T (+ bias)``."""
    from safetensors.torch import save_file

    idx = len(modules)
    path = folder / f"{idx}_Dense"
    path.mkdir()
    tensors = {"linear.weight": weight.contiguous(), **({"linear.bias": bias.contiguous()} if bias is not None
                                                       else {})}
    save_file(tensors, str(path / "model.safetensors"))
    _json(path / "config.json", {"in_features": weight.shape[1], "out_features": weight.shape[0],
                                 "bias": bias is not None, "activation_function": "torch.nn.modules.linear.Identity"})
    modules.append({"idx": idx, "name": str(idx), "path": path.name, "type": "sentence_transformers.models.Dense"})


def _json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
