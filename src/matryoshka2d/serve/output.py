"""From pooled vectors to what a response carries: truncate, L2-normalise, quantise, encode.

Quantisation follows sentence-transformers' ``quantize_embeddings``:

- ``float32``: the normalised float32 vector.
- ``int8`` / ``uint8``: per coordinate, ``floor((x - start) / step)`` clipped to ``0..255`` with
  ``step = (end - start) / 255`` (``uint8``), minus 128 (``int8``). The ranges are fixed to ``[-1, 1]`` for
  every coordinate (an L2-normalised vector never leaves it), so a vector's code does not depend on what else
  is in its batch; sentence-transformers gives the same codes with ``ranges=[[-1]*d, [1]*d]``.
- ``binary`` / ``ubinary``: ``x > 0`` packed 8 bits per byte, big-endian (``numpy.packbits``), ``ceil(d/8)``
  bytes; ``binary`` stores each byte minus 128 as int8.

``encoding_format="base64"`` sends the little-endian float32 bytes of each row, base64-encoded, as OpenAI
does: quantised codes go as float32 numbers (``-37.0``, ``12.0``), so the ``openai`` client, which asks for
base64 by default and decodes every payload as float32, gets the same values as ``encoding_format="float"``.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from matryoshka2d.vocab import PRECISIONS, EncodingFormat, Precision


def quantize(vectors: np.ndarray, precision: Precision) -> np.ndarray:
    """Quantise normalised float32 rows like ``quantize_embeddings`` with fixed ``[-1, 1]`` ranges.

    Raises:
        ValueError: an unknown precision.
    """
    if precision == "float32":
        return vectors.astype(np.float32, copy=False)
    if precision in ("int8", "uint8"):
        starts = np.float32(-1.0)
        steps = np.float32(2.0) / np.float32(255)
        codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(vectors > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    raise ValueError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")


def quantization_ranges(dim: int) -> np.ndarray:
    """The ``(2, dim)`` ranges the int8 / uint8 codes use (``[-1, 1]`` per coordinate)."""
    return np.vstack([np.full(dim, -1.0, dtype=np.float32), np.full(dim, 1.0, dtype=np.float32)])


def encode_rows(rows: np.ndarray, encoding_format: EncodingFormat, *, as_lists: bool = True) -> list[Any]:
    """One JSON value per row: its numbers (``float``) or the base64 of its little-endian float32 bytes
    (``base64``, whatever the precision: what OpenAI's clients decode).

    Args:
        rows: a 2-D float32, int8 or uint8 array.
        encoding_format: ``float`` or ``base64``.
        as_lists: numbers as Python lists (for the standard ``json``); else the numpy rows themselves (for
            a serialiser that writes numpy arrays, such as orjson).
    """
    if encoding_format == "base64":
        little = rows.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return rows.tolist() if as_lists else list(rows)  # type: ignore[no-any-return]
