"""Every dataset read in matryoshka2d: STS sets, training files and sentence lists.

The files are read by :mod:`matryoshka2d.data.files` (formats: UTF-8 ``.tsv`` / ``.csv`` / ``.jsonl`` and
``.txt``; every error is a ``ValueError`` starting ``file:line:``). Scores keep their raw scale (0-5 for
STS-B, 1-5 for SICK-R): CoSENT and Spearman only use their order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matryoshka2d.data.files import (
    TABLE_SUFFIXES,
    Columns,
    decode_text,
    join_title,
    numbered_lines,
    parse_score,
    parse_text,
    pick_columns,
    read_table,
    select_columns,
)
from matryoshka2d.vocab import DataKind, StsVariant

logger = logging.getLogger(__name__)

__all__ = [  # TABLE_SUFFIXES is defined in data.files and re-exported here
    "KIND_COLUMNS", "NAMED_SETS", "NLI_FILES", "SCORE_NAMES", "STS_SETS", "STS_SPLITS", "TABLE_SUFFIXES",
    "ScoredPairs", "TrainingData", "load_sts", "load_training_data", "read_sentences", "resolve_data_dir",
    "sts_subsets",
]

STS_SETS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")
STS_SPLITS = {name: ("test",) for name in STS_SETS} | {"stsb": ("train", "dev", "test"),
                                                      "sickr": ("train", "dev", "test")}
NLI_FILES = {"train": "snli_dev_triplets.tsv", "dev": "snli_dev_triplets.tsv",
             "test": "snli_test_triplets.tsv"}
NAMED_SETS = (*STS_SETS, "nli")
KIND_COLUMNS: dict[str, tuple[str, ...]] = {
    "scored": ("sentence1", "sentence2", "score"),
    "pairs": ("anchor", "positive"),
    "triplets": ("anchor", "positive", "negative"),
}
SCORE_NAMES = ("score", "scores", "label", "labels", "similarity", "relatedness", "relatedness_score", "gold")
# <repo>/src/matryoshka2d/data/datasets.py -> <repo> (a checkout; for an installed package a folder that
# holds no data, which resolve_data_dir skips)
_SOURCE_ROOT = Path(__file__).resolve().parents[3]


# ----------------------------------------------------------------------------------- containers
@dataclass
class ScoredPairs:
    """An STS-style set: sentence pairs with gold similarity scores on their raw scale."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.sentences1, self.sentences2 = list(self.sentences1), list(self.sentences2)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = len(self.sentences1)
        if len(self.sentences2) != n or len(self.scores) != n:
            raise ValueError(f"ScoredPairs {self.name!r}: sentences1 ({n}), "
                             f"sentences2 ({len(self.sentences2)}) and scores ({len(self.scores)}) "
                             f"must have equal lengths")
        if n < 2:
            raise ValueError(f"ScoredPairs {self.name!r} has {n} pair(s); a correlation needs at least 2")
        if not np.isfinite(self.scores).all():
            raise ValueError(f"ScoredPairs {self.name!r}: scores contain NaN or inf; every score must be "
                             f"finite")

    def __len__(self) -> int:
        return len(self.sentences1)

    def unique_sentences(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Unique sentences in first-seen order (row by row), plus each side's index into that list."""
        index: dict[str, int] = {}
        for pair in zip(self.sentences1, self.sentences2, strict=True):
            for text in pair:
                index.setdefault(text, len(index))
        idx1 = np.fromiter((index[t] for t in self.sentences1), dtype=np.int64, count=len(self))
        idx2 = np.fromiter((index[t] for t in self.sentences2), dtype=np.int64, count=len(self))
        return list(index), idx1, idx2


@dataclass
class TrainingData:
    """Training examples as named text columns (in the order of ``KIND_COLUMNS[kind]``) plus raw scores."""

    name: str
    kind: DataKind
    columns: dict[str, list[str]]
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_COLUMNS:
            raise ValueError(f"kind {self.kind!r} is not one of {list(KIND_COLUMNS)}")
        expected = [c for c in KIND_COLUMNS[self.kind] if c != "score"]
        if list(self.columns) != expected:
            raise ValueError(f"TrainingData {self.name!r} of kind {self.kind!r} needs columns {expected}, "
                             f"got {list(self.columns)}")
        lengths = {len(v) for v in self.columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"TrainingData {self.name!r}: columns have different lengths {sorted(lengths)}")
        if self.kind == "scored":
            if self.scores is None:
                raise ValueError(f"TrainingData {self.name!r} of kind 'scored' needs scores")
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if len(self.scores) != len(self):
                raise ValueError(f"TrainingData {self.name!r}: {len(self.scores)} scores for {len(self)} "
                                 f"rows")
        elif self.scores is not None:
            raise ValueError(f"TrainingData {self.name!r} of kind {self.kind!r} takes no scores")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


# ----------------------------------------------------------------------------------- locating data
def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Find the data folder.

    Order: ``data_dir`` > ``$M2D_DATA_DIR`` > ``./data`` > ``../shared/data`` (from the working directory)
    > ``<repo root>/../shared/data`` (from this source file). The last three must hold a known set folder.

    Raises:
        FileNotFoundError: nothing found; the message lists every place looked at.
    """
    for explicit, what in ((data_dir, "data_dir"), (os.environ.get("M2D_DATA_DIR") or None, "$M2D_DATA_DIR")):
        if explicit is not None:
            path = Path(explicit).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"{what} {str(path)!r} is not a directory; point it at the folder "
                                        f"holding stsb/, sickr/, sts12/ ... nli/")
            return path
    candidates = [Path("data"), Path("..") / "shared" / "data", _SOURCE_ROOT.parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir() and any((path / name).is_dir() for name in NAMED_SETS):
            return path.resolve()
    looked = ", ".join(str(p.resolve()) for p in candidates)
    raise FileNotFoundError(f"no data folder found; looked at data_dir (not given), $M2D_DATA_DIR (not set), "
                            f"{looked}; pass --data-dir / data_dir= or set M2D_DATA_DIR")


# ----------------------------------------------------------------------------------- typed tables
def _detect_kind(path: Path, header: Sequence[str], columns: Sequence[str] | None) -> DataKind:
    if columns is None:
        for kind in ("scored", "triplets", "pairs"):
            if set(KIND_COLUMNS[kind]) <= set(header):
                return kind  # type: ignore[return-value]
        raise ValueError(f"{path}:1: cannot tell the data kind from columns {list(header)}; expected "
                         f"sentence1/sentence2/score, anchor/positive/negative or anchor/positive; set "
                         f"data.columns = [...] and data.kind in the training config (m2d train --set ...; columns= "
                         f"and kind= in Python)")
    if len(columns) == 2:
        return "pairs"
    if len(columns) == 3 and columns[2].lower() in SCORE_NAMES:
        return "scored"
    if len(columns) == 3 and columns[2].lower() in ("negative", "negatives", "neg", "hard_negative"):
        return "triplets"
    raise ValueError(f"{path}: cannot tell the kind of columns {list(columns)}; pass kind='scored' "
                     f"(text, text, score), 'pairs' (text, text) or 'triplets' (text, text, text); from the CLI "
                     f"that is data.kind in the training config (m2d train --set data.kind=scored)")


def _read_typed(path: Path, kind: DataKind | None, columns: Sequence[str] | None,
                limit: int | None) -> TrainingData:
    header, rows = read_table(path, limit)
    kind = kind or _detect_kind(path, header, columns)
    if kind not in KIND_COLUMNS:
        raise ValueError(f"kind {kind!r} is not one of {list(KIND_COLUMNS)}")
    canonical = KIND_COLUMNS[kind]
    wanted = list(columns) if columns is not None else list(canonical)
    if len(wanted) != len(canonical):
        raise ValueError(f"{path}: kind {kind!r} takes {len(canonical)} columns ({list(canonical)}), "
                         f"got {len(wanted)}: {wanted}")
    idx = select_columns(path, header, wanted, f"kind {kind!r}")
    text_names = [c for c in canonical if c != "score"]
    out: dict[str, list[str]] = {name: [] for name in text_names}
    scores: list[float] = []
    for line, fields in rows:
        for name, given, i in zip(canonical, wanted, idx, strict=True):
            if name == "score":
                scores.append(parse_score(path, line, given, fields[i]))
            else:
                out[name].append(parse_text(path, line, given, fields[i]))
    return TrainingData(name=path.stem, kind=kind, columns=out,
                        scores=np.asarray(scores, dtype=np.float64) if kind == "scored" else None)


# ----------------------------------------------------------------------------------- public loaders
def load_sts(name: str, split: str = "test", *, variant: StsVariant = "original",
             subset: str | None = None, data_dir: str | Path | None = None) -> ScoredPairs:
    """Load an STS evaluation set.

    Args:
        name: one of :data:`STS_SETS`.
        split: ``train`` / ``dev`` / ``test`` for stsb and sickr, ``test`` for sts12..sts16.
        variant: ``original`` text or SentEval's tokenised ``senteval_tok`` text (same pairs and scores).
        subset: one SemEval sub-corpus of sts12..sts16 (e.g. ``"MSRpar"``); ``None`` = the pooled set.
        data_dir: data folder (see :func:`resolve_data_dir`).

    Returns:
        The pairs; ``name`` is e.g. ``"stsb"``, ``"stsb-dev"`` or ``"sts12/MSRpar"``.

    Raises:
        ValueError: unknown set, split, variant or subset, or a malformed file.
    """
    if name not in STS_SETS:
        raise ValueError(f"unknown STS set {name!r}; known sets: {', '.join(STS_SETS)}")
    if split not in STS_SPLITS[name]:
        raise ValueError(f"{name} has no split {split!r}; valid splits: {', '.join(STS_SPLITS[name])}")
    if variant not in ("original", "senteval_tok"):
        raise ValueError(f"variant {variant!r} is not one of ['original', 'senteval_tok']")
    base = resolve_data_dir(data_dir)
    root = base / name
    path = (root / "senteval_tok" if variant == "senteval_tok" else root) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; the data folder {base} has no {name} {split} split "
                                f"({variant}); pass --data-dir / data_dir= or set M2D_DATA_DIR to a folder "
                                f"that has it")
    data = _read_typed(path, "scored", None, None)
    s1, s2, scores = data.columns["sentence1"], data.columns["sentence2"], data.scores
    label = name if split == "test" else f"{name}-{split}"
    if subset is not None:
        first, last = _subset_rows(root, name, subset, len(s1))
        s1, s2, scores = s1[first:last], s2[first:last], scores[first:last]  # type: ignore[index]
        label = f"{label}/{subset}"
    return ScoredPairs(label, s1, s2, scores)  # type: ignore[arg-type]


def sts_subsets(name: str, *, data_dir: str | Path | None = None) -> list[str]:
    """Sub-corpus names of ``name`` (empty for stsb / sickr, which have none)."""
    if name not in STS_SETS:
        raise ValueError(f"unknown STS set {name!r}; known sets: {', '.join(STS_SETS)}")
    path = resolve_data_dir(data_dir) / name / "subsets.tsv"
    return [str(fields[0]) for _, fields in read_table(path)[1]] if path.is_file() else []


def _subset_rows(root: Path, name: str, subset: str, n_rows: int) -> tuple[int, int]:
    path = root / "subsets.tsv"
    if not path.is_file():
        raise ValueError(f"{name} has no sub-corpora (no {path}); use subset=None")
    header, rows = read_table(path)
    idx = select_columns(path, header, ["subset", "first_row", "last_row"], "a subsets file")
    known = [str(f[idx[0]]) for _, f in rows]
    for line, fields in rows:
        if fields[idx[0]] == subset:
            first, last = (int(parse_score(path, line, c, fields[i]))
                           for c, i in zip(("first_row", "last_row"), idx[1:], strict=True))
            if not 1 <= first <= last <= n_rows:
                raise ValueError(f"{path}:{line}: rows {first}..{last} outside 1..{n_rows}")
            return first - 1, last
    raise ValueError(f"{name} has no subset {subset!r}; known subsets: {', '.join(known)}")


def load_training_data(source: str | Path, *, kind: DataKind | None = None, columns: Sequence[str] | None = None,
                       split: str = "train", data_dir: str | Path | None = None,
                       limit: int | None = None) -> TrainingData:
    """Load training examples from a named set or a .tsv / .csv / .jsonl file.

    Args:
        source: ``stsb`` / ``sickr`` (scored pairs of ``split``), ``nli`` (SNLI triplets: ``train`` and
            ``dev`` read ``nli/snli_dev_triplets.tsv``, the only NLI training data available; ``test`` reads
            ``nli/snli_test_triplets.tsv``), or a file path.
        kind: ``scored`` / ``pairs`` / ``triplets``; detected from the column names when not given.
        columns: column names to read, in canonical order (e.g. ``["s1", "s2", "label"]``).
        split: split of a named set.
        data_dir: data folder for named sets and relative paths not found from the working directory.
        limit: read only the first ``limit`` rows.

    Returns:
        The examples; scores stay on their raw scale (CoSENT only uses their order).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed content (``file:line: ...``) or inconsistent arguments.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit} must be >= 1 (or None for all rows)")
    path = Path(source)
    if isinstance(source, str) and source in NAMED_SETS and not path.is_file():
        if source == "nli":
            if split not in NLI_FILES:
                raise ValueError(f"nli has no split {split!r}; valid splits: {', '.join(NLI_FILES)}")
            data = _read_typed(resolve_data_dir(data_dir) / "nli" / NLI_FILES[split], kind, columns, limit)
        else:
            if split not in STS_SPLITS[source]:
                raise ValueError(f"{source} has no split {split!r}; valid splits: "
                                 f"{', '.join(STS_SPLITS[source])}")
            data = _read_typed(resolve_data_dir(data_dir) / source / f"{split}.tsv", kind, columns, limit)
        data.name = source if split == "train" else f"{source}-{split}"
        return data
    return _read_typed(_find_file(path, data_dir), kind, columns, limit)


def _find_file(path: Path, data_dir: str | Path | None) -> Path:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file; pass a .txt, .tsv, .csv or .jsonl file")
    if path.is_file() or path.is_absolute():
        return path
    try:
        alt = resolve_data_dir(data_dir) / path
    except FileNotFoundError:
        alt = None
    if alt is not None and alt.is_file():
        return alt
    raise FileNotFoundError(f"{path}: no such file (named sets are {', '.join(NAMED_SETS)})")


def read_sentences(path: str | Path, column: str | None = None, *,
                   data_dir: str | Path | None = None) -> list[str]:
    """Read sentences to encode.

    ``.txt``: one sentence per line, no header (an empty line is an empty sentence, so output rows stay
    aligned with input lines). ``.tsv`` / ``.csv`` / ``.jsonl``: ``column``, every value non-empty; by
    default the corpus readers' text column (:func:`~matryoshka2d.data.files.pick_columns`: ``text``, with
    ``title`` joined before it, else the first column that is not an id). An STS set name gives the unique
    sentences of its test split in first-seen order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed content (``file:line: ...``), an unknown column or no sentences at all.
    """
    if isinstance(path, str) and path in STS_SETS and not Path(path).is_file():
        if column is not None:
            raise ValueError(f"column {column!r} cannot be used with the named set {path!r}")
        return load_sts(path, data_dir=data_dir).unique_sentences()[0]
    file = _find_file(Path(path), data_dir)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    if file.suffix.lower() not in (".txt", *TABLE_SUFFIXES):
        raise ValueError(f"{file}: unsupported file type {file.suffix.lower()!r}; use one of "
                         f"{['.txt', *TABLE_SUFFIXES]}")
    if file.suffix.lower() == ".txt":
        if column is not None:
            raise ValueError(f"{file}: a .txt file has no columns; drop --column {column} (column= in Python)")
        sentences = [line for _, line in numbered_lines(decode_text(file))]
        if not sentences:
            raise ValueError(f"{file}:1: file is empty; expected one sentence per line")
        return sentences
    header, rows = read_table(file)
    cols = pick_columns(file, header) if column is None else Columns(None, column)  # the corpus readers' rule
    (i,) = select_columns(file, header, [cols.text], "the sentence column",
                          fix="pass --column NAME (column=NAME in Python) to pick the column")
    texts = [parse_text(file, line, cols.text, fields[i]) for line, fields in rows]
    if cols.title is None:
        return texts
    t = header.index(cols.title)
    return [join_title(str(fields[t] or ""), text) for (_, fields), text in zip(rows, texts, strict=True)]
