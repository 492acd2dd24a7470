"""Running an exported exit without torch or transformers: onnxruntime or OpenVINO, tokenizers, numpy.

:func:`load_exported` opens an ``m2d export --format onnx|openvino`` folder; the encoders batch with
:class:`matryoshka2d.encoder.tokenization.TokenBatches` (the one batching loop) and tokenize with
:class:`~matryoshka2d.encoder.tokenization.TokenizerFile`, so ``m2d encode EXPORTED_DIR`` starts in a fraction
of the time the torch path needs. Nothing here imports torch (a test pins it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.encoder.tokenization import TokenBatches, TokenizerFile, check_texts
from matryoshka2d.vocab import RUNTIME_PRECISIONS, install_hint

logger = logging.getLogger(__name__)

OUTPUT_NAME = "sentence_embedding"  # the graph's output: (batch, dim), L2-normalised
OPENVINO_FILE = "openvino_model.xml"  # with openvino_model.bin beside it
INT8_FILES = {"onnx": "model_int8.onnx", "openvino": "openvino_model_int8.xml"}
FP32_FILES = {"onnx": "model.onnx", "openvino": OPENVINO_FILE}


def require_onnx() -> None:
    """Raises: ImportError naming the ``onnx`` extra when onnx or onnxruntime is missing."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f'ONNX export needs {" and ".join(missing)}: {install_hint("onnx")}')


def require_openvino() -> None:
    """Raises: ImportError naming the ``openvino`` extra when openvino is missing."""
    if importlib.util.find_spec("openvino") is None:
        raise ImportError(f"the OpenVINO format needs openvino: {install_hint('openvino')}")


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """:class:`TokenizerFile` when the folder has ``tokenizer.json`` (no transformers), else transformers'."""
    if (Path(folder) / "tokenizer.json").is_file():
        return TokenizerFile(folder)
    from transformers import AutoTokenizer  # a slow-only tokenizer: transformers is needed after all

    return AutoTokenizer.from_pretrained(str(folder))


class ExportedEncoder:
    """An exported exit's graph and tokenizer; subclasses run one tokenized batch (:meth:`run`).

    Args:
        folder: the export folder.
        max_seq_length: tokens per sentence; ``None`` reads ``matryoshka2d.json`` (else the tokenizer's limit).
    """

    file = ""

    def __init__(self, folder: str | os.PathLike[str], *, max_seq_length: int | None = None) -> None:
        self.folder = Path(folder)
        self.tokenizer = load_tokenizer(folder)
        meta = read_export_meta(folder) or {}
        self.max_seq_length = int(max_seq_length or meta.get("max_seq_length") or self.tokenizer.model_max_length)
        self.input_names: list[str] = []

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Embeddings of one tokenized batch."""
        raise NotImplementedError

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """``(len(texts), dim)`` float32 embeddings, L2-normalised, in input order.

        Raises:
            ValueError: no texts, or a bad batch size.
        """
        batches = TokenBatches(self.tokenizer, check_texts(texts), batch_size=batch_size,
                               max_length=self.max_seq_length)
        out: np.ndarray | None = None
        for rows, emb in self._embed(batches):
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[rows] = emb
        if batches.num_truncated:
            logger.info("%d text(s) were truncated to %d tokens", batches.num_truncated, self.max_seq_length)
        return out  # type: ignore[return-value]

    def _embed(self, batches: TokenBatches) -> Iterable[tuple[Any, np.ndarray]]:
        """``(rows, embeddings)`` of every batch, in any order."""
        return ((rows, self.run(features)) for rows, features in batches)


class OnnxEncoder(ExportedEncoder):
    """Run an exported ONNX folder with onnxruntime (all graph optimisations on, the default).

    Args:
        folder: the export folder (``model.onnx`` and the tokenizer).
        file: the graph inside it, e.g. ``model_int8.onnx``.
        session_options: an ``onnxruntime.SessionOptions``; ``None`` builds one with ``threads``.
        max_seq_length: tokens per sentence; ``None`` reads the folder's.
        threads: intra-op threads when ``session_options`` is ``None`` (``None``: onnxruntime's default).
    """

    def __init__(self, folder: str | os.PathLike[str], *, file: str = "model.onnx", session_options: Any = None,
                 max_seq_length: int | None = None, threads: int | None = None) -> None:
        require_onnx()
        import onnxruntime as ort

        super().__init__(folder, max_seq_length=max_seq_length)
        if session_options is None:
            session_options = ort.SessionOptions()
            if threads:
                session_options.intra_op_num_threads = int(threads)
                session_options.inter_op_num_threads = 1
        self.file = file
        self.session = ort.InferenceSession(str(Path(folder) / file), sess_options=session_options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {k: features[k] for k in self.input_names})[0]


BF16_MIN_COSINE = 0.999  # bf16 vs f32 on the export's check texts, the least a bf16 default needs
BF16_MAX_STS_DROP = 0.2  # bf16's STS Spearman (x100, as recorded) at most this far from the source's


def cpu_has_bf16() -> bool:
    """True when OpenVINO's CPU plugin reports bf16 among its optimisation capabilities (AMX, AVX-512 bf16)."""
    require_openvino()
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def auto_precision(meta: dict[str, Any] | None) -> tuple[str, str]:
    """The precision ``auto`` means for an OpenVINO export, and why: the one rule of the library, the CLI and
    the server.

    bf16 where the CPU runs it natively and every bf16 fact the export recorded holds (the cosine to f32 on its
    check texts >= :data:`BF16_MIN_COSINE`; an STS set's Spearman within :data:`BF16_MAX_STS_DROP` of the
    source's, where the export measured one); f32 otherwise.

    Args:
        meta: the export's ``matryoshka2d.json`` (:func:`read_export_meta`).

    Returns:
        ``("bf16" | "f32", reason)``.
    """
    if not cpu_has_bf16():
        return "f32", "this CPU has no native bf16"
    check = ((meta or {}).get("export") or {}).get("verification") or {}
    cosine = check.get("openvino_bf16_vs_f32_min_cosine")
    if cosine is not None and cosine < BF16_MIN_COSINE:
        return "f32", f"the export's bf16 min cosine to f32 is {cosine} (< {BF16_MIN_COSINE})"
    facts = [f"native bf16; bf16 min cosine to f32 {cosine}" if cosine is not None else "native bf16"]
    suffix = "_spearman_openvino_bf16"
    for key in sorted(k for k in check if k.endswith(suffix)):
        name = key[: -len(suffix)]
        source = check.get(f"{name}_spearman_source")
        if source is None:
            continue
        drop = float(source) - float(check[key])
        if abs(drop) > BF16_MAX_STS_DROP:
            return "f32", (f"the export's bf16 {name} Spearman is {check[key]} against the source's {source} "
                           f"(more than {BF16_MAX_STS_DROP} points apart)")
        facts.append(f"{name} Spearman bf16 {check[key]} vs source {source}")
    if len(facts) == 1:
        facts.append("no STS check recorded in the export")
    return "bf16", "; ".join(facts)


def auto_streams(threads: int | None, batches: int) -> int:
    """OpenVINO streams for ``batches`` batches: one batch runs alone on every thread (LATENCY); more than one
    run one stream per thread (THROUGHPUT), ``threads`` or the machine's CPUs. The rule of the library, the CLI
    and the server (which has batches in flight over its life).
    """
    return max(1, threads or os.cpu_count() or 1) if batches > 1 else 1


class OpenVinoEncoder(ExportedEncoder):
    """Run an exported OpenVINO folder (``openvino_model.xml`` + ``.bin``) on the CPU.

    Args:
        folder: the export folder.
        file: the IR inside it.
        precision: ``f32`` (exact), ``bf16``, or ``auto`` (:func:`auto_precision`: bf16 where the CPU runs it
            natively and the export's recorded bf16 checks hold, else f32). ``precision`` is what was resolved,
            ``precision_reason`` why.
        threads: inference threads, all streams together (``None``: OpenVINO's default).
        max_seq_length: tokens per sentence; ``None`` reads the folder's.
        streams: batches in flight at once. ``None`` (default): :func:`auto_streams` for each :meth:`encode`
            (one batch: one stream on all threads, OpenVINO's LATENCY mode; more: one stream per thread,
            THROUGHPUT mode, each mode compiled once when first needed). An int fixes it: ``1`` is LATENCY;
            more is THROUGHPUT with that many streams sharing the threads, batches queued through an
            ``AsyncInferQueue`` while the next ones are tokenised. The numbers are the same, only the schedule
            differs (docs/benchmarks.md measures it).
    """

    def __init__(self, folder: str | os.PathLike[str], *, file: str = OPENVINO_FILE, precision: str = "auto",
                 threads: int | None = None, max_seq_length: int | None = None, streams: int | None = None) -> None:
        require_openvino()
        import openvino as ov

        super().__init__(folder, max_seq_length=max_seq_length)
        if precision not in RUNTIME_PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r} is not f32, bf16 or auto; pass one of them")
        if streams is not None and (isinstance(streams, bool) or not isinstance(streams, int)
                                    or not 1 <= streams <= 64):
            raise ValueError(f"OpenVINO streams {streams!r} is out of range 1..64; pass 1 (one batch at a time), "
                             "e.g. the thread count, or None (automatic)")
        if precision == "auto":
            self.precision, self.precision_reason = auto_precision(read_export_meta(folder))
        else:
            self.precision, self.precision_reason = precision, "asked for"
        self.file, self.threads, self.streams = file, threads, streams
        self._core = ov.Core()
        self._model = self._core.read_model(str(Path(folder) / file))
        self._compiled: dict[int, Any] = {}
        self._queues: dict[int, Any] = {}
        self.compiled = self.compile(streams or 1)
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output = self.compiled.output(OUTPUT_NAME)
        self.last_streams: int | None = None  # the streams of the last encode call

    def compile(self, streams: int) -> Any:
        """The model compiled for ``streams`` streams at this precision and thread count (compiled once)."""
        if streams not in self._compiled:
            import openvino as ov

            config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                                      "INFERENCE_PRECISION_HINT": self.precision}
            if streams > 1:
                config["NUM_STREAMS"] = str(streams)
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = int(self.threads)
            self._compiled[streams] = self._core.compile_model(self._model, "CPU", config)
            if streams > 1:
                self._queues[streams] = ov.AsyncInferQueue(self._compiled[streams], streams)
        return self._compiled[streams]

    def run(self, features: dict[str, np.ndarray], request: Any = None) -> np.ndarray:
        """Embeddings of one tokenized batch, on ``request`` (one of :meth:`compile`'s models'; default: the
        encoder's own, which only one thread may use at a time)."""
        request = self.request if request is None else request
        result = request.infer({k: features[k] for k in self.input_names}, share_inputs=True)
        return np.array(result[self.output], dtype=np.float32)  # a copy: the request reuses its buffer

    def _embed(self, batches: TokenBatches) -> Iterable[tuple[Any, np.ndarray]]:
        """With more than one stream, up to that many batches in flight at once (results in completion order)."""
        streams = self.streams
        if streams is None:
            streams = auto_streams(self.threads, -(-len(batches) // batches.batch_size))
        self.last_streams = streams
        if streams == 1:
            return super()._embed(batches)
        self.compile(streams)
        queue = self._queues[streams]
        results: list[tuple[Any, np.ndarray]] = []
        errors: list[BaseException] = []
        output = self.output  # the callback holds no reference to this encoder (the queue would keep it alive)

        def done(request: Any, rows: Any) -> None:  # in an OpenVINO thread; list.append is atomic
            try:
                results.append((rows, np.array(request.get_tensor(output).data, dtype=np.float32)))
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(error)

        queue.set_callback(done)
        for rows, features in batches:
            queue.start_async({k: features[k] for k in self.input_names}, userdata=rows)
        queue.wait_all()
        if errors:
            raise errors[0]
        return results


def read_export_meta(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``matryoshka2d.json`` of ``folder`` (``None`` when absent or unreadable)."""
    path = Path(folder) / "matryoshka2d.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def exported_format(folder: str | os.PathLike[str]) -> str | None:
    """``onnx`` or ``openvino`` when ``folder`` is such an export of ours (by its ``matryoshka2d.json``)."""
    if not Path(folder).is_dir():
        return None
    fmt = ((read_export_meta(folder) or {}).get("export") or {}).get("format")
    return fmt if fmt in FP32_FILES else None


def load_exported(folder: str | os.PathLike[str], *, int8: bool = False, threads: int | None = None,
                  precision: str = "auto", streams: int | None = None) -> ExportedEncoder:
    """The runner of an ONNX or OpenVINO export; ``int8`` picks its int8 graph (an explicit choice).

    ``precision`` and ``streams`` apply to OpenVINO and default to :class:`OpenVinoEncoder`'s (automatic: the
    same choice as ``m2d encode EXPORT`` and ``m2d serve --backend openvino``).

    Raises:
        ValueError: not an onnx/openvino export, or ``int8`` asked of a folder exported without it.
        ImportError: the runtime is not installed.
    """
    fmt = exported_format(folder)
    if fmt is None:
        raise ValueError(f"{folder} is not an ONNX or OpenVINO export of matryoshka2d (no matryoshka2d.json "
                         "with export.format onnx/openvino); export one with m2d export --format onnx")
    file = (INT8_FILES if int8 else FP32_FILES)[fmt]
    if not (Path(folder) / file).is_file():
        raise ValueError(f"{Path(folder) / file} is missing; export with --quantize int8 to get an int8 graph"
                         if int8 else f"{Path(folder) / file} is missing; export the model again")
    if fmt == "onnx":
        return OnnxEncoder(folder, file=file, threads=threads)
    return OpenVinoEncoder(folder, file=file, threads=threads, precision=precision, streams=streams)
