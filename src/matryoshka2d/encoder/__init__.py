"""The multi-exit encoder: backbones, pooling, exit heads, tokenization and the one batching loop.

The lowest layer above :mod:`matryoshka2d.io`: it imports nothing from losses, training, evaluation, export,
bench, study or the CLI. ``MatryoshkaEncoder`` is imported lazily, so ``matryoshka2d.encoder.tokenization``
(the batching loop) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

__all__ = ["MatryoshkaEncoder"]


def __getattr__(name: str) -> Any:
    if name == "MatryoshkaEncoder":
        from matryoshka2d.encoder.model import MatryoshkaEncoder

        return MatryoshkaEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
