"""One server from one spec: the model, the runner of its backend, the app.

``m2d serve`` builds one in its own process; each Ray Serve replica (:mod:`matryoshka2d.serve.ray_serve`) builds
its own from the same :class:`ServeSpec`, so a replica is the same app: API, limits, metrics, errors.

The backends are a table (:data:`BACKENDS`): ``torch`` (one mixed-depth pass per batch), ``onnx`` and
``openvino`` (every exit exported once under ``--export-dir`` and reused while it still reproduces the model).
``auto`` (:func:`default_backend`) is ``openvino`` where it is installed, else ``torch``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matryoshka2d.serve.config import ServeConfig

if TYPE_CHECKING:
    from matryoshka2d.data.datasets import ScoredPairs
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BF16_STS = "stsb"  # the STS set an OpenVINO export scores itself on, in f32 and bf16, before auto picks bf16


@dataclass(frozen=True)
class ServeSpec:
    """Everything a server process needs to build itself (picklable: it travels to Ray Serve replicas).

    Args:
        model: the model folder or name (``minilm``).
        config: the server's limits and options (its ``backend`` is resolved, never ``auto``).
        pooling, trust_remote_code, max_seq_length: how the model is loaded (``None``: the folder's).
        device: torch's device (``cpu``, ``cuda``, ``cuda:1``); the exported backends run on the CPU.
        threads: inference threads of the runner (``None``: the runtime's default).
        precision: OpenVINO's ``auto``, ``f32`` or ``bf16``.
        export_dir: where ``onnx`` / ``openvino`` keep their exported exits (``None``: a temporary folder).
        backend_why: why this backend runs (``/info`` and the start-up log say it).
    """

    model: str
    config: ServeConfig
    pooling: str | None = None
    trust_remote_code: bool = False
    max_seq_length: int | None = None
    device: str = "cpu"
    threads: int | None = None
    precision: str = "auto"
    export_dir: str | None = None
    backend_why: str = ""


def default_backend(*, device: str = "cpu", dtype: str = "fp32") -> tuple[str, str]:
    """``auto``: ``(backend, why)``, OpenVINO where it (and the ONNX exporter it converts from) is installed,
    unless torch's options ask for torch (a GPU, a reduced ``--dtype``)."""
    if device != "cpu" or dtype != "fp32":
        return "torch", f"auto: --device {device} --dtype {dtype} run on torch"
    missing = [name for name in ("openvino", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if not missing:
        return "openvino", "auto: openvino is installed (precision: see precision_reason)"
    return "torch", (f"auto: {', '.join(missing)} not installed (pip install 'matryoshka2d[openvino]' for the "
                     "faster openvino backend)")


def load_model(spec: ServeSpec) -> MatryoshkaEncoder:
    """The spec's model, loaded and made ready (:func:`prepare_model`)."""
    from matryoshka2d.encoder.model import MatryoshkaEncoder

    model = MatryoshkaEncoder.from_pretrained(spec.model, pooling=spec.pooling,
                                              trust_remote_code=spec.trust_remote_code)
    if spec.max_seq_length is not None:
        model.max_seq_length = spec.max_seq_length
    return prepare_model(model, spec)


def prepare_model(model: MatryoshkaEncoder, spec: ServeSpec) -> MatryoshkaEncoder:
    """``model`` in eval mode on the spec's device, its backbone in the spec's dtype (pooling, heads and
    normalisation stay fp32)."""
    import torch

    model = model.eval().to(spec.device)
    if spec.config.dtype != "fp32":
        model.backbone.to(getattr(torch, TORCH_DTYPES[spec.config.dtype]))
    return model


def check_spec(spec: ServeSpec) -> None:
    """What a backend cannot run, refused before the model loads.

    Raises:
        ValueError: a GPU asked of an exported backend, fp16 on the CPU, ``--precision`` for another backend.
        ImportError: the backend's extra is missing (the message names it).
    """
    backend = spec.config.backend
    if backend != "torch" and spec.device != "cpu":
        raise ValueError(f"--device {spec.device}: the {backend} backend runs on the CPU; pass --device cpu or "
                         "--backend torch")
    if spec.config.dtype == "fp16" and not spec.device.startswith("cuda"):
        raise ValueError(f"--dtype fp16 on --device {spec.device}: fp16 is for GPUs (--device cuda); on the CPU "
                         "pass --dtype bf16 or fp32")
    if spec.precision != "auto" and backend != "openvino":
        raise ValueError(f"--precision {spec.precision} is OpenVINO's; the {backend} backend has --dtype; drop "
                         "--precision or pass --backend openvino")
    if backend == "onnx":
        from matryoshka2d.export.runtime import require_onnx

        require_onnx()
    elif backend == "openvino":
        from matryoshka2d.export.runtime import require_onnx, require_openvino

        require_openvino()
        require_onnx()  # the IR is converted from the ONNX graph


def bf16_sts() -> ScoredPairs | None:
    """The STS set OpenVINO exports score bf16 on, when this CPU runs bf16 natively and the data is there."""
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.export.runtime import cpu_has_bf16

    if not cpu_has_bf16():
        return None
    try:
        return load_sts(BF16_STS)
    except (OSError, ValueError) as error:
        logger.warning("bf16 is not checked on %s (%s): auto precision then rests on the export's cosine check "
                       "alone; set M2D_DATA_DIR to a folder with %s/test.tsv", BF16_STS, error, BF16_STS)
        return None


def _torch_runner(model: MatryoshkaEncoder, spec: ServeSpec, folder: Callable[[], str]) -> Any:
    from matryoshka2d.serve.runners import TorchRunner

    return TorchRunner(model, threads=spec.threads)


def _onnx_runner(model: MatryoshkaEncoder, spec: ServeSpec, folder: Callable[[], str]) -> Any:
    from matryoshka2d.serve.runners import OnnxRunner

    return OnnxRunner.from_model(model, folder(), threads=spec.threads)


def _openvino_runner(model: MatryoshkaEncoder, spec: ServeSpec, folder: Callable[[], str]) -> Any:
    from matryoshka2d.serve.runners import OpenVinoRunner

    sts = bf16_sts() if spec.precision == "auto" else None
    return OpenVinoRunner.from_model(model, folder(), threads=spec.threads, precision=spec.precision, sts=sts)


BACKENDS: dict[str, Callable[[MatryoshkaEncoder, ServeSpec, Callable[[], str]], Any]] = {
    "torch": _torch_runner, "onnx": _onnx_runner, "openvino": _openvino_runner}


def make_runner(model: MatryoshkaEncoder, spec: ServeSpec, stack: contextlib.ExitStack) -> Any:
    """The runner of the spec's backend (exports made or reused first); temporary folders live as long as
    ``stack``."""
    backend = spec.config.backend

    def folder() -> str:
        if spec.export_dir:
            return spec.export_dir
        return stack.enter_context(tempfile.TemporaryDirectory(prefix=f"m2d-serve-{backend}-"))

    if backend != "torch":
        logger.info("%s backend: exporting (or reusing) the %d exits in %s", backend, model.num_layers,
                    spec.export_dir or "a temporary folder")
    runner = BACKENDS[backend](model, spec, folder)
    runner.why = spec.backend_why
    logger.info("backend %s", runner.describe())
    return runner


def build_app(spec: ServeSpec, stack: contextlib.ExitStack, *, model: MatryoshkaEncoder | None = None) -> Any:
    """The FastAPI app of ``spec`` (``model``: already loaded and prepared, else loaded here)."""
    from matryoshka2d.serve.app import create_app

    check_spec(spec)
    model = load_model(spec) if model is None else model
    runner = make_runner(model, spec, stack)
    return create_app(model, spec.config, threads=spec.threads, runner=runner)
