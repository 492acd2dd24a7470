"""Reading data files: UTF-8 text, ``.tsv`` / ``.csv`` / ``.jsonl`` tables, and their text and score fields.

Files are UTF-8 (a BOM is stripped, CRLF accepted). ``.tsv`` has one header line and NO quoting (a field
is everything between tabs, so a literal ``"`` is plain text); ``.csv`` is standard quoted CSV with a
header; ``.jsonl`` is one JSON object per line. Blank lines in tables are skipped. A text field that is
empty or only whitespace is an error, as are NUL bytes, invalid UTF-8, rows with the wrong number of
fields and scores that are not finite numbers; every error is a ``ValueError`` starting ``file:line:``.
What the files hold (STS sets, training data, sentence lists) is :mod:`matryoshka2d.data.datasets`'s business.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")
ID_COLUMNS = ("id", "_id", "doc_id")  # a corpus's id column when none is named: the first of these it has


def decode_text(path: Path) -> str:
    """Read ``path`` as UTF-8 text without a BOM; reject NUL bytes and invalid UTF-8 with file:line."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file; pass a file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return decode_utf8(path, path.read_bytes()).removeprefix("\ufeff")


def decode_utf8(path: Path, raw: bytes, line: int = 1, *, unit: str = "file") -> str:
    """``raw`` (the whole file, or one ``unit`` of it starting at ``line``) as UTF-8 text.

    Raises:
        ValueError: ``file:line:`` for a NUL byte (UTF-16 or binary) or invalid UTF-8.
    """
    nul = raw.find(b"\x00")
    if nul >= 0:
        at = line + raw.count(b"\n", 0, nul)
        raise ValueError(f"{path}:{at}: NUL byte in the {unit}; it must be UTF-8 text (is it UTF-16 or binary?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + raw.count(b"\n", 0, e.start)
        raise ValueError(f"{path}:{at}: not valid UTF-8 ({e.reason} at byte {e.start} of the {unit}); re-save the "
                         "file as UTF-8") from None


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its ``\\n`` / ``\\r\\n``); no phantom line after a final newline."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    for number, line in enumerate(parts, 1):
        yield number, line.removesuffix("\r")


def read_table(path: Path, limit: int | None = None) -> tuple[list[str], list[tuple[int, list]]]:
    """Header and ``(line, fields)`` rows of a .tsv / .csv / .jsonl file (jsonl fields keep JSON types)."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {list(TABLE_SUFFIXES)}")
    text = decode_text(path)
    rows: list[tuple[int, list]] = []
    header: list[str] | None = None
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        records: Iterator[tuple[int, list | dict]] = _csv_records(path, reader)
    elif suffix == ".tsv":
        records = ((n, f) for n, f in ((n, line.split("\t")) for n, line in numbered_lines(text))
                   if not is_blank(".tsv", f))
    else:
        records = _jsonl_records(path, text)
    for number, fields in records:
        if header is None:
            header = check_header(path, number, fields)
            continue
        if isinstance(fields, dict):
            if list(fields) != header and set(fields) != set(header):
                raise ValueError(f"{path}:{number}: keys {sorted(fields)} differ from the first object's "
                                 f"keys {sorted(header)}")
            fields = [fields[h] for h in header]
        else:
            check_width(path, number, fields, header)
        rows.append((number, fields))
        if limit is not None and len(rows) >= limit:
            break
    if header is None:
        raise ValueError(f"{path}:1: file is empty; expected a header line and data rows")
    if not rows:
        raise ValueError(f"{path}:2: no data rows after the header {header}")
    return header, rows


def _csv_records(path: Path, reader: Iterator[list[str]]) -> Iterator[tuple[int, list]]:
    start = 1
    try:
        for fields in reader:
            if not is_blank(".csv", fields):
                yield start, fields
            start = reader.line_num + 1  # type: ignore[attr-defined]
    except csv.Error as e:
        raise csv_error(path, start, e) from None


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, list | dict]]:
    first = True
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        obj = parse_json_object(path, number, line)
        if first:
            yield number, list(obj)
            first = False
        yield number, obj


def check_header(path: Path, line: int, fields: Sequence[object]) -> list[str]:
    """The column names of a header record; an error for an empty or repeated name."""
    header = [str(f).strip() for f in fields]
    if len(set(header)) != len(header) or any(not h for h in header):
        raise ValueError(f"{path}:{line}: header {header} has empty or repeated column names")
    return header


def check_width(path: Path, line: int, fields: Sequence[object], header: Sequence[str]) -> None:
    """An error unless the row has one field per header column (a TSV row is shown with its tabs)."""
    if len(fields) != len(header):
        shown = "\\t".join(map(str, fields)) if path.suffix.lower() == ".tsv" else fields
        raise ValueError(f"{path}:{line}: {len(fields)} fields, expected {len(header)} ({list(header)}); "
                         f"row: {str(shown)[:200]!r}")


def csv_error(path: Path, line: int, error: csv.Error) -> ValueError:
    """The error for a malformed CSV record starting at ``line``."""
    return ValueError(f"{path}:{line}: malformed CSV ({error}); quote fields holding commas, quotes or newlines")


def parse_json_object(path: Path, line: int, text: str) -> dict:
    """The non-empty JSON object on one ``.jsonl`` line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line}: invalid JSON ({e.msg}); row: {text[:200]!r}") from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}:{line}: expected a non-empty JSON object per line, got {text[:200]!r}")
    return obj


def is_blank(suffix: str, fields: Sequence[str]) -> bool:
    """Whether a split ``.tsv`` / ``.csv`` record is a blank line, which tables skip."""
    if suffix == ".tsv":
        return len(fields) == 1 and not fields[0].strip()
    return not (len(fields) > 1 or (fields and fields[0].strip()))


def parse_text(path: Path, line: int, column: str, value: object) -> str:
    """The text ``value`` of ``column`` at ``path:line``; an error unless it is a non-blank string."""
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line}: column {column!r} must be text, got {value!r}")
    if not value.strip():
        raise ValueError(f"{path}:{line}: empty {column!r} field; every sentence must be non-empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a JSON "\ud800" escape: the tokenizer would fail with a TypeError
            raise ValueError(f"{path}:{line}: column {column!r} holds {value[e.start]!r} at position {e.start}, a "
                             "lone surrogate that is not valid Unicode; fix that line of the file") from None
    return value


def parse_score(path: Path, line: int, column: str, value: object) -> float:
    """The finite number ``value`` of ``column`` at ``path:line``; an error names the place and the value."""
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError
        score = float(value)
    except (TypeError, ValueError, OverflowError):
        score = math.nan
    if not math.isfinite(score):
        raise ValueError(f"{path}:{line}: {column!r} value {value!r} is not a finite number")
    return score


COLUMNS_FIX = ("pick columns by name: --column NAME (m2d encode, m2d bench), data.columns = [...] in the training "
               "config (m2d train --set 'data.columns=[\"a\",\"b\",\"score\"]'), columns=[...] in Python")


def select_columns(path: Path, header: list[str], wanted: Sequence[str], expected_what: str,
                   fix: str = COLUMNS_FIX) -> list[int]:
    """Indices of the ``wanted`` columns in ``header``; an error names the missing ones and what they are for.

    Args:
        path: the file (for the message).
        header: its column names.
        wanted: the columns to find.
        expected_what: what they are for (for the message).
        fix: how the user picks other columns (CLI flags first).

    Raises:
        ValueError: a wanted column is missing.
    """
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing}; found {header}, expected {list(wanted)} "
                         f"({expected_what}); {fix}")
    return [header.index(c) for c in wanted]


class Columns(NamedTuple):
    """The columns one file's records are read from (``title`` is joined before ``text`` when present)."""

    id: str | None
    text: str
    title: str | None = None


def join_title(title: str, text: str) -> str:
    """A document's text with its title before it (BEIR's corpora), ``title + " " + text`` stripped."""
    return f"{title} {text}".strip()


def pick_columns(path: Path, columns: Sequence[str], id_column: str | None = None,
                 text_column: str | None = None) -> Columns:
    """The id, text and title columns of a corpus file with header ``columns``, the same for every reader.

    Unless named, the id is the first of :data:`ID_COLUMNS` the file has (none: the caller numbers the rows)
    and the text is ``text`` (with ``title`` joined before it when the file has one, as BEIR corpora do),
    else the first column that is not the id.

    Raises:
        ValueError: a named column the file lacks.
    """
    missing = [c for c in (id_column, text_column) if c is not None and c not in columns]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing}; found {list(columns)}; pass --id-column/"
                         f"--text-column with one of these")
    ident = id_column or next((c for c in ID_COLUMNS if c in columns), None)
    if text_column is not None:
        return Columns(ident, text_column)
    if "text" in columns:
        return Columns(ident, "text", "title" if "title" in columns else None)
    return Columns(ident, next((c for c in columns if c != ident), columns[0]))
