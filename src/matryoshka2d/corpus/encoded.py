"""Reading a finished corpus encode back: the vectors of one exit, checked by content, for an index.

Documents are encoded once, at scale (``m2d encode ... --exits``, locally or on Ray); ``m2d index --encoded DIR``
builds its index from those shards instead of encoding the corpus again. Each shard's SHA-256 is checked
against the output's ``manifest.json`` before it is read, so a damaged or swapped shard is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.corpus.pipeline import MANIFEST_NAME
from matryoshka2d.corpus.readers import require_pyarrow
from matryoshka2d.io.manifest import file_sha256


@dataclass
class EncodedExit:
    """The vectors of one exit of a finished corpus encode.

    Attributes:
        ids: the document ids, in corpus order.
        vectors: ``(rows, dim)`` float32 (L2-normalised unless the encode was run with ``--no-normalize``).
        layer: the exit's layer.
        dim: its width.
        model: the model the encode recorded (as given to ``m2d encode``).
        pooling: the pooling it recorded.
    """

    ids: list[str]
    vectors: np.ndarray
    layer: int
    dim: int
    model: str
    pooling: str | None


def read_encoded(folder: str | Path, layer: int | None = None, dim: int | None = None) -> EncodedExit:
    """The vectors of exit ``(layer, dim)`` of the corpus encode in ``folder``.

    Args:
        folder: an ``m2d encode --exits`` output.
        layer: the exit's layer (``None``: the deepest exit encoded).
        dim: its width (``None``: the widest encoded at that layer).

    Raises:
        ValueError: not a finished encode, no such exit, a quantised format (int8 / binary vectors cannot be
            indexed as floats), or a shard whose SHA-256 differs from the manifest.
    """
    require_pyarrow()
    import pyarrow.parquet as pq

    root = Path(folder)
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{root} is not a finished corpus encode (no {MANIFEST_NAME}); run or resume m2d encode "
                         "--exits first") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({e}); resume the encode to rewrite it") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != "matryoshka2d-corpus-embeddings":
        raise ValueError(f"{path} is not the manifest of an m2d encode --exits output")
    if manifest.get("input_type", "document") != "document":
        raise ValueError(f"{root} holds {manifest.get('input_type')!r} vectors (m2d encode --input-type "
                         f"{manifest.get('input_type')}); an index holds documents: encode the corpus with "
                         "--input-type document (the default)")
    fmt = manifest.get("format")
    if fmt not in ("float32", "float16"):
        raise ValueError(f"{root} holds {fmt} vectors; an index needs float vectors: encode with --format float32 "
                         "(or float16)")
    exits = [(int(e["layer"]), int(e["dim"]), str(e["column"])) for e in manifest.get("exits") or []]
    if not exits:
        raise ValueError(f"{path} lists no exits; the encode is damaged, run it again")
    want_layer = layer if layer is not None else max(e[0] for e in exits)
    at_layer = [e for e in exits if e[0] == want_layer]
    chosen = [e for e in at_layer if dim is None or e[1] == dim]
    if not chosen:
        have = ", ".join(f"{a}:{b}" for a, b, _ in exits)
        raise ValueError(f"{root} has no exit layer {want_layer}" + (f" dim {dim}" if dim else "") +
                         f"; it holds {have}; pick one of them or encode that exit")
    layer_, dim_, column = max(chosen, key=lambda e: e[1])
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard in manifest.get("shards") or []:
        file = root / str(shard.get("file"))
        if not file.is_file() or file_sha256(file) != shard.get("sha256"):
            raise ValueError(f"{file} is missing or differs from {MANIFEST_NAME} (SHA-256); resume the encode to "
                             "rewrite it")
        table = pq.read_table(file, columns=["id", column])
        ids += [str(i) for i in table.column("id").to_pylist()]
        values = table.column(column).combine_chunks()
        parts.append(np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim_))
    if not parts:
        raise ValueError(f"{path} lists no shards; the encode is empty or damaged")
    vectors = np.concatenate(parts)
    if len(ids) != int(manifest.get("rows", len(ids))):
        raise ValueError(f"{root}: the shards hold {len(ids)} rows, the manifest says {manifest.get('rows')}")
    return EncodedExit(ids, vectors, layer_, dim_, str(manifest.get("model")), manifest.get("pooling"))


def encoded_metadata(encoded: EncodedExit) -> dict[str, Any]:
    """What an index built from ``encoded`` records of its source."""
    return {"encoded_from": {"layer": encoded.layer, "dim": encoded.dim, "model": encoded.model,
                             "rows": len(encoded.ids)}}
