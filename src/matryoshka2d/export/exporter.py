"""Export one exit ``(layer, dim)`` as a standalone model folder that other tools load directly.

Formats:

- ``hf``: the physically truncated backbone (only blocks ``1..layer`` stored, the config says the new
  depth), its tokenizer and ``matryoshka2d.json`` whose default exit is ``(layer, dim)``. A plain
  transformers folder cannot hold an exit head, so an exit with a head is refused in this format.
- ``sentence-transformers``: the ``hf`` files plus the sentence-transformers layout (``modules.json``,
  ``1_Pooling``, a ``Dense`` holding the exit's head when it has one, a ``Dense`` that keeps the first
  ``dim`` coordinates when ``dim < D`` (or averages CLS and mean for ``cls_avg``), then ``Normalize``), so
  ``SentenceTransformer(folder)`` returns the exit's L2-normalised ``dim``-dim embeddings.
- ``onnx``: one graph from token ids to the normalised embedding, the exit's head included (see
  :mod:`matryoshka2d.export.onnx`).
- ``openvino``: that graph converted to OpenVINO IR (see :mod:`matryoshka2d.export.openvino`).

Every folder's ``config.json`` carries ``is_matryoshka`` and ``matryoshka_dimensions`` (the fields vLLM and
SGLang read to accept a request's ``dimensions``) and ``matryoshka2d_document_space``: the source's document exit,
the query exits that search an index built there, and which path this folder encodes (``input_type``). The same
record is in ``matryoshka2d.json`` (``exported_from.document_space``) and in the model card.

``input_type="query"`` exports the own query path of an exit aligned by ``m2d align``
(:meth:`~matryoshka2d.encoder.model.MatryoshkaEncoder.query_encoder`: its adapters merged, its query head
folded in): a standalone model for encoding queries against the source's document index.

The ``hf`` and ``sentence-transformers`` folders also keep the heads of layers ``1..layer`` in
``exit_heads.safetensors`` (see :mod:`matryoshka2d.encoder.heads`), so our loader reproduces every kept exit.

Every export is checked before it is moved into place: the folder is loaded back the way its users will
load it and must reproduce the source exit; the numbers are recorded in ``matryoshka2d.json`` and in the
model card (see :mod:`matryoshka2d.export.checks`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matryoshka2d.export.checks import VERIFY_TEXTS, ScoredPairsLike, quiet_logger
from matryoshka2d.export.formats import WRITERS, ExportJob, write_meta
from matryoshka2d.export.hf import dropped_pooler, installed_version, write_config_fields
from matryoshka2d.io.atomic import atomic_dir
from matryoshka2d.io.manifest import FORMAT_VERSION, library_versions, write_manifest
from matryoshka2d.io.modelcard import read_bench_results, read_eval_results, select_layers, write_model_card
from matryoshka2d.vocab import FORMAT_ALIASES, FORMATS, INPUT_TYPES, ExportFormat, InputType, Quantization, check_choice

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)


def check_format(fmt: str) -> ExportFormat:
    """Return the canonical format name (``st`` is accepted for ``sentence-transformers``).

    Raises:
        ValueError: an unknown format.
    """
    canonical = FORMAT_ALIASES.get(fmt, fmt)
    if canonical not in FORMATS:
        check_choice("export format", fmt, FORMATS)
    return canonical  # type: ignore[return-value]


def export_model(
    model: MatryoshkaEncoder,
    path: str | os.PathLike[str],
    *,
    layer: int | None = None,
    dim: int | None = None,
    format: str = "hf",
    overwrite: bool = False,
    quantize: Quantization | None = None,
    opset: int | None = None,
    verify: bool = True,
    eval_results: str | os.PathLike[str] | dict[str, Any] | None = None,
    bench_results: str | os.PathLike[str] | dict[str, Any] | None = None,
    sts: ScoredPairsLike | str | None = None,
    source: str | None = None,
    input_type: InputType = "document",
) -> Path:
    """Write exit ``(layer, dim)`` of ``model`` to ``path`` as a standalone folder, atomically.

    Args:
        model: the source encoder (left unchanged).
        path: the output folder.
        layer: exit layer in ``1..N``; ``None`` means the model's default exit.
        dim: embedding width in ``1..D``; ``None`` means the model's default width.
        format: ``hf``, ``sentence-transformers`` (or ``st``), ``onnx`` or ``openvino``.
        overwrite: replace an existing non-empty folder.
        quantize: ``"int8"`` also writes ``model_int8.onnx`` (dynamic quantisation; onnx only).
        opset: ONNX opset (onnx and openvino; see :data:`matryoshka2d.export.onnx.DEFAULT_OPSET`).
        verify: load the folder back (our loader; sentence-transformers for that format) and compare it
            with the source exit. The ONNX graph is always checked with onnxruntime.
        eval_results: an ``m2d eval`` results JSON (or dict) for the card's layer x dim table.
        bench_results: an ``m2d bench`` results JSON (or dict) for the card's speed table.
        sts: an STS set (``ScoredPairs`` or a set name for :func:`matryoshka2d.data.datasets.load_sts`) on which the
            exported folder's Spearman is compared with the source exit's (and int8's with fp32's).
        source: the name or folder ``model`` was loaded from (recorded as ``exported_from.source``; default:
            the model's own ``source``, which for a trained model is the model it was trained from).
        input_type: ``"document"`` (the shared path) or ``"query"``: the exit's own query path (an exit aligned
            by ``m2d align``; the folder then encodes queries for the source's document index).

    Returns:
        The output folder.

    Raises:
        ValueError: layer/dim out of range, unknown format, quantize/opset given for another format, ``hf``
            for an exit with a head, a graph that cannot be traced, an export that does not reproduce
            the source exit, or ``input_type="query"`` at an exit without its own query path.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ImportError: a missing optional dependency (the message names the extra to install).
    """
    fmt = check_format(format)
    n, d = model.check_layer(layer), model.check_dim(dim)
    if input_type != "document":
        check_choice("input_type", input_type, INPUT_TYPES)
    space = {**model.document_space, "exit": n, "input_type": input_type}
    if input_type == "query":  # the exit's own path as a standalone model (ValueError if it has none)
        model = model.query_encoder(n)
    writer = WRITERS[fmt]
    writer.check(model, n, quantize, opset)
    writer.require(verify)
    final = Path(path)
    if final.is_dir() and any(final.iterdir()) and not overwrite:  # fail before any slow work
        raise FileExistsError(f"{final} already exists and is not empty; pass --overwrite to replace it")
    meta = _export_metadata(model, n, d, fmt, eval_results, bench_results, source)
    meta["exported_from"]["document_space"] = space
    pairs = _resolve_sts(sts)
    texts = list(VERIFY_TEXTS)
    with quiet_logger("matryoshka2d.encoder.batching"):  # the long check text is truncated on purpose
        reference = model.encode(texts, layer=n, dim=d)
    with atomic_dir(final, overwrite=overwrite) as tmp:
        job = ExportJob(model, model.truncate(n).eval(), tmp, n, d, meta, texts, reference, pairs,
                        quantize=quantize, opset=opset, verify=verify)
        meta["export"] = writer.write(job)
        write_config_fields(tmp, {"matryoshka2d_document_space": space})
        if pairs is not None:
            meta["export"]["sts"] = pairs.name
        write_meta(tmp, meta)
        write_model_card(tmp, meta, name=final.name)
        write_manifest(tmp)  # last: size and SHA-256 of every file above, checked by our loader
    logger.info("exported layer %d, dim %d of %s as %s to %s", n, d, meta["exported_from"]["source"], fmt,
                final)
    return final


# ----------------------------------------------------------------------------------- metadata
def _export_metadata(model: MatryoshkaEncoder, n: int, d: int, fmt: str, eval_results: Any,
                     bench_results: Any, source: str | None = None) -> dict[str, Any]:
    """The exported folder's ``matryoshka2d.json`` (the ``export`` key is added once written).

    The export's own facts (depth, width, default exit, pooling) come last, so a fact the source model
    recorded about itself (a trained model's ``num_layers``) never overrides them.
    """
    inherited = {k: v for k, v in model.metadata.items()
                 if k not in ("default_layer", "default_dim", "exported_from", "export", "truncated_from",
                              "document_space", "query_encoder_of")}
    if eval_results is not None:
        inherited["evaluation"] = read_eval_results(eval_results)
    if bench_results is not None:
        inherited["benchmark"] = read_bench_results(bench_results)
    for key, field in (("evaluation", "results"), ("benchmark", "records")):
        if inherited.get(key):
            inherited[key] = select_layers(inherited[key], field, n)
    if inherited.get("trained_layers"):
        inherited["trained_layers"] = [m for m in inherited["trained_layers"] if m <= n]
    versions = library_versions()
    extras = {"sentence-transformers": ("sentence_transformers",), "onnx": ("onnx", "onnxruntime"),
              "openvino": ("onnx", "openvino")}
    for package in extras.get(fmt, ()):
        versions[package] = installed_version(package) or "not installed"
    return {
        **inherited,
        "format_version": FORMAT_VERSION,
        "pooling": model.pooling,
        "max_seq_length": model.max_seq_length,
        "num_layers": n,
        "hidden_size": model.hidden_size,
        "default_layer": n,
        "default_dim": d,
        "architecture": model.backbone.config.model_type,
        **({"transformers_kwargs": {"add_pooling_layer": False}} if dropped_pooler(model) else {}),
        "exported_from": {
            "source": str(source or model.metadata.get("source", "unknown")),
            "layer": n,
            "dim": d,
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
        },
        "library_versions": versions,
    }


def _resolve_sts(sts: ScoredPairsLike | str | None) -> ScoredPairsLike | None:
    if sts is None or not isinstance(sts, str):
        return sts
    from matryoshka2d.data.datasets import load_sts

    return load_sts(sts)


