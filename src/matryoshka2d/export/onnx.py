"""ONNX export of one exit: token ids -> pooled, truncated, L2-normalised embedding in a single graph.

The graph is traced with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``),
which needs no package beyond ``onnx``; the newer ``dynamo=True`` exporter needs ``onnxscript``. Batch and
sequence axes are dynamic. The export is accepted only if onnxruntime reproduces PyTorch on batches of
other shapes than the traced one (a trace that baked a shape or a branch fails this check).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from matryoshka2d.encoder.heads import apply_head
from matryoshka2d.encoder.pooling import PoolingMode, pool
from matryoshka2d.evaluation.metrics import sts_spearman
from matryoshka2d.export.checks import ScoredPairsLike, quiet_logger
from matryoshka2d.export.hf import runtime_dims, write_runtime_fields, write_tokenizer
from matryoshka2d.export.runtime import OUTPUT_NAME, OnnxEncoder, require_onnx
from matryoshka2d.truncation import cosine, truncate

__all__ = ["DEFAULT_OPSET", "ExitGraph", "OnnxEncoder", "require_onnx", "write_onnx"]

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
MAX_ABS_DIFF = 1e-4  # onnxruntime vs PyTorch, per coordinate of the normalised embedding
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript-based)"


class ExitGraph(nn.Module):
    """A truncated backbone followed by pooling, the exit's head (if any), truncation to ``dim`` and L2
    normalisation."""

    def __init__(self, backbone: nn.Module, pooling: PoolingMode, dim: int, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling: PoolingMode = pooling
        self.dim = dim
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs, return_dict=True).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling).float()
        if self.head is not None:
            pooled = apply_head(self.head, pooled)
        return truncate(pooled, self.dim)


def graph_input_names(model: MatryoshkaEncoder) -> list[str]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` when the architecture and tokenizer use it."""
    names = ["input_ids", "attention_mask"]
    params = inspect.signature(model.backbone.forward).parameters
    if "token_type_ids" in params and "token_type_ids" in getattr(model.tokenizer, "model_input_names", ()):
        names.append("token_type_ids")
    return names


def write_onnx(model: MatryoshkaEncoder, folder: Path, *, dim: int, opset: int | None,
               quantize: str | None, texts: list[str], reference: np.ndarray,
               sts: ScoredPairsLike | None) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model_int8.onnx``), tokenizer and config of the truncated ``model``.

    Args:
        model: the encoder already truncated to the exit's layer (its last exit's head goes into the graph).
        folder: where to write.
        dim: the exit's width.
        opset: ONNX opset; ``None`` means :data:`DEFAULT_OPSET`.
        quantize: ``"int8"`` or ``None``.
        texts: check texts; ``reference`` holds the source exit's embeddings of them.
        sts: optional STS set on which fp32 and int8 Spearman are compared with the source's.

    Returns:
        The ``export`` record for ``matryoshka2d.json``.

    Raises:
        ValueError: the graph cannot be traced or onnxruntime does not reproduce PyTorch within 1e-4.
    """
    opset = int(opset or DEFAULT_OPSET)
    names = graph_input_names(model)
    config: Any = model.backbone.config
    layer = model.num_layers
    head = model.exit_heads[str(layer)] if layer in model.exit_head_layers else None
    graph = ExitGraph(model.backbone, model.pooling, dim, head).eval()
    path = folder / "model.onnx"
    _trace(graph, _features(model, texts[:2], names), names, path, opset, config.model_type)
    write_tokenizer(model, folder)
    config.save_pretrained(folder)
    write_runtime_fields(folder, runtime_dims(model, dim))  # the graph returns ``dim`` coordinates
    fp32 = OnnxEncoder(folder, max_seq_length=model.max_seq_length)
    check = _check_graph(fp32, graph, model, texts, names)
    end_to_end = fp32.encode(texts)
    check.update({"onnxruntime_vs_source_max_abs_diff": float(np.abs(end_to_end - reference).max()),
                  "onnxruntime_vs_source_min_cosine": round(float(cosine(end_to_end, reference).min()), 7)})
    if check["onnxruntime_vs_source_max_abs_diff"] > MAX_ABS_DIFF:
        raise ValueError(f"the ONNX folder's embeddings differ from the source exit by "
                         f"{check['onnxruntime_vs_source_max_abs_diff']:.2e} (limit {MAX_ABS_DIFF:.0e}); "
                         "the saved tokenizer or max_seq_length disagree with the model")
    info: dict[str, Any] = {"format": "onnx", "exporter": EXPORTER, "opset": opset, "inputs": names,
                            "output": f"{OUTPUT_NAME} (batch, {dim}), L2-normalised", "verification": check}
    if head is not None:
        info["exit_head"] = f"{model.exit_head_kind} head of layer {layer}, inside the graph"
    pairs = [*sts.sentences1, *sts.sentences2] if sts is not None else []
    sample = list(dict.fromkeys([*texts, *pairs]))
    fp32_emb = _Lookup(sample, fp32.encode(sample))
    if sts is not None:
        check[f"{sts.name}_spearman_onnx_fp32"] = round(sts_spearman(fp32_emb, sts), 4)
        check[f"{sts.name}_spearman_source"] = round(
            sts_spearman(lambda t: model.encode(t, layer=model.num_layers, dim=dim), sts), 4)
    if quantize == "int8":
        info["quantization"] = _quantize_int8(folder, fp32_emb, sample, sts, model.max_seq_length)
    info["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
    logger.info("ONNX graph checked: max |onnxruntime - PyTorch| = %.2e",
                check["onnxruntime_vs_pytorch_max_abs_diff"])
    return info


def _features(model: MatryoshkaEncoder, texts: Sequence[str],
              names: Sequence[str]) -> dict[str, torch.Tensor]:
    features = model.tokenize(texts)
    return {k: features[k] for k in names}


@contextlib.contextmanager
def captured_stdout(what: str) -> Iterator[None]:
    """Send what C++ and Python print on file descriptor 1 to a temporary file, logged at DEBUG.

    The TorchScript exporter prints the whole graph (100 kB for a small BERT) on stdout when it fails;
    the error that follows is the message the user needs.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            size = sink.tell()
            if size:
                sink.seek(0)
                logger.debug("%s printed %d bytes on stdout, starting: %s", what, size,
                             sink.read(2000).decode("utf-8", "replace"))


def _trace(graph: ExitGraph, example: dict[str, torch.Tensor], names: list[str], path: Path, opset: int,
           model_type: str) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[OUTPUT_NAME] = {0: "batch"}
    extra: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        extra["dynamo"] = False  # the TorchScript-based exporter: needs no onnxscript
    try:
        with warnings.catch_warnings(), torch.no_grad(), captured_stdout("torch.onnx.export"):
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks: the onnxruntime check decides
            torch.onnx.export(graph, tuple(example[k] for k in names), str(path), input_names=names,
                              output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True, **extra)
    except Exception as e:  # the exporter raises many error types; all mean "this graph cannot be traced"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"could not trace architecture {model_type!r} into ONNX opset {opset} with torch "
            f"{torch.__version__} ({type(e).__name__}: {first[:300]}); export --format hf or "
            "sentence-transformers instead, or try another --opset"
        ) from e


def _check_graph(encoder: OnnxEncoder, graph: ExitGraph, model: MatryoshkaEncoder, texts: list[str],
                 names: list[str]) -> dict[str, Any]:
    """onnxruntime vs PyTorch on identical token batches of shapes other than the traced one."""
    batches = [texts, texts[3:4], texts[-1:], texts[:3]]
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            features = _features(model, batch, names)
            expected = graph(*(features[k] for k in names)).numpy()
            got = encoder.run({k: v.numpy() for k, v in features.items()})
            if got.shape != expected.shape:
                raise ValueError(f"the ONNX graph returns shape {got.shape} for a batch where PyTorch "
                                 f"returns {expected.shape}; the trace baked a shape, export --format hf "
                                 "instead")
            worst = max(worst, float(np.abs(got - expected).max()))
    if worst > MAX_ABS_DIFF:
        raise ValueError(
            f"onnxruntime differs from PyTorch by {worst:.2e} (limit {MAX_ABS_DIFF:.0e}) on batches shaped "
            f"unlike the traced one: architecture {_model_type(model)!r} does not trace "
            "faithfully; export --format hf or sentence-transformers instead"
        )
    return {"onnxruntime_vs_pytorch_max_abs_diff": worst, "checked_batch_shapes":
            [list(_features(model, b, names)["input_ids"].shape) for b in batches]}


class _Lookup:
    """Embeddings computed once, served by text (so each STS sentence is encoded once per graph)."""

    def __init__(self, texts: list[str], embeddings: np.ndarray) -> None:
        self.row = {t: i for i, t in enumerate(texts)}
        self.embeddings = embeddings

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.embeddings[[self.row[t] for t in texts]]


def _model_type(model: MatryoshkaEncoder) -> str:
    config: Any = model.backbone.config
    return str(config.model_type)


def _quantize_int8(folder: Path, fp32: _Lookup, sample: list[str], sts: ScoredPairsLike | None,
                   max_seq_length: int) -> dict[str, Any]:
    """Dynamic int8 weight quantisation (per output channel); its agreement with fp32 (cosine, Spearman).

    Per-channel scales matter: on MiniLM (3, 128) per-tensor scales gave cosine 0.965 to fp32 (min 0.92),
    per-channel 0.995 (min 0.989) at the same size.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = folder / "model_int8.onnx"
    with quiet_logger(None):  # onnxruntime.quantization logs per-tensor notes on the root logger
        quantize_dynamic(str(folder / "model.onnx"), str(target), weight_type=QuantType.QInt8,
                         per_channel=True)
    runner = OnnxEncoder(folder, file=target.name, max_seq_length=max_seq_length)
    int8 = _Lookup(sample, runner.encode(sample))
    a, b = fp32(sample), int8(sample)
    cos = cosine(a, b)
    report: dict[str, Any] = {"file": target.name, "weight_type": "QInt8, per channel (dynamic)",
                              "cosine_to_fp32_mean": round(float(cos.mean()), 6),
                              "cosine_to_fp32_min": round(float(cos.min()), 6), "sentences": len(sample),
                              "size_mb": round(target.stat().st_size / 2**20, 2)}
    if sts is not None:
        fp32_rho, int8_rho = sts_spearman(fp32, sts), sts_spearman(int8, sts)
        report.update({f"{sts.name}_spearman_fp32": round(fp32_rho, 4),
                       f"{sts.name}_spearman_int8": round(int8_rho, 4),
                       f"{sts.name}_spearman_change": round(int8_rho - fp32_rho, 4)})
    return report
