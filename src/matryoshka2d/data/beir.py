"""BEIR-style retrieval sets: a corpus, queries and graded relevance judgements (qrels) per split.

A BEIR folder holds ``corpus.tsv`` (``doc_id, title, text``), ``queries.tsv`` (``query_id, text``; the
queries of every split) and ``qrels/<split>.tsv`` (``query_id, doc_id, score``). Files are read by
:mod:`matryoshka2d.data.files` (UTF-8, one header, NO quoting; ``.jsonl`` with BEIR's own keys ``_id`` /
``query-id`` / ``corpus-id`` works too), so every error starts ``file:line:``. IDs are always strings.

The evaluation protocol is BEIR's / MTEB's: a document's text is ``(title + " " + text).strip()``, only the
queries of the split's qrels are searched, and they are searched over the full corpus.

Two data problems are handled, not hidden:

* a qrels row whose ``doc_id`` is not in the corpus: ``missing_docs="keep"`` (the default, what BEIR and
  pytrec_eval do) keeps it as a relevant document that can never be retrieved, so it lowers recall and
  nDCG; ``"drop"`` removes the row; ``"error"`` raises. Either way the rows are logged (file:line of the
  first) and listed in :attr:`BeirSet.missing_docs`.
* a query with no relevant document (every qrels score ``<= 0``, or all its relevant rows dropped) cannot
  be scored (nDCG and recall are 0 / 0); it is left out of :attr:`BeirSet.query_ids` and listed in
  :attr:`BeirSet.dropped_queries`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from matryoshka2d.data.datasets import TrainingData, resolve_data_dir
from matryoshka2d.data.files import join_title, parse_score, parse_text, read_table

logger = logging.getLogger(__name__)

__all__ = ["BEIR_SETS", "BEIR_SPLITS", "BeirSet", "MissingDocs", "find_beir_file", "is_beir_source", "load_beir",
           "load_beir_pairs", "read_corpus", "read_qrels", "read_queries", "resolve_beir_dir"]

BEIR_SETS = ("scifact", "nfcorpus")
BEIR_SPLITS = ("train", "dev", "test")
MissingDocs = Literal["keep", "drop", "error"]
# canonical column -> accepted names (ours first, then BEIR's jsonl keys)
_ALIASES = {"doc_id": ("doc_id", "_id", "corpus-id", "corpus_id"), "query_id": ("query_id", "_id", "query-id"),
            "title": ("title",), "text": ("text",), "score": ("score",)}


@dataclass
class BeirSet:
    """One split of a retrieval set, ready to evaluate.

    Attributes:
        name: e.g. ``"scifact"`` (``"scifact-dev"`` for a split other than test).
        doc_ids: corpus ids in file order.
        doc_texts: ``(title + " " + text).strip()`` per document.
        query_ids: the evaluated queries (in the split's qrels, with at least one relevant document), in
            first-seen qrels order.
        query_texts: their texts.
        qrels: ``{query_id: {doc_id: grade}}`` of the evaluated queries (grades > 0 only are relevant;
            with ``missing_docs="keep"`` it may name documents not in the corpus).
        split: the qrels split.
        missing_docs: ``(query_id, doc_id)`` qrels rows whose document is not in the corpus.
        dropped_queries: qrels queries left out because they have no relevant document.
    """

    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"
    missing_docs: list[tuple[str, str]] = field(default_factory=list)
    dropped_queries: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.doc_ids) != len(self.doc_texts) or not self.doc_ids:
            raise ValueError(f"BeirSet {self.name!r}: {len(self.doc_ids)} doc ids for {len(self.doc_texts)} "
                             f"texts; the corpus must be non-empty and aligned")
        if len(self.query_ids) != len(self.query_texts) or not self.query_ids:
            raise ValueError(f"BeirSet {self.name!r}: {len(self.query_ids)} query ids for "
                             f"{len(self.query_texts)} texts; at least one query with a relevant document "
                             f"is needed")
        if set(self.query_ids) != set(self.qrels):
            raise ValueError(f"BeirSet {self.name!r}: qrels must cover exactly the evaluated queries")

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)


# ----------------------------------------------------------------------------------- locating
def resolve_beir_dir(source: str | Path, data_dir: str | Path | None = None) -> Path:
    """The folder of a named set (``scifact``, ``nfcorpus``; see :func:`resolve_data_dir`) or a path.

    Raises:
        FileNotFoundError: neither a known set name nor a folder.
    """
    path = Path(source).expanduser()
    if isinstance(source, str) and source in BEIR_SETS and not path.is_dir():
        path = resolve_data_dir(data_dir) / source
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder; the data folder has no {source}/ set; pass "
                                    f"--data-dir / data_dir= or set M2D_DATA_DIR")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a BEIR folder (corpus.tsv, queries.tsv, qrels/<split>.tsv) nor a "
                                f"known set ({', '.join(BEIR_SETS)})")
    return path


def find_beir_file(folder: Path, stem: str) -> Path:
    """``folder/<stem>.tsv``, else ``.jsonl`` / ``.csv``.

    Raises:
        FileNotFoundError: none exists.
    """
    for suffix in (".tsv", ".jsonl", ".csv"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"{folder / stem}.tsv: no such file (nor .jsonl / .csv); a BEIR folder needs "
                            f"corpus.tsv, queries.tsv and qrels/<split>.tsv")


def _columns(path: Path, header: list[str], wanted: Sequence[str], optional: Sequence[str] = ()) -> list[int]:
    idx = []
    for name in wanted:
        found = next((header.index(a) for a in _ALIASES[name] if a in header), None)
        if found is None and name not in optional:
            raise ValueError(f"{path}:1: missing column {name!r} (or {list(_ALIASES[name][1:])}); found {header}, "
                             f"expected {list(wanted)}")
        idx.append(-1 if found is None else found)
    return idx


def _as_id(path: Path, line: int, column: str, value: object) -> str:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not text:
        raise ValueError(f"{path}:{line}: empty or invalid {column!r} {value!r}; every id must be non-empty text")
    return text


# ----------------------------------------------------------------------------------- readers
def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
    """``(doc_ids, texts)`` of a corpus file (``doc_id, title, text``; ``title`` optional), text = title + " " + text.

    ``path`` may be the BEIR folder itself.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``file:line:`` for a missing column, an empty id, a repeated id or an empty document.
    """
    path = Path(path)
    if path.is_dir():
        path = find_beir_file(path, "corpus")
    header, rows = read_table(path)
    i_id, i_title, i_text = _columns(path, header, ["doc_id", "title", "text"], optional=["title"])
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for line, fields in rows:
        doc = _as_id(path, line, "doc_id", fields[i_id])
        if doc in seen:
            raise ValueError(f"{path}:{line}: doc_id {doc!r} repeats line {seen[doc]}; ids must be unique")
        seen[doc] = line
        title = fields[i_title] if i_title >= 0 else ""
        body = fields[i_text]
        if not isinstance(title, str) or not isinstance(body, str):
            raise ValueError(f"{path}:{line}: title and text of {doc!r} must be text, got {title!r} / {body!r}")
        text = join_title(title, body)
        if not text:
            raise ValueError(f"{path}:{line}: document {doc!r} has an empty title and text; drop the row or fill "
                             f"it")
        ids.append(doc)
        texts.append(text)
    return ids, texts


def read_queries(path: str | Path) -> tuple[list[str], list[str]]:
    """``(query_ids, texts)`` of a queries file (``query_id, text``); ``path`` may be the BEIR folder.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``file:line:`` for a missing column, an empty id or text, or a repeated id.
    """
    path = Path(path)
    if path.is_dir():
        path = find_beir_file(path, "queries")
    header, rows = read_table(path)
    i_id, i_text = _columns(path, header, ["query_id", "text"])
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for line, fields in rows:
        qid = _as_id(path, line, "query_id", fields[i_id])
        if qid in seen:
            raise ValueError(f"{path}:{line}: query_id {qid!r} repeats line {seen[qid]}; ids must be unique")
        seen[qid] = line
        ids.append(qid)
        texts.append(parse_text(path, line, "text", fields[i_text]).strip())
    return ids, texts


def read_qrels(path: str | Path) -> list[tuple[int, str, str, int]]:
    """``(line, query_id, doc_id, grade)`` rows of a qrels file (``query_id, doc_id, score``, integer grades).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``file:line:`` for a missing column, an empty id, a grade that is not an integer, or a
            (query, doc) pair given twice.
    """
    path = Path(path)
    header, rows = read_table(path)
    i_q, i_d, i_s = _columns(path, header, ["query_id", "doc_id", "score"])
    out: list[tuple[int, str, str, int]] = []
    seen: dict[tuple[str, str], int] = {}
    for line, fields in rows:
        qid, doc = _as_id(path, line, "query_id", fields[i_q]), _as_id(path, line, "doc_id", fields[i_d])
        score = parse_score(path, line, "score", fields[i_s])
        if score != int(score):
            raise ValueError(f"{path}:{line}: score {fields[i_s]!r} must be an integer relevance grade (0, 1, 2...)")
        if (qid, doc) in seen:
            raise ValueError(f"{path}:{line}: pair ({qid!r}, {doc!r}) repeats line {seen[(qid, doc)]}; give each "
                             f"pair one grade")
        seen[(qid, doc)] = line
        out.append((line, qid, doc, int(score)))
    return out


def load_beir(source: str | Path, split: str = "test", *, data_dir: str | Path | None = None,
              missing_docs: MissingDocs = "keep") -> BeirSet:
    """Load one split of a BEIR folder or named set (``scifact``, ``nfcorpus``) for evaluation.

    Args:
        source: a name in :data:`BEIR_SETS` or a folder path.
        split: ``qrels/<split>.tsv`` to read (``train`` / ``dev`` / ``test``).
        data_dir: data folder for named sets (see :func:`resolve_data_dir`).
        missing_docs: what to do with qrels rows whose document is not in the corpus (module docstring).

    Returns:
        The set; its name is the set's (folder's) name, plus ``-<split>`` unless ``split == "test"``.

    Raises:
        FileNotFoundError: a missing folder or file.
        ValueError: malformed files (``file:line:``), a qrels query that is not in the queries file, an
            unknown ``split`` / ``missing_docs``, or (``missing_docs="error"``) a qrels doc not in the corpus.
    """
    if missing_docs not in ("keep", "drop", "error"):
        raise ValueError(f"missing_docs {missing_docs!r} is not one of ['keep', 'drop', 'error']")
    if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
        raise ValueError(f"split {split!r} must be a qrels file name such as {list(BEIR_SPLITS)}")
    folder = resolve_beir_dir(source, data_dir)
    qrels_dir = folder / "qrels"
    try:
        qrels_path = find_beir_file(qrels_dir, split)
    except FileNotFoundError:
        have = sorted(p.stem for p in qrels_dir.glob("*.*")) if qrels_dir.is_dir() else []
        raise FileNotFoundError(f"{qrels_dir / split}.tsv: no such file; {folder.name} has qrels splits "
                                f"{have or 'none'}") from None
    doc_ids, doc_texts = read_corpus(find_beir_file(folder, "corpus"))
    queries_path = find_beir_file(folder, "queries")
    q_ids, q_texts = read_queries(queries_path)
    query_text = dict(zip(q_ids, q_texts, strict=True))
    corpus = set(doc_ids)
    qrels: dict[str, dict[str, int]] = {}
    missing: list[tuple[str, str]] = []
    first_missing = None
    for line, qid, doc, grade in read_qrels(qrels_path):
        if qid not in query_text:
            raise ValueError(f"{qrels_path}:{line}: query_id {qid!r} is not in {queries_path}; fix the qrels or "
                             f"the queries file")
        qrels.setdefault(qid, {})
        if doc not in corpus:
            if missing_docs == "error":
                raise ValueError(f"{qrels_path}:{line}: doc_id {doc!r} is not in the corpus "
                                 f"{folder / 'corpus.tsv'}; pass missing_docs='keep' or 'drop' to accept it")
            missing.append((qid, doc))
            first_missing = first_missing or line
            if missing_docs == "drop":
                continue
        qrels[qid][doc] = grade
    if missing:
        logger.warning("%s:%d: %d qrels row(s) name documents not in the corpus (first: %r); %s", qrels_path,
                       first_missing, len(missing), missing[0][1],
                       "kept as unretrievable relevant documents" if missing_docs == "keep" else "dropped")
    dropped = [q for q, docs in qrels.items() if not any(g > 0 for g in docs.values())]
    if dropped:
        logger.warning("%s: %d quer(ies) without a relevant document are left out (first: %r)", qrels_path,
                       len(dropped), dropped[0])
    kept = [q for q in qrels if q not in set(dropped)]
    name = folder.name if split == "test" else f"{folder.name}-{split}"
    return BeirSet(name, doc_ids, doc_texts, kept, [query_text[q] for q in kept], {q: qrels[q] for q in kept},
                   split, missing, dropped)


# ----------------------------------------------------------------------------------- training pairs
def is_beir_source(source: str | Path, data_dir: str | Path | None = None) -> bool:
    """Whether ``source`` names a BEIR set (``scifact``, ``nfcorpus``) or is a folder holding ``qrels/``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / "qrels").is_dir()
    return isinstance(source, str) and source in BEIR_SETS and not path.exists()


def load_beir_pairs(source: str | Path, split: str = "train", *, data_dir: str | Path | None = None,
                    limit: int | None = None, min_grade: int = 1) -> TrainingData:
    """(query, relevant document) pairs of a BEIR split, for training with in-batch negatives.

    One row per qrels row with grade ``>= min_grade`` whose document is in the corpus, grouped by query in
    first-seen qrels order; a query
    with several relevant documents gives several rows (in-batch negatives then treat a batch-mate's other
    positive as a negative, the usual cost of this loss). The document text is ``title + " " + text``.

    Args:
        source: a name in :data:`BEIR_SETS` or a BEIR folder.
        split: qrels split (SciFact: ``train`` has 919 rows; NFCorpus: ``train`` has 110,575).
        data_dir: data folder for named sets.
        limit: keep the first ``limit`` pairs.
        min_grade: lowest grade counted as a positive.

    Returns:
        ``TrainingData`` of kind ``pairs`` (columns ``anchor`` = query, ``positive`` = document).

    Raises:
        FileNotFoundError / ValueError: as :func:`load_beir`, or no pair left.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit {limit!r} must be a positive integer (or None for all pairs)")
    data = load_beir(source, split, data_dir=data_dir, missing_docs="drop")
    text = dict(zip(data.doc_ids, data.doc_texts, strict=True))
    queries = dict(zip(data.query_ids, data.query_texts, strict=True))
    anchors: list[str] = []
    positives: list[str] = []
    for qid in data.query_ids:
        for doc, grade in data.qrels[qid].items():
            if grade >= min_grade:
                anchors.append(queries[qid])
                positives.append(text[doc])
    if limit is not None:
        anchors, positives = anchors[:limit], positives[:limit]
    if not anchors:
        raise ValueError(f"{data.name}: no (query, document) pair with grade >= {min_grade} in split {split!r}")
    return TrainingData(name=f"{resolve_beir_dir(source, data_dir).name}-{split}", kind="pairs",
                        columns={"anchor": anchors, "positive": positives})
