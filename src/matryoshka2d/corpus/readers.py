"""Streaming corpus readers: ``.txt`` / ``.tsv`` / ``.csv`` / ``.jsonl`` / ``.parquet`` files, globs and folders.

Records are read one at a time (text files line by line from a byte offset, Parquet by row group), so memory
does not grow with the corpus. Every record knows its :class:`Position`, so a shard can be re-read later
from where it starts, in another process or on another machine. The file rules are those of
:mod:`matryoshka2d.data.files` (UTF-8, a BOM stripped, CRLF accepted, ``.tsv`` has one header and no quoting,
``.csv`` is quoted CSV with a header, ``.jsonl`` one object per line, blank lines skipped), checked per line
instead of per file; every error is a ``ValueError`` starting ``file:line:`` (for Parquet, the 1-based row).

The columns, unless named, are :func:`~matryoshka2d.data.files.pick_columns`'s: the id is ``id`` (or BEIR's
``_id`` / ``doc_id``); without one, ids are line numbers: ``"7"`` for line 7 of a single input file,
``"sub/b.tsv:7"`` (the path relative to the inputs' common folder) when there are several. The text is
``text`` (``title + " " + text`` with a title column, as in BEIR corpora), else the first column that is not
the id. ``m2d encode`` and ``m2d index`` read corpora with these same defaults. An empty or whitespace-only text is an
error unless ``skip_empty`` is set; skipped rows are counted in :class:`ScanStats` and the manifest.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from matryoshka2d.data.files import (
    TABLE_SUFFIXES,
    Columns,
    check_header,
    check_width,
    csv_error,
    decode_utf8,
    is_blank,
    join_title,
    parse_json_object,
    pick_columns,
)
from matryoshka2d.vocab import install_hint

logger = logging.getLogger(__name__)

Kind = Literal["txt", "tsv", "csv", "jsonl", "parquet"]
SUFFIXES: tuple[str, ...] = (".txt", *TABLE_SUFFIXES, ".parquet")  # data/files' tables, plain text, Parquet
PARQUET_BATCH = 4096  # rows per Arrow batch when streaming a Parquet file


@dataclass(frozen=True)
class Position:
    """Where a record starts: input file number, byte offset (Parquet: 0-based row) and line (Parquet: row + 1)."""

    source: int
    offset: int
    line: int

    def to_dict(self) -> dict[str, int]:
        """JSON-ready form (see :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Position:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["source"]), int(data["offset"]), int(data["line"]))


class Record(NamedTuple):
    """One text of the corpus with its id and where it was read."""

    id: str
    text: str
    position: Position


@dataclass
class ScanStats:
    """Counts kept while reading: records yielded and empty texts skipped."""

    rows: int = 0
    skipped_empty: int = 0


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The corpus files named by ``inputs``: files, globs (``data/*.tsv``, ``**`` allowed) and folders.

    A folder gives every file with a supported suffix below it (hidden ones excluded), sorted by path.
    A file named twice is read once.

    Raises:
        FileNotFoundError: an input that names nothing, or a folder / glob without corpus files.
        ValueError: a file with an unsupported suffix, or no inputs.
    """
    if not inputs:
        raise ValueError("no input given; pass --input FILE, a glob or a folder")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not found:
                raise FileNotFoundError(f"{path}: the folder holds no corpus files ({', '.join(SUFFIXES)})")
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(SUFFIXES)}")
            found = [path]
        elif glob.has_magic(str(item)):
            found = sorted(Path(f) for f in glob.glob(str(item), recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{item}: the glob matches no corpus files ({', '.join(SUFFIXES)})")
        else:
            raise FileNotFoundError(f"{item}: no such file, folder or glob match")
        files.extend(found)
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    if len(unique) < len(files):
        logger.warning("%d input files were named more than once; each is read once", len(files) - len(unique))
    return list(unique.values())


@dataclass(frozen=True)
class _Header:
    columns: list[str]
    data_offset: int
    data_line: int


class CorpusReader:
    """Stream ``(id, text)`` records from corpus files, checked as they are read.

    Args:
        files: the input files (see :func:`resolve_inputs`), read in this order.
        id_column: column holding unique ids; ``None``: ``id`` (or ``_id`` / ``doc_id``) when the file has
            it, else line numbers.
        text_column: column holding the text; ``None``: ``text`` (``title`` joined before it when the file
            has one), else the first column that is not the id.
        skip_empty: skip (and count) empty texts instead of raising.

    Raises:
        ValueError: a column given for a ``.txt`` file, or an unsupported file type.
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], *, id_column: str | None = None,
                 text_column: str | None = None, skip_empty: bool = False) -> None:
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("no input files; pass --input FILE, a glob or a folder")
        self.kinds: list[Kind] = []
        for f in self.files:
            suffix = f.suffix.lower()
            if suffix not in SUFFIXES:
                raise ValueError(f"{f}: unsupported file type {suffix!r}; use one of {list(SUFFIXES)}")
            kind: Kind = suffix[1:]  # type: ignore[assignment]
            if kind == "txt" and (id_column or text_column):
                raise ValueError(f"{f}: a .txt file has one text per line and no columns; drop --id-column/"
                                 f"--text-column, or give the corpus as .tsv/.csv/.jsonl/.parquet")
            self.kinds.append(kind)
        self.id_column, self.text_column, self.skip_empty = id_column, text_column, skip_empty
        self._headers: dict[int, _Header] = {}

    @cached_property
    def labels(self) -> list[str]:
        """How each file is named in line-number ids: nothing for one file, else its path under the common folder."""
        if len(self.files) == 1:
            return [""]
        resolved = [f.resolve() for f in self.files]
        root = Path(os.path.commonpath([p.parent for p in resolved]))
        return [p.relative_to(root).as_posix() for p in resolved]

    # ------------------------------------------------------------------ iteration
    def records(self, start: Position | None = None, stats: ScanStats | None = None) -> Iterator[Record]:
        """Every record from ``start`` (the first record by default) to the end of the last file.

        Raises:
            ValueError: malformed content, invalid UTF-8, a missing column or an empty text (``file:line: ...``).
        """
        first = start.source if start is not None else 0
        for i in range(first, len(self.files)):
            at = start if start is not None and i == start.source else None
            for record in self._source(i, at):
                if not record.text.strip():
                    if not self.skip_empty:
                        raise ValueError(f"{self.files[i]}:{record.position.line}: empty text; every text must "
                                         "be non-empty (pass --skip-empty to skip and count such rows)")
                    if stats is not None:
                        stats.skipped_empty += 1
                    continue
                if stats is not None:
                    stats.rows += 1
                yield record

    def _source(self, i: int, start: Position | None) -> Iterator[Record]:
        kind = self.kinds[i]
        if kind == "parquet":
            yield from self._parquet(i, 0 if start is None else start.offset)
            return
        if kind == "txt":
            offset, line = (0, 1) if start is None else (start.offset, start.line)
            for at, number, raw in _lines(self.files[i], offset, line):
                text = self._decode(i, number, raw, first=at == 0)
                yield Record(self._line_id(i, number), text, Position(i, at, number))
            return
        header = self._header(i)
        offset, line = (header.data_offset, header.data_line) if start is None else (start.offset, start.line)
        cols = self._columns(i, header.columns)
        for at, number, fields in self._rows(i, offset, line):
            if isinstance(fields, dict):
                missing = [c for c in (cols.id, cols.text) if c and c not in fields]
                if missing:
                    raise ValueError(f"{self.files[i]}:{number}: object lacks key(s) {missing}; every line needs "
                                     f"the id and text keys")
                row = fields
            else:
                check_width(self.files[i], number, fields, header.columns)
                row = dict(zip(header.columns, fields, strict=True))
            yield Record(self._id(i, number, row, cols), self._record_text(i, number, row, cols),
                         Position(i, at, number))

    def _rows(self, i: int, offset: int, line: int) -> Iterator[tuple[int, int, list | dict]]:
        path, kind = self.files[i], self.kinds[i]
        if kind == "tsv":
            for at, number, raw in _lines(path, offset, line):
                text = self._decode(i, number, raw, first=at == 0)
                fields = text.split("\t")
                if not is_blank(".tsv", fields):
                    yield at, number, fields
        elif kind == "jsonl":
            for at, number, raw in _lines(path, offset, line):
                text = self._decode(i, number, raw, first=at == 0)
                if text.strip():
                    yield at, number, parse_json_object(self.files[i], number, text)
        else:
            yield from self._csv(i, offset, line)

    def _csv(self, i: int, offset: int, line: int) -> Iterator[tuple[int, int, list]]:
        """CSV records with the byte offset and line where each starts (a quoted field may span lines)."""
        state = {"offset": offset, "line": line}

        def decoded() -> Iterator[str]:
            for at, number, raw in _lines(self.files[i], offset, line):
                text = self._decode(i, number, raw, first=at == 0, keep_newline=True)
                state["offset"], state["line"] = at + len(raw), number + 1
                yield text

        reader = csv.reader(decoded(), strict=True)
        while True:
            at, number = state["offset"], state["line"]
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise csv_error(self.files[i], number, e) from None
            if not is_blank(".csv", fields):
                yield at, number, fields

    def _header(self, i: int) -> _Header:
        if i not in self._headers:
            path = self.files[i]
            for at, number, fields in self._rows(i, 0, 1):
                columns = check_header(path, number, list(fields))
                if isinstance(fields, dict):  # jsonl: the first object's keys; its line is data too
                    data_offset, data_line = at, number
                else:
                    data_offset, data_line = self._after(i, at, number)
                self._headers[i] = _Header(columns, data_offset, data_line)
                break
            else:
                raise ValueError(f"{path}:1: file is empty; expected a header line and data rows")
        return self._headers[i]

    def _after(self, i: int, at: int, number: int) -> tuple[int, int]:
        """Offset and line just after the header record that starts at ``at``."""
        rows = self._rows(i, at, number)
        next(rows)
        if self.kinds[i] == "csv":  # the csv reader may span lines: read where the next record starts
            for nxt_at, nxt_line, _ in rows:
                return nxt_at, nxt_line
        else:
            for nxt_at, nxt_line, _raw in _lines(self.files[i], at, number):
                if nxt_at > at:
                    return nxt_at, nxt_line
        return os.path.getsize(self.files[i]), number + 1

    def _columns(self, i: int, columns: list[str]) -> Columns:
        return pick_columns(self.files[i], columns, self.id_column, self.text_column)

    # ------------------------------------------------------------------ parquet
    def _parquet(self, i: int, offset: int) -> Iterator[Record]:
        require_pyarrow()
        import pyarrow.parquet as pq

        path = self.files[i]
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        cols = self._columns(i, pf.schema_arrow.names)
        wanted = [c for c in cols if c is not None]
        group, first_row = 0, 0
        while group < pf.num_row_groups and first_row + pf.metadata.row_group(group).num_rows <= offset:
            first_row += pf.metadata.row_group(group).num_rows
            group += 1
        row = first_row
        groups = list(range(group, pf.num_row_groups))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups, columns=wanted):
            for k, values in enumerate(batch.to_pylist()):
                if row + k < offset:
                    continue
                number = row + k + 1
                yield Record(self._id(i, number, values, cols), self._record_text(i, number, values, cols),
                             Position(i, row + k, number))
            row += batch.num_rows

    # ------------------------------------------------------------------ fields
    def _decode(self, i: int, number: int, raw: bytes, *, first: bool, keep_newline: bool = False) -> str:
        text = decode_utf8(self.files[i], raw, number, unit="line")
        if first:
            text = text.removeprefix("\ufeff")
        return text if keep_newline else text.removesuffix("\n").removesuffix("\r")

    def _record_text(self, i: int, number: int, row: dict[str, Any], cols: Columns) -> str:
        text = self._text(i, number, row.get(cols.text))
        if cols.title is None:
            return text
        return join_title(self._text(i, number, row.get(cols.title)), text)

    def _text(self, i: int, number: int, value: object) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"{self.files[i]}:{number}: the text must be a string, got {value!r:.80}")
        return value

    def _id(self, i: int, number: int, row: dict[str, Any], cols: Columns) -> str:
        if cols.id is None:
            return self._line_id(i, number)
        value = row.get(cols.id)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"{self.files[i]}:{number}: id {value!r:.80} in column {cols.id!r} must be a "
                             f"string or an integer")
        rid = str(value)
        if not rid.strip():
            raise ValueError(f"{self.files[i]}:{number}: empty id in column {cols.id!r}; every row needs one")
        return rid

    def _line_id(self, i: int, number: int) -> str:
        label = self.labels[i]
        return f"{label}:{number}" if label else str(number)


def read_corpus(path: str | os.PathLike[str], *, skip_empty: bool = False) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of one corpus file (what ``m2d index`` indexes); an empty text is an error, or skipped.

    Raises:
        ValueError: the reader's ``file:line:`` errors.
    """
    records = list(CorpusReader([path], skip_empty=skip_empty).records())
    return [r.id for r in records], [r.text for r in records]


def require_pyarrow() -> None:
    """Raise a clear ``ImportError`` when pyarrow (the ``corpus`` extra) is missing."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(f"corpus encoding needs pyarrow: {install_hint('corpus')}") from None


def _lines(path: Path, offset: int, line: int) -> Iterator[tuple[int, int, bytes]]:
    """``(byte offset, line number, raw line with its newline)`` from ``offset``; the file is read lazily."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            yield offset, line, raw
            offset += len(raw)
            line += 1


def take(records: Iterable[Record], n: int) -> list[Record]:
    """The first ``n`` records of ``records`` (fewer at the end)."""
    out = []
    for record in records:
        out.append(record)
        if len(out) == n:
            break
    return out
