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

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")


def decode_text(path: Path) -> str:
    """Read ``path`` as UTF-8 text without a BOM; reject NUL bytes and invalid UTF-8 with file:line."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file; pass a file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ValueError(f"{path}:{line}: NUL byte in the file; it must be UTF-8 text "
                         f"(is it UTF-16 or binary?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         f"re-save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


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
        records = ((n, line.split("\t")) for n, line in numbered_lines(text) if line.strip() or "\t" in line)
    else:
        records = _jsonl_records(path, text)
    for number, fields in records:
        if header is None:
            header = [str(f).strip() for f in fields]
            if len(set(header)) != len(header) or any(not h for h in header):
                raise ValueError(f"{path}:{number}: header {header} has empty or repeated column names")
            continue
        if isinstance(fields, dict):
            if list(fields) != header and set(fields) != set(header):
                raise ValueError(f"{path}:{number}: keys {sorted(fields)} differ from the first object's "
                                 f"keys {sorted(header)}")
            fields = [fields[h] for h in header]
        elif len(fields) != len(header):
            shown = "\\t".join(map(str, fields)) if suffix == ".tsv" else fields
            raise ValueError(f"{path}:{number}: {len(fields)} fields, expected {len(header)} ({header}); "
                             f"row: {str(shown)[:200]!r}")
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
            if len(fields) > 1 or (fields and fields[0].strip()):  # skip blank lines only
                yield start, fields
            start = reader.line_num + 1  # type: ignore[attr-defined]
    except csv.Error as e:
        raise ValueError(f"{path}:{start}: malformed CSV ({e}); quote fields holding commas, quotes or "
                         f"newlines") from None


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, list | dict]]:
    first = True
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}); row: {line[:200]!r}") from None
        if not isinstance(obj, dict) or not obj:
            raise ValueError(f"{path}:{number}: expected a non-empty JSON object per line, got "
                             f"{line[:200]!r}")
        if first:
            yield number, list(obj)
            first = False
        yield number, obj


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
