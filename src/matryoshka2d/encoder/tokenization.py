"""Texts in, model inputs out: the checks on input texts and the token batches every encoding path runs.

:func:`token_batches` is the one batching loop: it tokenizes a chunk of texts in one fast-tokenizer call,
sorts it by token count (not characters: ~25% less padding) and pads each batch with numpy. The torch
encoder (:mod:`matryoshka2d.encoder.batching`), the grid evaluator and the ONNX / OpenVINO runners all run it.

This module imports neither torch nor transformers: :class:`TokenizerFile` reads a folder's ``tokenizer.json``
with the ``tokenizers`` library alone, so an exported exit runs without either (light startup).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # what a backbone is given
TOKENIZE_CHUNK = 8192  # texts tokenized per call (bounds the memory of token ids)


@dataclass
class Tokenized:
    """Unpadded token ids of a chunk of texts; ``collate`` pads a batch of them like ``tokenize`` does."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    num_truncated: int
    pad_id: int | None
    pad_type_id: int
    left: bool

    def collate(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """int64 arrays for the texts at positions ``rows``, padded to the longest of them (like ``tokenize``)."""
        lengths = [len(self.input_ids[i]) for i in rows]
        width = max(lengths)
        if self.pad_id is None and min(lengths) != width:
            raise ValueError("the tokenizer has no pad token, so texts of different lengths cannot be batched; "
                             "set tokenizer.pad_token (e.g. to its eos token) or pass batch_size=1")
        ids = np.full((len(rows), width), self.pad_id or 0, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = None if self.token_type_ids is None else np.full_like(ids, self.pad_type_id)
        for r, (i, n) in enumerate(zip(rows, lengths, strict=True)):
            cols = slice(width - n, width) if self.left else slice(0, n)
            ids[r, cols] = self.input_ids[i]
            mask[r, cols] = 1
            if types is not None:
                types[r, cols] = self.token_type_ids[i]  # type: ignore[index]
        features = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            features["token_type_ids"] = types
        return features


def tokenize_unpadded(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tokenized:
    """Token ids of ``texts`` without padding, in one tokenizer call; batches are padded by ``collate``."""
    batch = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False)
    encodings = getattr(batch, "encodings", None)
    return Tokenized(
        input_ids=batch["input_ids"],
        token_type_ids=batch.get("token_type_ids"),
        num_truncated=sum(1 for e in encodings if e.overflowing) if encodings else 0,
        pad_id=tokenizer.pad_token_id,
        pad_type_id=getattr(tokenizer, "pad_token_type_id", 0),
        left=getattr(tokenizer, "padding_side", "right") == "left",
    )


class TokenizerFile:
    """A folder's ``tokenizer.json`` run by the ``tokenizers`` library: what :func:`tokenize_unpadded` calls,
    without transformers.

    Truncation is the fast tokenizer's own (longest first, special tokens counted), so ids equal those of the
    transformers tokenizer saved beside it. ``tokenizer_config.json`` gives ``model_max_length``, the pad token
    and the padding side.

    Args:
        folder: a folder holding ``tokenizer.json`` (and usually ``tokenizer_config.json``).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in ``folder``.
        ValueError: the file is not a tokenizer the ``tokenizers`` library reads.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; export the model again (every export writes it)")
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path} is not a tokenizer the tokenizers library reads ({e}); export again") from e
        self.backend.no_padding()
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        max_length = config.get("model_max_length")
        self.model_max_length = int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e9 else 512
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = self.backend.token_to_id(pad) if isinstance(pad, str) else None
        self.pad_token_type_id = 0
        self.padding_side = str(config.get("padding_side", "right"))

    def __call__(self, texts: list[str], *, truncation: bool = True, max_length: int | None = None,
                 return_attention_mask: bool = False) -> dict[str, Any]:
        """``{"input_ids", "token_type_ids"}`` lists (and ``encodings`` for the truncation count), unpadded."""
        if truncation and max_length:
            self.backend.enable_truncation(int(max_length))
        else:
            self.backend.no_truncation()
        encodings = self.backend.encode_batch(list(texts))
        return TokenizedFile(input_ids=[e.ids for e in encodings], token_type_ids=[e.type_ids for e in encodings],
                             encodings=encodings)


class TokenizedFile(dict):
    """What :meth:`TokenizerFile.__call__` returns: a dict of id lists with the ``encodings`` attribute
    transformers' ``BatchEncoding`` has."""

    def __init__(self, *, encodings: list[Any], **fields: Any) -> None:
        super().__init__(**fields)
        self.encodings = encodings


class TokenBatches:
    """Batches of ``texts`` as padded int64 arrays: iterate for ``(rows, features)``.

    ``rows`` are positions in ``texts``; every text comes exactly once. Chunks of :data:`TOKENIZE_CHUNK`
    texts are tokenized in one call and sorted by token count, longest first, so the padding of a batch is
    small. After the iteration, ``num_truncated`` counts the texts cut to ``max_length``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones tokenize a chunk in parallel Rust).
        texts: the texts (checked with :func:`check_texts` by the caller).
        batch_size: texts per batch.
        max_length: tokens per text.
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], *, batch_size: int, max_length: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r} must be a positive integer; pass e.g. 64")
        self.tokenizer, self.texts, self.batch_size, self.max_length = tokenizer, texts, batch_size, max_length
        self.num_truncated = 0

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        chunk = self.batch_size * max(1, TOKENIZE_CHUNK // self.batch_size)
        self.num_truncated = 0
        for first in range(0, len(self.texts), chunk):
            tokens = tokenize_unpadded(self.tokenizer, self.texts[first : first + chunk], self.max_length)
            self.num_truncated += tokens.num_truncated
            order = np.argsort([-len(ids) for ids in tokens.input_ids], kind="stable")
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                yield first + rows, tokens.collate(rows)


class TextError(ValueError):
    """A text that cannot be encoded; ``index`` is its position in the list."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def check_texts(texts: Sequence[str], *, name: str = "texts", blank: bool = True) -> list[str]:
    """Return ``texts`` as a list if it is a non-empty sequence of valid Unicode strings.

    Args:
        texts: the texts.
        name: what the messages call the list (e.g. ``input`` for the server).
        blank: accept empty and whitespace-only texts and NUL characters; ``False`` refuses them as
            ``m2d encode``'s readers do (a blank or NUL-only text embeds as the special tokens alone).

    Raises:
        ValueError: not a sequence, or empty.
        TextError: a non-string item, a lone surrogate, or (``blank=False``) a blank text or a NUL
            character, naming the item.
    """
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}; pass e.g. ['a sentence']")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty: encode needs at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TextError(f"{name}[{i}] is {type(t).__name__} ({t!r:.40}), not str; convert every item to str "
                            "first", i)
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # the tokenizer would fail with an unrelated TypeError
                raise TextError(
                    f"{name}[{i}] holds {t[e.start]!r} at position {e.start}, a lone surrogate that is not "
                    "valid Unicode (text decoded with errors='surrogateescape'?); clean it first, e.g. "
                    "text.encode('utf-8', 'replace').decode('utf-8')", i) from None
        if not blank:
            if "\x00" in t:
                raise TextError(f"{name}[{i}] holds a NUL character at position {t.index(chr(0))}; send text "
                                "without control characters", i)
            if not t.strip():
                raise TextError(f"{name}[{i}] is {'empty' if not t else 'only whitespace'}; send text with at "
                                "least one visible character", i)
    return list(texts)


def default_max_length(backbone: nn.Module, tokenizer: Any) -> int:
    """Tokens per text a backbone and its tokenizer allow: the smallest of their limits and 512."""
    limits = [getattr(backbone.config, "max_position_embeddings", 512), 512]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 100_000:
        limits.append(tok_max)
    if backbone.config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limits.append(limits[0] - 2)  # RoBERTa offsets positions by padding_idx + 1
    return min(limits)
