"""The method's core operation, once: keep the first ``dim`` coordinates of each row, then L2-normalise.

Every path that cuts an embedding to a Matryoshka dim calls :func:`truncate` (the encoder's batching loop,
the grid and retrieval evaluators, the cascade index, the corpus encoder, the server, the benchmark, the
CLI and the exported ONNX graph), and every cosine of two embedding matrices is :func:`cosine`. Both take
numpy arrays or torch tensors; nothing here imports torch (a tensor's own methods do the work), so any layer
may use this module.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

EPS = 1e-12  # a zero row stays zero (torch.nn.functional.normalize's eps)

Array = TypeVar("Array")


def truncate(x: Array, dim: int | None = None) -> Array:
    """The first ``dim`` coordinates of each row of ``x``, L2-normalised (all of them when ``dim`` is None).

    Args:
        x: rows on the last axis: a numpy array (any float dtype, or a list of rows) or a torch tensor.
        dim: how many leading coordinates to keep.

    Returns:
        numpy: float32 and C-contiguous (what faiss and the wire formats need). torch: the same dtype and
        device as ``x``, computed as ``torch.nn.functional.normalize`` does (so it traces to ONNX).
    """
    if _is_tensor(x):
        part = x[..., :dim]  # type: ignore[index]
        return part / part.norm(dim=-1, keepdim=True).clamp_min(EPS)
    part = np.ascontiguousarray(np.asarray(x)[..., :dim], dtype=np.float32)
    return part / np.maximum(np.linalg.norm(part, axis=-1, keepdims=True), EPS)  # type: ignore[return-value]


def cosine(a: Any, b: Any) -> np.ndarray:
    """float64 cosine of each row of ``a`` with the same row of ``b`` (0 where a row is all zeros)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return (a64 * b64).sum(-1) / np.maximum(den, EPS)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")
