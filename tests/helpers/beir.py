"""A tiny BEIR folder written for the retrieval and search tests."""

from __future__ import annotations

from pathlib import Path

DOCS = [
    ("007", "Dogs", "the dog runs in the park"),
    ("d2", "", "a man is playing the guitar"),
    ("d3", "Cats", "the cat sits on the red car"),
    ("d4", "Food", "two children are eating food near the river"),
    ("d5", "Books", "the woman reads a book under a tree"),
    ("d6", "Music", "a woman plays the piano in the house"),
]
QUERIES = [("q1", "a dog in the park"), ("q2", "who plays music"), ("q3", "children eat"),
           ("q4", "cat on a car"), ("q5", "a book"), ("q9", "never judged")]
# q3's only relevant doc is not in the corpus; q5 has no relevant document (grade 0 only)
QRELS = [("q1", "007", 1), ("q2", "d2", 2), ("q2", "d6", 1), ("q3", "ghost", 1), ("q4", "d3", 1), ("q5", "d5", 0)]


def write_beir(folder: Path, docs=DOCS, queries=QUERIES, qrels=QRELS, split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.tsv").write_text("doc_id\ttitle\ttext\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in docs),
                                       encoding="utf-8")
    (folder / "queries.tsv").write_text("query_id\ttext\n" + "".join(f"{a}\t{b}\n" for a, b in queries),
                                        encoding="utf-8")
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query_id\tdoc_id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8")
    return folder
