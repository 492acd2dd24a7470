"""The files of the exits' own parameters in a model folder: ``exit_heads.safetensors`` (a head per exit,
:mod:`~matryoshka2d.encoder.heads`) and ``query_exits.safetensors`` (the query exits' heads and adapters,
:mod:`~matryoshka2d.encoder.query_path`), each named by an entry of ``matryoshka2d.json`` and checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matryoshka2d.vocab import EXIT_HEAD_KINDS

HEADS_FILE = "exit_heads.safetensors"
QUERY_EXITS_FILE = "query_exits.safetensors"  # the query exits' own parameters (encoder/query_path.py)


@dataclass
class ExitHeadsState:
    """Exit heads as a folder stores them.

    Attributes:
        kind: one of :data:`~matryoshka2d.vocab.EXIT_HEAD_KINDS`.
        layers: the exits with a head, ascending.
        tensors: ``{"<layer>.weight": (D, D), "<layer>.bias": (D,)}`` float tensors on the CPU.
    """

    kind: str
    layers: list[int]
    tensors: dict[str, Any]

    def entry(self) -> dict[str, Any]:
        """The ``exit_heads`` entry of ``matryoshka2d.json``."""
        return {"kind": self.kind, "layers": list(self.layers)}


def write_heads(folder: Path, heads: ExitHeadsState) -> dict[str, Any]:
    """Write ``exit_heads.safetensors`` into ``folder``.

    Returns:
        The ``exit_heads`` entry for ``matryoshka2d.json``.
    """
    from safetensors.torch import save_file

    save_file(heads.tensors, str(Path(folder) / HEADS_FILE), metadata={"kind": str(heads.kind)})
    return heads.entry()


def read_heads(folder: Path, entry: Any, *, num_layers: int, hidden_size: int) -> ExitHeadsState:
    """The heads named by ``entry`` (from ``matryoshka2d.json``) with the weights in ``folder``.

    Raises:
        ValueError: a malformed entry, a missing or damaged file, or tensors that do not match the entry
            or the model's depth and width.
    """
    where = Path(folder)
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), list) or not entry["layers"]:
        raise ValueError(f"{where}: matryoshka2d.json has exit_heads = {entry!r}, expected "
                         "{'kind': 'linear', 'layers': [1, 2, ...]}; re-save the model")
    kind, layers = entry.get("kind"), entry["layers"]
    if kind not in EXIT_HEAD_KINDS:
        raise ValueError(f"{where}: exit head kind {kind!r} is not known to this version of matryoshka2d "
                         f"(it knows {', '.join(EXIT_HEAD_KINDS)}); upgrade matryoshka2d")
    n = num_layers
    if not all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= n for m in layers):
        raise ValueError(f"{where}: exit_heads layers {layers} must be integers in 1..{n} (this model has {n} "
                         "layers); the folder is inconsistent, re-save it")
    path = where / HEADS_FILE
    if not path.is_file():
        raise ValueError(
            f"{where}: matryoshka2d.json lists {kind} exit heads on layers {layers}, but {HEADS_FILE} is "
            "missing, so those exits cannot be computed; copy the whole folder again or re-save the model"
        )
    tensors = load_tensors(path, "re-save or re-copy the folder")
    d = hidden_size
    expected = {f"{m}.{p}": (d, d) if p == "weight" else (d,) for m in layers for p in ("weight", "bias")}
    if set(tensors) != set(expected):
        raise ValueError(f"{path} holds tensors {sorted(tensors)}, but matryoshka2d.json lists heads on layers "
                         f"{layers} (expected {sorted(expected)}); the folder is inconsistent, re-save it")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} for a "
                             f"model of width {d}; the heads belong to another model, re-save it")
    return ExitHeadsState(str(kind), sorted(layers), {k: v.float() for k, v in tensors.items()})


def read_query_exits(folder: Path, entry: Any, *, num_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The query exits named by ``entry`` (``query_exits`` of ``matryoshka2d.json``) and their tensors.

    The tensors' names and shapes are checked by the encoder that loads them
    (:meth:`~matryoshka2d.encoder.query_path.QueryPath.load_tensors`).

    Raises:
        ValueError: a malformed entry, or a missing or damaged file.
    """
    where, n = Path(folder), num_layers
    layers = entry.get("layers") if isinstance(entry, dict) else None
    doc = entry.get("document_exit") if isinstance(entry, dict) else None
    rank = entry.get("rank") if isinstance(entry, dict) else None
    if not isinstance(layers, list) or not layers or not isinstance(doc, int) or isinstance(doc, bool) \
            or not 1 <= doc <= n or not all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m < doc
                                            for m in layers) \
            or not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"{where}: matryoshka2d.json has query_exits = {entry!r}, expected e.g. "
                         f"{{'layers': [1, 2, 3], 'document_exit': {n}, 'rank': 16}} with layers below the "
                         f"document exit (1..{n}); re-save the model or align it again (m2d align)")
    path = where / QUERY_EXITS_FILE
    if not path.is_file():
        raise ValueError(f"{where}: matryoshka2d.json lists query exits {layers}, but {QUERY_EXITS_FILE} is "
                         "missing; copy the whole folder again or align the model again (m2d align)")
    tensors = load_tensors(path, "re-copy the folder or align the model again")
    return dict(entry), {k: v.float() for k, v in tensors.items()}



def write_query_exits(folder: Path, entry: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Write ``query_exits.safetensors`` into ``folder``.

    Returns:
        The ``query_exits`` entry for ``matryoshka2d.json`` (``entry``).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(Path(folder) / QUERY_EXITS_FILE))
    return entry


def load_tensors(path: Path, fix: str) -> dict[str, Any]:
    """The tensors of the safetensors file ``path``.

    Raises:
        ValueError: a damaged file, or not a safetensors one (the message ends with ``fix``).
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is damaged or not a safetensors file ({e}); {fix}") from e
