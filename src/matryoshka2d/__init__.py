"""matryoshka2d: 2D Matryoshka sentence embeddings (elastic depth and width) for any HF encoder.

``from matryoshka2d import MatryoshkaEncoder`` loads the encoder (and torch) on first use, so importing the
package, or running ``m2d --help``, stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matryoshka2d._version import __version__

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

__all__ = ["MatryoshkaEncoder", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "MatryoshkaEncoder":
        from matryoshka2d.encoder.model import MatryoshkaEncoder

        return MatryoshkaEncoder
    raise AttributeError(f"module 'matryoshka2d' has no attribute {name!r}")
