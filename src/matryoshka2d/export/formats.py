"""One writer per export format, in a table: what each format refuses, needs, writes and checks.

:func:`~matryoshka2d.export.exporter.export_model` looks the format up in :data:`WRITERS` and calls the same
three methods on every writer, so a new format is a new row here, not a branch in the exporter:

- ``check``: refuse options and exits the format cannot express, before any work.
- ``require``: import the optional packages the format needs (the error names the extra to install).
- ``write``: write the folder's files into the temporary folder, verify them against the source exit, and
  return the ``export`` record of ``matryoshka2d.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matryoshka2d.export.checks import ScoredPairsLike, quiet_logger, require_sentence_transformers, verify_folder
from matryoshka2d.export.hf import (
    runtime_dims,
    write_backbone,
    write_runtime_fields,
    write_sentence_transformers_layout,
)
from matryoshka2d.io.exit_files import write_heads
from matryoshka2d.io.manifest import CONFIG_NAME, MANIFEST_NAME
from matryoshka2d.vocab import QUANTIZATIONS, ExportFormat, check_choice

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder


@dataclass
class ExportJob:
    """What a writer needs: the source exit, the folder being written, and the check texts' reference."""

    model: MatryoshkaEncoder  # the source (left unchanged)
    sub: MatryoshkaEncoder  # the source truncated to ``layer`` blocks
    folder: Path  # the temporary folder, moved into place once written and verified
    layer: int
    dim: int
    meta: dict[str, Any]  # the folder's matryoshka2d.json (the writer's record is added under ``export``)
    texts: list[str]
    reference: np.ndarray  # the source exit's embeddings of ``texts``
    sts: ScoredPairsLike | None
    quantize: str | None = None
    opset: int | None = None
    verify: bool = True


class FormatWriter:
    """One row of the table: the base checks every format shares, and nothing to import."""

    name: ExportFormat
    onnx_options = False  # whether --quantize / --opset apply

    def check(self, model: MatryoshkaEncoder, layer: int, quantize: str | None, opset: int | None) -> None:
        """Refuse what this format cannot express.

        Raises:
            ValueError: the message names the option and the format that takes it.
        """
        if not self.onnx_options and (quantize is not None or opset is not None):
            raise ValueError(f"quantize and opset apply to the onnx format only, not {self.name!r}; drop them")
        if quantize is not None:
            check_choice("quantization", quantize, QUANTIZATIONS, fix=" (or none)")

    def require(self, verify: bool) -> None:
        """Import the optional packages the format needs (the error names the extra)."""

    def write(self, job: ExportJob) -> dict[str, Any]:
        """Write and verify the folder; return its ``export`` record."""
        raise NotImplementedError


class HfWriter(FormatWriter):
    """The Hugging Face folder: the truncated backbone, its tokenizer, and the exit heads of its layers."""

    name: ExportFormat = "hf"
    # a plain transformers folder keeps the full width (the exit's dim is a default) and has no place for a head
    full_width = True
    holds_heads = False

    def check(self, model: MatryoshkaEncoder, layer: int, quantize: str | None, opset: int | None) -> None:
        super().check(model, layer, quantize, opset)
        if not self.holds_heads and layer in model.exit_head_layers:
            raise ValueError(
                f"exit layer {layer} has a {model.exit_head_kind} exit head, which a plain Hugging Face folder "
                "cannot express (transformers would return the embedding without it); export with --format "
                "sentence-transformers (the head becomes a Dense module) or --format onnx (the head is in the "
                "graph)"
            )

    def write(self, job: ExportJob) -> dict[str, Any]:
        """Write and verify the folder; return its ``export`` record."""
        write_backbone(job.sub, job.folder)
        width = job.model.hidden_size if self.full_width else job.dim
        write_runtime_fields(job.folder, runtime_dims(job.model, width))
        heads = job.sub.exit_heads_state()
        if heads:
            job.meta["exit_heads"] = write_heads(job.folder, heads)
        self.write_layout(job)
        job.meta["export"] = record = {"format": self.name, "files": list_files(job.folder)}
        write_meta(job.folder, job.meta)  # the check loads the folder back, metadata included
        if job.verify:
            with quiet_logger("matryoshka2d.encoder.batching"):
                record["verification"] = verify_folder(job.folder, self.name, job.texts, job.reference, job.sts,
                                                       job.model, job.layer, job.dim)
        return record

    def write_layout(self, job: ExportJob) -> None:
        """Files beyond the Hugging Face folder (none for ``hf``)."""


class SentenceTransformersWriter(HfWriter):
    """The ``hf`` files plus sentence-transformers' modules (pooling, the head as a Dense, the cut, Normalize)."""

    name: ExportFormat = "sentence-transformers"
    full_width = False  # a Dense cuts to the exit's dim
    holds_heads = True  # the head becomes a Dense

    def require(self, verify: bool) -> None:
        if verify:
            require_sentence_transformers()

    def write_layout(self, job: ExportJob) -> None:
        write_sentence_transformers_layout(job.sub, job.folder, job.dim)


class OnnxWriter(FormatWriter):
    """One ONNX graph from token ids to the normalised embedding (+ ``model_int8.onnx`` with int8)."""

    name: ExportFormat = "onnx"
    onnx_options = True

    def require(self, verify: bool) -> None:
        from matryoshka2d.export.runtime import require_onnx

        require_onnx()

    def write(self, job: ExportJob) -> dict[str, Any]:
        from matryoshka2d.export.onnx import write_onnx

        # traced and checked in fp32 on the CPU, where onnxruntime runs it here; the long check text is
        # truncated on purpose, so the runtime's truncation notice is not shown
        with quiet_logger("matryoshka2d.export.runtime"):
            return write_onnx(job.sub.to("cpu", torch.float32), job.folder, dim=job.dim, opset=job.opset,
                              quantize=job.quantize, texts=job.texts, reference=job.reference, sts=job.sts)


class OpenVinoWriter(OnnxWriter):
    """That ONNX graph converted to OpenVINO IR."""

    name: ExportFormat = "openvino"

    def check(self, model: MatryoshkaEncoder, layer: int, quantize: str | None, opset: int | None) -> None:
        if quantize is not None:
            raise ValueError("quantize applies to the onnx format only (model_int8.onnx); for int8 export "
                             "--format onnx --quantize int8, or drop --quantize")
        super().check(model, layer, quantize, opset)

    def require(self, verify: bool) -> None:
        from matryoshka2d.export.runtime import require_openvino

        super().require(verify)
        require_openvino()

    def write(self, job: ExportJob) -> dict[str, Any]:
        from matryoshka2d.export.openvino import write_openvino

        with quiet_logger("matryoshka2d.export.runtime"):
            return write_openvino(job.sub.to("cpu", torch.float32), job.folder, dim=job.dim, opset=job.opset,
                                  texts=job.texts, reference=job.reference, sts=job.sts)


WRITERS: dict[str, FormatWriter] = {w.name: w for w in (HfWriter(), SentenceTransformersWriter(), OnnxWriter(),
                                                         OpenVinoWriter())}


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``matryoshka2d.json``."""
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def list_files(folder: Path) -> list[str]:
    """The folder's files, relative, without the metadata, card and manifest written last."""
    skip = {CONFIG_NAME, "README.md", MANIFEST_NAME}
    files = (p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    return sorted(p.relative_to(folder).as_posix() for p in files)
