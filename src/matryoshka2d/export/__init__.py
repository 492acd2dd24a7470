"""One exit as a standalone model: Hugging Face, sentence-transformers, ONNX or OpenVINO, verified after writing.

``export_model`` is imported lazily, so :mod:`matryoshka2d.export.runtime` (running an ONNX or OpenVINO export)
loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matryoshka2d.export.exporter import export_model

__all__ = ["export_model"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from matryoshka2d.export.exporter import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
