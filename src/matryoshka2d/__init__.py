"""matryoshka2d: 2D Matryoshka sentence embeddings (elastic depth and width) for any HF encoder."""

from __future__ import annotations

__version__ = "0.1.0"

from matryoshka2d.model import MatryoshkaEncoder  # noqa: E402

__all__ = ["MatryoshkaEncoder", "__version__"]
