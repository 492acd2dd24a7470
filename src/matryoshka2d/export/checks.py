"""Checking an export: the exported folder, loaded back the way its users will load it, must reproduce the
source exit.

Our loader must match the source within :data:`RELOAD_MAX_ABS_DIFF`, sentence-transformers (for that format)
to cosine :data:`ST_MIN_COSINE`; with an STS set, each one's Spearman is recorded beside the source's. The
ONNX graph is checked by :mod:`matryoshka2d.export.onnx` with the helpers here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from matryoshka2d.evaluation.metrics import sts_spearman
from matryoshka2d.truncation import cosine
from matryoshka2d.vocab import install_hint

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

ST_MIN_COSINE = 0.99999  # sentence-transformers folder vs the source exit
RELOAD_MAX_ABS_DIFF = 1e-5  # our own loader on the exported folder vs the source exit

#: Texts every export is checked on: several lengths in one padded batch, an empty string, a long text.
VERIFY_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "",
    "cat",
    "Two children are eating food in the park while their parents read books under an old tree.",
    "Ünïcödé text, digits 12345 and punctuation!?",
    " ".join(["a very long sentence that will be truncated at the maximum sequence length"] * 60),
)


class ScoredPairsLike(Protocol):
    """An STS set: what :class:`matryoshka2d.data.datasets.ScoredPairs` provides."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray


def require_sentence_transformers() -> None:
    """Raises: ImportError naming the ``st`` extra when sentence-transformers is missing."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise ImportError(
            "checking a sentence-transformers export needs sentence-transformers: "
            f"{install_hint('st')} (or skip the check with --no-verify / verify=False)"
        ) from None


def verify_folder(folder: Path, fmt: str, texts: list[str], reference: np.ndarray,
                   pairs: ScoredPairsLike | None, model: MatryoshkaEncoder, n: int, d: int) -> dict[str, Any]:
    """Load ``folder`` back (ours, and sentence-transformers for that format); compare with ``reference``."""
    from matryoshka2d.encoder.model import MatryoshkaEncoder

    report: dict[str, Any] = {}
    loaded = MatryoshkaEncoder.from_pretrained(folder)
    if loaded.num_layers != n or loaded.default_layer != n or loaded.default_dim != d:
        raise RuntimeError(f"the exported folder loads with {loaded.num_layers} layers and default exit "
                           f"({loaded.default_layer}, {loaded.default_dim}), expected ({n}, {d}); "
                           "please report")
    diff = float(np.abs(loaded.encode(texts) - reference).max())
    if diff > RELOAD_MAX_ABS_DIFF:
        raise RuntimeError(f"the exported folder differs from the source exit by {diff:.2e} "
                           f"(limit {RELOAD_MAX_ABS_DIFF:.0e}); please report")
    report["matryoshka2d_max_abs_diff"] = diff
    encoders: dict[str, Callable[[Sequence[str]], np.ndarray]] = {
        "source": lambda t: model.encode(t, layer=n, dim=d)}
    if fmt == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        got = st.encode(texts, convert_to_numpy=True)
        if got.shape != reference.shape:
            raise RuntimeError(f"SentenceTransformer returns {got.shape[1]}-dim embeddings, expected {d}")
        min_cos = float(cosine(got, reference).min())
        report.update({"sentence_transformers_min_cosine": round(min_cos, 7),
                       "sentence_transformers_max_abs_diff": float(np.abs(got - reference).max()),
                       "sentence_transformers_dim": int(got.shape[1])})
        if min_cos < ST_MIN_COSINE:
            raise ValueError(f"SentenceTransformer on the export agrees with the source exit only to "
                             f"cosine {min_cos:.6f} (< {ST_MIN_COSINE}); this sentence-transformers version "
                             "reads the folder differently: export --format hf and build the pipeline "
                             "by hand")
        encoders["sentence_transformers"] = lambda t: st.encode(list(t), convert_to_numpy=True)
    else:
        encoders["exported"] = loaded.encode
    if pairs is not None:
        for key, encode in encoders.items():
            report[f"{pairs.name}_spearman_{key}"] = round(sts_spearman(encode, pairs), 4)
    return report


@contextlib.contextmanager
def quiet_logger(name: str | None, level: int = logging.ERROR) -> Iterator[None]:
    """Raise logger ``name``'s level (``None``: the root logger) within the context, for expected messages."""
    target = logging.getLogger(name)
    old = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(old)
