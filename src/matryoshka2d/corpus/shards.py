"""Exits, output formats and Parquet shards: what one shard of a corpus encode is and how it is written.

A shard holds a fixed run of consecutive records (``shard_size``, the last one fewer): an ``id`` string
column plus one fixed-size-list column per exit, named ``layer{L}_dim{D}``. Its values are

- ``float32`` / ``float16``: the embedding (L2-normalised after the truncation to ``D`` unless ``normalize``
  is off);
- ``int8``: ``round(127 * x)`` of the normalised embedding (so ``x ~ q / 127``; needs ``normalize``);
- ``binary``: the sign bits ``x > 0`` packed 8 per byte, big-endian as :func:`numpy.packbits` does,
  ``ceil(D / 8)`` bytes (the last byte zero-padded).

All exits of a shard come from ONE backbone pass per batch (:func:`~matryoshka2d.encoder.batching.embed_layers`
stops after the deepest layer; a shallow exit is a prefix of it). A shard file is written through a
temporary sibling and renamed (:func:`~matryoshka2d.io.atomic.atomic_open`), so it is complete or absent.
After each shard the C heap's free pages go back to the OS
(:func:`~matryoshka2d.encoder.memory.release_free_memory`), so the memory a long run holds stays that of one
shard (docs/encoding.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka2d.corpus.readers import CorpusReader, Position, ScanStats, require_pyarrow, take
from matryoshka2d.encoder.batching import MultiExitModel, embed_layers
from matryoshka2d.encoder.memory import release_free_memory
from matryoshka2d.encoder.tokenization import TOKENIZE_CHUNK
from matryoshka2d.io.atomic import atomic_open
from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import STORAGE_FORMATS, InputType, StorageFormat

logger = logging.getLogger(__name__)

INT8_SCALE = 127
SHARD_DIR = "shards"


@dataclass(frozen=True, order=True)
class Exit:
    """One exit: the output of block ``layer``, truncated to its first ``dim`` coordinates."""

    layer: int
    dim: int

    @property
    def column(self) -> str:
        """The Parquet column of this exit."""
        return f"layer{self.layer}_dim{self.dim}"


def parse_exits(text: str, model: MultiExitModel) -> list[Exit]:
    """Parse ``"3:128,6:384"`` (``L:D``; a bare ``L`` keeps the full width) and check it against ``model``.

    Raises:
        ValueError: a malformed item, a layer or dim out of range, or the same exit twice.
    """
    exits: list[Exit] = []
    for item in str(text).split(","):
        item = item.strip()
        layer_text, _, dim_text = item.partition(":")
        try:
            layer = int(layer_text)
            dim = int(dim_text) if dim_text else None
        except ValueError:
            raise ValueError(f"--exits item {item!r} is not LAYER:DIM; pass e.g. 3:128,6:384") from None
        exit_ = Exit(model.check_layer(layer), model.check_dim(dim))
        if exit_ in exits:
            raise ValueError(f"--exits names {exit_.layer}:{exit_.dim} twice; give each exit once")
        exits.append(exit_)
    return exits


def check_format(fmt: str, normalize: bool) -> StorageFormat:
    """``fmt`` if it is one of :data:`STORAGE_FORMATS` and fits ``normalize``.

    Raises:
        ValueError: an unknown format, or ``int8`` without normalisation (its fixed scale needs |x| <= 1).
    """
    if fmt not in STORAGE_FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {list(STORAGE_FORMATS)}")
    if fmt == "int8" and not normalize:
        raise ValueError("--format int8 quantises normalised vectors (q = round(127 x)); drop --no-normalize")
    return fmt  # type: ignore[return-value]


def embed_exits(model: MultiExitModel, texts: Sequence[str], exits: Sequence[Exit], *, normalize: bool = True,
                batch_size: int = 64, progress: Callable[[int], None] | None = None,
                input_type: InputType = "document") -> dict[Exit, np.ndarray]:
    """float32 embeddings of ``texts`` at every exit, all from one backbone pass per batch.

    The texts go to :func:`embed_layers` in the chunks its tokenizer loop uses, so the batches (and the
    vectors) are the ones ``model.encode(texts, layer=L, dim=D)`` gives; ``progress(n)`` is called after
    each batch of ``n`` texts (so a bar moves every few seconds, not once per chunk). ``input_type="query"``
    takes the own query path of exits that have one.
    """
    layers = sorted({e.layer for e in exits})
    chunk = batch_size * max(1, TOKENIZE_CHUNK // batch_size)
    out = {e: np.empty((len(texts), e.dim), dtype=np.float32) for e in exits}
    for first in range(0, len(texts), chunk):
        part = list(texts[first : first + chunk])
        full = embed_layers(model, part, layers, normalize=False, batch_size=batch_size, show_progress_bar=False,
                            progress=progress, input_type=input_type)
        for e in exits:
            emb = torch.from_numpy(full[e.layer])[:, : e.dim]
            out[e][first : first + len(part)] = (truncate(emb) if normalize else emb).numpy()
    return out


def vector_column(vectors: np.ndarray, fmt: StorageFormat) -> Any:
    """A ``pyarrow.FixedSizeListArray`` of ``vectors`` (float32 rows) in ``fmt``."""
    require_pyarrow()
    import pyarrow as pa

    if fmt == "float32":
        values = vectors.astype(np.float32, copy=False)
    elif fmt == "float16":
        values = vectors.astype(np.float16)
    elif fmt == "int8":
        values = np.clip(np.rint(vectors * INT8_SCALE), -INT8_SCALE, INT8_SCALE).astype(np.int8)
    else:
        values = np.packbits(vectors > 0, axis=1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def list_size(exit_: Exit, fmt: StorageFormat) -> int:
    """Values per row of ``exit_``'s column in ``fmt``."""
    return -(-exit_.dim // 8) if fmt == "binary" else exit_.dim


def value_type(fmt: StorageFormat) -> str:
    """The Arrow value type of a column in ``fmt``."""
    return {"float32": "float", "float16": "halffloat", "int8": "int8", "binary": "uint8"}[fmt]


def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of a list of ids (length-prefixed, so no two lists share a digest by concatenation)."""
    h = hashlib.sha256()
    for rid in ids:
        b = rid.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardSpec:
    """What one shard holds: ``rows`` records from ``start``, with these ids (digest, first, last)."""

    index: int
    start: Position
    rows: int
    ids_sha256: str
    first_id: str
    last_id: str

    @property
    def file(self) -> str:
        """The shard's path relative to the output folder."""
        return f"{SHARD_DIR}/part-{self.index:05d}.parquet"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see :meth:`from_dict`)."""
        d = asdict(self)
        d["start"] = self.start.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["index"]), Position.from_dict(data["start"]), int(data["rows"]), str(data["ids_sha256"]),
                   str(data["first_id"]), str(data["last_id"]))


def plan_shards(reader: CorpusReader, shard_size: int) -> tuple[list[ShardSpec], ScanStats]:
    """Read the whole corpus once, checking every record, and cut it into shards of ``shard_size`` records.

    Memory holds the set of ids seen (to reject duplicates), not the texts.

    Raises:
        ValueError: any bad record (``file:line: ...``), a duplicate id, or no texts at all.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size {shard_size!r} must be a positive integer; pass e.g. 100000")
    stats = ScanStats()
    seen: set[str] = set()
    specs: list[ShardSpec] = []
    start: Position | None = None
    h = hashlib.sha256()
    count, first_id, last_id = 0, "", ""
    for record in reader.records(stats=stats):
        if record.id in seen:
            raise ValueError(f"{reader.files[record.position.source]}:{record.position.line}: duplicate id "
                             f"{record.id!r} (an earlier row has it); ids must be unique: pick a unique "
                             "--id-column, or drop --id-column to number rows by line")
        seen.add(record.id)
        if start is None:
            start, h, count, first_id = record.position, hashlib.sha256(), 0, record.id
        b = record.id.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        count, last_id = count + 1, record.id
        if count == shard_size:
            specs.append(ShardSpec(len(specs), start, count, h.hexdigest(), first_id, last_id))
            start = None
    if start is not None:
        specs.append(ShardSpec(len(specs), start, count, h.hexdigest(), first_id, last_id))
    if not specs:
        raise ValueError(f"no texts in {[str(f) for f in reader.files]}"
                         + (f" ({stats.skipped_empty} empty ones skipped)" if stats.skipped_empty else ""))
    return specs, stats


def encode_shard(model: MultiExitModel, reader: CorpusReader, spec: ShardSpec, exits: Sequence[Exit],
                 output: str | Path, *, fmt: StorageFormat = "float32", normalize: bool = True, batch_size: int = 64,
                 progress: Callable[[int], None] | None = None, release_memory: bool = True,
                 input_type: InputType = "document") -> Path:
    """Read shard ``spec`` from the corpus, embed it at every exit and write it atomically under ``output``.

    ``progress(n)`` is called after each batch of ``n`` texts. With ``release_memory`` the C heap's free pages
    go back to the OS once the shard is written (:func:`~matryoshka2d.encoder.memory.release_free_memory`).

    Raises:
        ValueError: the records at ``spec.start`` are not the ones planned (the input changed meanwhile).
    """
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = take(reader.records(spec.start), spec.rows)
    ids = [r.id for r in records]
    if len(ids) != spec.rows or ids_digest(ids) != spec.ids_sha256:
        raise ValueError(f"shard {spec.index}: the input at {reader.files[spec.start.source]}:{spec.start.line} "
                         "no longer holds the planned records; the input changed during the run, rerun it")
    vectors = embed_exits(model, [r.text for r in records], exits, normalize=normalize, batch_size=batch_size,
                          progress=progress, input_type=input_type)
    columns = {"id": pa.array(ids, type=pa.string())}
    for e in exits:
        columns[e.column] = vector_column(vectors[e], fmt)
    path = Path(output) / spec.file
    with atomic_open(path, "wb") as f:
        pq.write_table(pa.table(columns), f)
    del vectors, columns, records
    if release_memory:
        release_free_memory()
    return path


def shard_is_done(output: str | Path, spec: ShardSpec, exits: Sequence[Exit]) -> bool:
    """Whether ``spec``'s file exists (a finished shard: files are renamed into place) and fits the plan.

    Raises:
        ValueError: the file exists but holds other ids or columns (the input changed since it was written).
    """
    path = Path(output) / spec.file
    if not path.is_file():
        return False
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["id"])
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ValueError(f"{path} is not a readable shard ({e}); delete it and rerun to write it again") from None
    ids = table.column("id").to_pylist()
    if names != ["id", *(e.column for e in exits)] or len(ids) != spec.rows or ids_digest(ids) != spec.ids_sha256:
        raise ValueError(f"{path} holds other ids or columns than the input gives now (the input changed since "
                         "it was written); use a new --output, or --overwrite to start over")
    return True


