"""Pooling of token states into one vector per sentence. Padding never changes the result."""

from __future__ import annotations

import torch

from matryoshka2d.vocab import POOLING_MODES, PoolingMode, check_choice


def check_pooling(mode: str) -> PoolingMode:
    """Return ``mode`` if it is a known pooling mode.

    Raises:
        ValueError: unknown mode.
    """
    return check_choice("pooling", mode, POOLING_MODES)  # type: ignore[return-value]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """Pool ``hidden`` (batch, tokens, dim) over the tokens where ``attention_mask`` is 1.

    Args:
        hidden: token states of one layer.
        attention_mask: (batch, tokens), 1 for real tokens, 0 for padding.
        mode: one of :data:`POOLING_MODES`.

    Returns:
        (batch, dim) tensor in the dtype of ``hidden``.
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        return hidden[:, 0]
    if mode in ("mean", "cls_avg"):
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return mean if mode == "mean" else (mean + hidden[:, 0]) / 2
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    if mode == "last":
        positions = torch.arange(attention_mask.shape[1], device=hidden.device)
        last = (attention_mask.bool() * positions).argmax(1)  # works for left and right padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    check_choice("pooling", mode, POOLING_MODES)
    raise AssertionError(f"pooling {mode!r} is listed in vocab.POOLING_MODES but not implemented here")
