"""OpenVINO export of one exit: the ONNX graph of :mod:`matryoshka2d.export.onnx`, converted to OpenVINO IR.

``openvino.convert_model`` reads the traced ONNX graph directly (no optimum-intel, so no transformers pin);
``openvino_model.xml`` / ``.bin`` keep fp32 weights. The folder is accepted only if OpenVINO in f32 reproduces
the source exit within :data:`MAX_ABS_DIFF`. On CPUs with native bf16 (AMX / AVX-512 bf16) the export records
bf16's agreement with f32 (and, given an STS set, bf16's Spearman beside the source's): the facts by which
:func:`matryoshka2d.export.runtime.auto_precision` lets ``auto`` run it in bf16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka2d.evaluation.metrics import sts_spearman
from matryoshka2d.export.checks import ScoredPairsLike
from matryoshka2d.export.onnx import write_onnx
from matryoshka2d.export.runtime import OPENVINO_FILE, OpenVinoEncoder, cpu_has_bf16, require_openvino
from matryoshka2d.truncation import cosine

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-4  # OpenVINO (f32) vs the source exit, per coordinate of the normalised embedding


def write_openvino(model: MatryoshkaEncoder, folder: Path, *, dim: int, opset: int | None, texts: list[str],
                   reference: np.ndarray, sts: ScoredPairsLike | None) -> dict[str, Any]:
    """Write ``openvino_model.xml`` / ``.bin``, tokenizer and config of the truncated ``model``.

    Args:
        model: the encoder already truncated to the exit's layer.
        folder: where to write.
        dim: the exit's width.
        opset: the ONNX opset of the intermediate graph (``None``: the ONNX default).
        texts: check texts; ``reference`` holds the source exit's embeddings of them.
        sts: optional STS set on which OpenVINO's Spearman is compared with the source's.

    Returns:
        The ``export`` record for ``matryoshka2d.json``.

    Raises:
        ImportError: openvino is not installed.
        ValueError: the graph cannot be traced, or OpenVINO does not reproduce the source exit.
    """
    require_openvino()
    import openvino as ov

    onnx_info = write_onnx(model, folder, dim=dim, opset=opset, quantize=None, texts=texts, reference=reference,
                           sts=None)
    onnx_path = folder / "model.onnx"
    ov.save_model(ov.convert_model(str(onnx_path)), str(folder / OPENVINO_FILE), compress_to_fp16=False)
    onnx_path.unlink()  # the IR is the model now; the ONNX graph was its intermediate
    f32 = OpenVinoEncoder(folder, precision="f32", max_seq_length=model.max_seq_length)
    got = f32.encode(texts)
    check: dict[str, Any] = {
        "openvino_f32_vs_source_max_abs_diff": float(np.abs(got - reference).max()),
        "openvino_f32_vs_source_min_cosine": round(float(cosine(got, reference).min()), 7),
        "onnxruntime_vs_pytorch_max_abs_diff": onnx_info["verification"]["onnxruntime_vs_pytorch_max_abs_diff"],
    }
    if check["openvino_f32_vs_source_max_abs_diff"] > MAX_ABS_DIFF:
        raise ValueError(f"OpenVINO's embeddings differ from the source exit by "
                         f"{check['openvino_f32_vs_source_max_abs_diff']:.2e} (limit {MAX_ABS_DIFF:.0e}); "
                         "export --format onnx instead")
    bf16 = OpenVinoEncoder(folder, precision="bf16", max_seq_length=model.max_seq_length) if cpu_has_bf16() else None
    if bf16 is not None:
        cos = cosine(bf16.encode(texts), got)
        check.update({"openvino_bf16_vs_f32_mean_cosine": round(float(cos.mean()), 7),
                      "openvino_bf16_vs_f32_min_cosine": round(float(cos.min()), 7)})
    if sts is not None:  # bf16's STS score is what auto precision (export.runtime.auto_precision) reads
        check[f"{sts.name}_spearman_openvino_f32"] = round(sts_spearman(f32.encode, sts), 4)
        if bf16 is not None:
            check[f"{sts.name}_spearman_openvino_bf16"] = round(sts_spearman(bf16.encode, sts), 4)
        check[f"{sts.name}_spearman_source"] = round(
            sts_spearman(lambda t: model.encode(t, layer=model.num_layers, dim=dim), sts), 4)
    info: dict[str, Any] = {
        "format": "openvino", "converter": f"openvino.convert_model {ov.__version__} from the ONNX graph "
        f"({onnx_info['exporter']}, opset {onnx_info['opset']})", "inputs": onnx_info["inputs"],
        "output": onnx_info["output"], "weights": "fp32", "verification": check,
        **({"exit_head": onnx_info["exit_head"]} if "exit_head" in onnx_info else {}),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
    }
    logger.info("OpenVINO IR checked: max |OpenVINO f32 - source| = %.2e",
                check["openvino_f32_vs_source_max_abs_diff"])
    return info
