"""Which model built an index, by content: what ``m2d index`` records and ``m2d search`` checks.

An index's manifest records the model name as given (``model``), the absolute path of a local folder
(``model_path``; ``None`` for a hub id) and its fingerprint (``model_fingerprint``: SHA-256 over weights,
config and exit heads, :func:`~matryoshka2d.io.folder.model_fingerprint`). Queries must be encoded by the
same model: search loads the recorded absolute path by default (never a relative path against the current
folder), and refuses a model with another fingerprint or width unless forced.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def model_record(name_or_path: str) -> dict[str, Any]:
    """``{"model", "model_path", "model_fingerprint"}`` of the model ``name_or_path`` names (for a manifest)."""
    from matryoshka2d.io.folder import model_fingerprint, resolve_model_path

    resolved = Path(resolve_model_path(name_or_path))
    local = resolved.is_dir()
    return {"model": str(name_or_path), "model_path": str(resolved.resolve()) if local else None,
            "model_fingerprint": model_fingerprint(name_or_path) if local else None}


def query_model_source(manifest: dict[str, Any], model: str | None) -> str:
    """The model to encode queries with: ``model`` if given, else the one the index records.

    The recorded absolute path wins; an alias of an offline model (``minilm``) stays an alias; a relative
    path is never looked up in the current folder.

    Raises:
        ValueError: no model recorded, the recorded folder is gone, or an index without a recorded path names
            a relative one.
    """
    from matryoshka2d.io.folder import resolve_model_path

    if model is not None:
        return model
    name, path = manifest.get("model"), manifest.get("model_path")
    if name is None:
        raise ValueError("the index records no model (built with CascadeIndex.build without source=); pass "
                         "--model with the model that built it")
    name = str(name)
    alias = resolve_model_path(name) != name if not Path(name).exists() else False
    if path and Path(path).is_dir():
        return str(path)
    if alias:
        return name
    if path:
        raise ValueError(f"the index's model {name!r} was built from {path}, which is no longer there; pass "
                         "--model with the folder of that model")
    if Path(name).is_absolute():  # an index written before model records, from an absolute path
        return name
    if "model_fingerprint" not in manifest or Path(name).exists():
        raise ValueError(f"the index records its model only as {name!r}, which this command will not look up "
                         "relative to the current folder; pass --model with that model's folder (or rebuild "
                         "the index, which records its absolute path and fingerprint)")
    return name  # a hub id when the index was built


def aligned_query_exits(model: Any, document_exit: int, input_type: str = "query") -> list[int]:
    """The exits of ``model`` whose queries (encoded as ``input_type``) live in the space of its documents at
    ``document_exit``: exits aligned post-hoc only on their own query path, exits trained into it on either."""
    space = model.document_space
    if space["document_exit"] != document_exit or (input_type != "query" and space["query_path"] == "own"):
        return [document_exit]
    return list(space["query_exits"])


def check_query_exit(model: Any, layer: int, document_exit: int, *, input_type: str = "query",
                     force: bool = False) -> None:
    """Refuse queries at an exit that does not share the index's document space, unless ``force``.

    Raises:
        ValueError: naming the exits that are aligned to the index, and the ways out.
    """
    aligned = aligned_query_exits(model, document_exit, input_type)
    if layer in aligned:
        return
    message = (f"--query-layer {layer} is not aligned to this index, whose documents were encoded at layer "
               f"{document_exit}: queries from layer {layer} live in another space and retrieve poorly; the exits "
               f"aligned to layer {document_exit} are {aligned}")
    if not force:
        raise ValueError(message + f"; pass one of them, align the model (m2d align MODEL --exits {layer} ...), "
                         "or --force to search anyway")
    logger.warning("%s; searching anyway (--force)", message)


def check_query_model(manifest: dict[str, Any], model: Any, source: str, *, force: bool = False) -> None:
    """Refuse a query model that is not the index's (another fingerprint or width) unless ``force``.

    Raises:
        ValueError: another model, naming both and the ``--force`` way out.
    """
    from matryoshka2d.io.folder import model_fingerprint

    problems = []
    width = manifest.get("hidden_size")
    if isinstance(width, int) and model.hidden_size != width:
        problems.append(f"it is {model.hidden_size} wide, the index's model {width}")
    recorded = manifest.get("model_fingerprint")
    if recorded:
        found = model_fingerprint(source)
        if found != recorded and getattr(model, "metadata", {}).get("document_fingerprint") == recorded:
            found = recorded  # aligned post-hoc (m2d align) from the index's model: the same document path
        if found is None:
            logger.warning("cannot check that %s is the index's model (it is not a local folder)", source)
        elif found != recorded:
            problems.append(f"its fingerprint {found[:12]} differs from the index's {recorded[:12]}")
    if not problems:
        return
    message = (f"--model {source} is not the model that built this index ({manifest.get('model')!r}, "
               f"{manifest.get('model_path') or 'a hub id'}): {'; '.join(problems)}")
    if not force:
        raise ValueError(message + "; pass the index's model, or --force to search with this one anyway")
    logger.warning("%s; searching anyway (--force)", message)
