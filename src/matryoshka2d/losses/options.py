"""The options of :class:`matryoshka2d.losses.objective.TwoDMatryoshkaLoss`: their defaults and their checks.

Default Matryoshka dims and Starbucks pairs, the depth weighting lambda(n) of shallow terms, and the checks
of list and per-step options (messages name the option, the value and the allowed range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka2d.encoder.model import matryoshka_dims

if TYPE_CHECKING:
    from matryoshka2d.losses.objective import DepthWeighting

STARBUCKS_MAX_PAIRS = 6


def default_starbucks_pairs(
    num_layers: int, hidden_size: int, dims: Sequence[int] | None = None
) -> tuple[tuple[int, int], ...]:
    """Fixed (layer, dim) pairs: the K largest ``dims`` matched in order with K layers spread over 1..N.

    ``K = min(6, N, len(dims))``; pair ``i`` (1-based) has layer ``ceil(i * N / K)``, so the last pair is
    always ``(N, D)``. N=12, D=768 gives (2,32) (4,64) (6,128) (8,256) (10,512) (12,768).
    """
    pool = sorted({int(d) for d in (dims or matryoshka_dims(hidden_size))} | {hidden_size})
    k = min(STARBUCKS_MAX_PAIRS, num_layers, len(pool))
    return tuple((-(-i * num_layers // k), d) for i, d in zip(range(1, k + 1), pool[-k:], strict=True))


def depth_weight(layer: int, mode: DepthWeighting) -> float:
    """lambda(n): 1 (``none``), ``1/n`` (``linear``) or ``1/(1 + ln n)`` (``log``)."""
    if mode == "linear":
        return 1.0 / layer
    if mode == "log":
        return 1.0 / (1.0 + math.log(layer))
    return 1.0


def _int_list(name: str, values: Any, lo: int, hi: int, fix: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of integers in {lo}..{hi}, got {values!r}; {fix}")
    bad = [
        v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi
    ]
    if bad:
        raise ValueError(f"{name} has {bad} outside the allowed range {lo}..{hi} (got {list(values)}); {fix}")
    return sorted({int(v) for v in values})


def _per_step(name: str, value: Any, available: int) -> int:
    """``value`` (an int, ``"all"`` or -1 for all) checked against ``available`` choices."""
    if value == "all" or (not isinstance(value, bool) and value == -1):
        return available
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= available:
        raise ValueError(f"{name} must be 1..{available} or 'all', got {value!r}")
    return int(value)


def _check_pairs(pairs: Any, n: int, d: int) -> tuple[tuple[int, int], ...]:
    """Starbucks ``(layer, dim)`` pairs checked against ``1..n`` x ``1..d``, sorted."""
    fix = f"pass (layer, dim) pairs in 1..{n} x 1..{d}, e.g. [[{n // 2 or 1}, {d // 2}], [{n}, {d}]]"
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(
            f"starbucks_pairs must be a non-empty list of (layer, dim) pairs, got {pairs!r}; {fix}"
        )
    out = []
    for p in pairs:
        ok = (
            isinstance(p, Sequence)
            and not isinstance(p, str)
            and len(p) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p)
        )
        if not ok or not (1 <= p[0] <= n and 1 <= p[1] <= d):
            raise ValueError(f"starbucks_pairs has {p!r}, outside layers 1..{n} x dims 1..{d}; {fix}")
        out.append((int(p[0]), int(p[1])))
    if len(set(out)) != len(out):
        raise ValueError(f"starbucks_pairs has duplicates: {out}; list each (layer, dim) pair once")
    return tuple(sorted(out))
