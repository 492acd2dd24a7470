"""Texts in, model inputs out: what :class:`matryoshka2d.model.MatryoshkaEncoder` does around its tokenizer.

The checks on the texts ``encode`` accepts, the default ``max_seq_length`` of a backbone and tokenizer, the
feature keys a backbone is given, and the unpadded token ids of a chunk that ``encode`` pads batch by batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class _Tokenized:
    """Unpadded token ids of a chunk of texts; ``collate`` pads a batch of them like ``tokenize`` does."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    num_truncated: int
    pad_id: int | None
    pad_type_id: int
    left: bool

    def collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors for the texts at positions ``rows``, padded to the longest of them."""
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
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            features["token_type_ids"] = torch.from_numpy(types)
        return features


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}; pass e.g. ['a sentence']")
    if len(texts) == 0:
        raise ValueError("texts is empty: encode needs at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(
                f"texts[{i}] is {type(t).__name__} ({t!r:.40}), not str; convert every item to str first"
            )
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # the tokenizer would fail with an unrelated TypeError
                raise ValueError(
                    f"texts[{i}] holds {t[e.start]!r} at position {e.start}, a lone surrogate that is not "
                    "valid Unicode (text decoded with errors='surrogateescape'?); clean it first, e.g. "
                    "text.encode('utf-8', 'replace').decode('utf-8')"
                ) from None
    return list(texts)


def _default_max_length(backbone: nn.Module, tokenizer: Any) -> int:
    limits = [getattr(backbone.config, "max_position_embeddings", 512), 512]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 100_000:
        limits.append(tok_max)
    if backbone.config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limits.append(limits[0] - 2)  # RoBERTa offsets positions by padding_idx + 1
    return min(limits)
