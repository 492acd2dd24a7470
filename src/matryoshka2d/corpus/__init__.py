"""Corpus-scale encoding: stream a corpus, embed it at several exits in one pass, write resumable Parquet shards.

Entry point: :func:`~matryoshka2d.corpus.pipeline.make_job` then
:func:`~matryoshka2d.corpus.pipeline.encode_corpus` (``m2d encode MODEL --input ... --exits 3:128,6:384
--output DIR``). Readers live in :mod:`~matryoshka2d.corpus.readers`, shards and formats in
:mod:`~matryoshka2d.corpus.shards`, the Ray engine in :mod:`~matryoshka2d.corpus.ray_engine`. See
``docs/encoding.md``.
"""

from __future__ import annotations

from matryoshka2d.corpus.job import CorpusJob, make_job
from matryoshka2d.corpus.pipeline import encode_corpus
from matryoshka2d.corpus.readers import CorpusReader, resolve_inputs
from matryoshka2d.corpus.shards import STORAGE_FORMATS, Exit, embed_exits, parse_exits

__all__ = ["STORAGE_FORMATS", "CorpusJob", "CorpusReader", "Exit", "embed_exits", "encode_corpus", "make_job",
           "parse_exits", "resolve_inputs"]
