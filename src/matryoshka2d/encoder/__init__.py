"""The multi-exit encoder: backbones, pooling, exit heads, tokenization and the one batching loop.

The lowest layer above :mod:`matryoshka2d.io`: it imports nothing from losses, training, evaluation, export,
bench, study or the CLI.
"""

from matryoshka2d.encoder.model import MatryoshkaEncoder

__all__ = ["MatryoshkaEncoder"]
