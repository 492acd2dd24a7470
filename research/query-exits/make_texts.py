"""Write the unlabelled alignment texts of the query-exits study, one text per line, from ../shared/data.

Queries: the 19,217 MS MARCO queries, SciFact train queries, NFCorpus train queries (never a dev or test
query: dev chooses the learning rate, test is reported). Documents: the SciFact and NFCorpus corpora
(title + text, what an index holds). Sentences: STS-B train. Labels and qrels scores are never read; the
train qrels are read only for which query ids belong to the train split.

    python research/query-exits/make_texts.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from matryoshka2d.data.beir import read_corpus, read_qrels, read_queries, resolve_beir_dir
from matryoshka2d.data.datasets import read_sentences, resolve_data_dir


def one_line(text: str) -> str:
    return " ".join(text.split())


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = resolve_data_dir(None)
    files: dict[str, list[str]] = {"msmarco-queries": read_sentences(root / "queries" / "msmarco.tsv", "text")}
    for name in ("scifact", "nfcorpus"):
        folder = resolve_beir_dir(name)
        ids, texts = read_queries(folder / "queries.tsv")
        train = {q for _, q, _, _ in read_qrels(folder / "qrels" / "train.tsv")}
        files[f"{name}-train-queries"] = [t for i, t in zip(ids, texts, strict=True) if i in train]
        _, doc_texts = read_corpus(folder / "corpus.tsv")
        files[f"{name}-corpus"] = doc_texts
    sts = read_sentences(root / "stsb" / "train.tsv", "sentence1") + read_sentences(root / "stsb" / "train.tsv",
                                                                                    "sentence2")
    files["stsb-train-sentences"] = sts
    for name, texts in files.items():
        lines = [one_line(t) for t in texts if t.strip()]
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{name}: {len(lines)} texts")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
