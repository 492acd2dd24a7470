"""One exit as a standalone model: Hugging Face, sentence-transformers or ONNX, verified after writing."""

from matryoshka2d.export.exporter import export_model

__all__ = ["export_model"]
