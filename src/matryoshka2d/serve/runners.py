"""What runs the rows of a batch: the torch encoder (``--backend torch``), or one exported graph per exit on
onnxruntime (``onnx``) or OpenVINO (``openvino``).

A runner is called by the batcher thread with one padded batch (int64 numpy arrays), the route of each row,
and ``on_exit(positions, vectors)``, which it calls as rows finish (positions in the batch, float32
vectors, normalised or not: the server truncates and normalises them again). ``describe()`` is what ``/info``
shows of it.

- :class:`TorchRunner`: one depth-sorted pass (:func:`~matryoshka2d.encoder.mixed_depth.forward_mixed_depth`):
  the shared blocks run once, a row leaves after its exit block.
- :class:`OnnxRunner`: every exit exported to ONNX at full width (physically truncated to ``n`` blocks, pooling,
  head and normalisation inside the graph), run with onnxruntime. A batch's rows are grouped by exit and each
  group runs its exit's graph, so a row still runs only the blocks up to its exit; the groups are smaller
  batches than one shared pass.
- :class:`OpenVinoRunner`: the same per-exit groups on OpenVINO (bf16 where :func:`~matryoshka2d.export.runtime.
  auto_precision` allows it), cut into chunks of about equal cost (rows x tokens x depth) and run longest
  first on OpenVINO's throughput streams, so the streams stay busy whatever the mix of depths.

A row's route is its exit layer ``n`` (the shared path: documents, and queries at exits without a query path
of their own), or ``-n``: the own query path of exit ``n`` (``input_type="query"`` at an exit aligned by ``m2d
align``; :func:`~matryoshka2d.serve.request.query_route`). On torch those rows run ``forward(...,
input_type="query")`` per exit, after the shared mixed-depth pass; on onnx and openvino each query exit has a
graph of its own (the exit's query encoder, adapters merged and query head folded in).

The exported exits are kept and reused by :func:`~matryoshka2d.serve.exports.exit_exports`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matryoshka2d.data.datasets import ScoredPairs
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.export.runtime import OnnxEncoder, OpenVinoEncoder

logger = logging.getLogger(__name__)

OnExit = Callable[[np.ndarray, np.ndarray], None]
CHUNKS_PER_STREAM = 2  # a batch is cut into about this many chunks per stream (finer: better balance, more calls)
MIN_CHUNK_ROWS = 4  # ... of at least this many rows


class TorchRunner:
    """The encoder itself, one mixed-depth pass per batch.

    Args:
        model: the encoder, on its device, in eval mode.
        threads: torch intra-op threads of the batcher thread (``None``: leave torch's setting).
    """

    name = "torch"

    def __init__(self, model: MatryoshkaEncoder, *, threads: int | None = None) -> None:
        self.model, self.threads = model, threads
        self.why = ""

    def start_thread(self) -> None:
        """Called once in the batcher thread before its first batch."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def __call__(self, arrays: dict[str, np.ndarray], exits: list[int], on_exit: OnExit) -> None:
        import torch

        from matryoshka2d.encoder.mixed_depth import forward_mixed_depth

        device = self.model.device
        left = getattr(self.model.tokenizer, "padding_side", "right") == "left"
        route_of = np.asarray(exits)
        shared = np.flatnonzero(route_of > 0)
        if len(shared):
            rows, group = (shared, arrays) if len(shared) == len(exits) else trimmed(arrays, shared, left)
            features = {k: torch.from_numpy(v).to(device) for k, v in group.items()}
            forward_mixed_depth(self.model, features, [exits[i] for i in rows], on_exit=lambda positions, pooled:
                                on_exit(rows[positions.numpy()], pooled.detach().float().cpu().numpy()))
        own = np.flatnonzero(route_of < 0)
        if len(own):  # queries at exits with their own path: one pass per exit, with that exit's weights
            query = {k: v[own] for k, v in arrays.items()}
            for route, rows, group in exit_groups(query, [exits[i] for i in own], lambda n: [], left_padding=left):
                features = {k: torch.from_numpy(v).to(device) for k, v in group.items()}
                with torch.inference_mode():
                    pooled = self.model(features, layers=[-route], input_type="query")[-route]
                on_exit(own[rows], pooled.detach().float().cpu().numpy())

    def describe(self) -> dict[str, Any]:
        """What ``/info`` shows of this runner."""
        return {"name": self.name, "device": str(self.model.device), "threads": self.threads,
                "dtype": str(next(self.model.backbone.parameters()).dtype).removeprefix("torch."),
                **({"why": self.why} if self.why else {})}


def trimmed(arrays: dict[str, np.ndarray], rows: np.ndarray, left_padding: bool) -> tuple[np.ndarray,
                                                                                          dict[str, np.ndarray]]:
    """``rows`` of a padded batch, with the padding columns none of them uses cut off."""
    mask = arrays["attention_mask"][rows]
    width = int(mask.sum(1).max())
    cols = slice(mask.shape[1] - width, None) if left_padding else slice(0, width)
    return rows, {k: v[rows][:, cols] for k, v in arrays.items()}


def exit_groups(arrays: dict[str, np.ndarray], exits: list[int], input_names: Callable[[int], list[str]], *,
                left_padding: bool = False) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """``(route, rows, inputs)`` of each route of a batch, deepest shared exit first and the query paths last,
    each trimmed to its longest row.

    ``input_names(route)`` are the inputs of that route's graph (zero ``token_type_ids`` are added if it takes
    them and the batch has none).
    """
    depth = np.asarray(exits)
    for route in sorted(set(depth.tolist()), reverse=True):
        rows, group = trimmed(arrays, np.flatnonzero(depth == route), left_padding)
        if "token_type_ids" in input_names(route) and "token_type_ids" not in group:
            group["token_type_ids"] = np.zeros_like(group["input_ids"])
        yield route, rows, group


def routes(encoders: dict[int, Any]) -> dict[str, list[int]]:
    """What ``/info`` shows of a runner's graphs: its exits, and the exits with a query path of their own."""
    return {"exits": sorted(n for n in encoders if n > 0), "query_exits": sorted(-n for n in encoders if n < 0)}


class OnnxRunner:
    """One onnxruntime session per exit layer.

    Args:
        encoders: ``{route: OnnxEncoder}`` for every exit ``1..N``, and ``-n`` for each exit with its own query
            path.
        left_padding: whether the tokenizer pads on the left (for trimming a group's padding).
    """

    name = "onnx"

    def __init__(self, encoders: dict[int, OnnxEncoder], *, left_padding: bool = False, threads: int | None = None,
                 export_dir: str | None = None) -> None:
        self.encoders, self.left_padding, self.threads, self.export_dir = encoders, left_padding, threads, export_dir
        self.why = ""

    def start_thread(self) -> None:
        """Nothing to set: each session has its own threads."""

    def __call__(self, arrays: dict[str, np.ndarray], exits: list[int], on_exit: OnExit) -> None:
        names = lambda layer: self.encoders[layer].input_names  # noqa: E731
        for layer, rows, group in exit_groups(arrays, exits, names, left_padding=self.left_padding):
            on_exit(rows, self.encoders[layer].run(group))

    def describe(self) -> dict[str, Any]:
        """What ``/info`` shows of this runner."""
        return {"name": self.name, **routes(self.encoders), "threads": self.threads,
                "export_dir": self.export_dir, **({"why": self.why} if self.why else {})}

    @classmethod
    def from_model(cls, model: MatryoshkaEncoder, folder: str | os.PathLike[str], *,
                   threads: int | None = None) -> OnnxRunner:
        """Export every exit of ``model`` to ``folder/exit-<n>`` (reusing exports that still match) and load them.

        Exports are kept and reused as :func:`~matryoshka2d.serve.exports.exit_exports` says.

        Raises:
            ImportError: onnx / onnxruntime missing (the ``onnx`` extra).
            ValueError: an exit whose ONNX graph does not reproduce the model (from the export's check), or a
                folder in the way that the server did not write.
        """
        from matryoshka2d.export.runtime import OnnxEncoder, require_onnx
        from matryoshka2d.serve.exports import exit_exports

        require_onnx()

        def session(path: os.PathLike[str]) -> OnnxEncoder:
            return OnnxEncoder(path, threads=threads, max_seq_length=model.max_seq_length)

        folders = exit_exports(model, folder, "onnx", check=session)
        left = getattr(model.tokenizer, "padding_side", "right") == "left"
        return cls({route: session(path) for route, path in folders.items()}, left_padding=left, threads=threads,
                   export_dir=str(folder))


class OpenVinoRunner:
    """One compiled OpenVINO model per exit, the chunks of a batch run longest first on throughput streams.

    A batch's rows are grouped by exit (each group trimmed to its longest row) and cut into chunks of about
    equal cost, rows x tokens x depth, about :data:`CHUNKS_PER_STREAM` per stream. The chunks go longest first
    to ``streams`` worker threads, each with its own infer request per exit, so at most ``streams`` chunks run
    at once and each on ``threads / streams`` threads. A layer-2 row thus costs a third of a layer-6 row and a
    mixed batch keeps every stream busy; each chunk's rows are answered when it finishes.

    Args:
        encoders: ``{route: OpenVinoEncoder}`` for every exit ``1..N`` and ``-n`` for each exit with its own
            query path, compiled with ``streams`` streams.
        streams: chunks in flight at once (1: the batcher thread runs the groups one after the other).
        left_padding: whether the tokenizer pads on the left.
        export_dir: where the exports are (for ``/info``).
    """

    name = "openvino"

    def __init__(self, encoders: dict[int, OpenVinoEncoder], *, streams: int = 1, left_padding: bool = False,
                 export_dir: str | None = None) -> None:
        self.encoders, self.streams, self.left_padding, self.export_dir = encoders, streams, left_padding, export_dir
        self.why = ""
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()

    def start_thread(self) -> None:
        """Start the stream workers (once, from the batcher thread)."""
        if self.streams > 1 and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.streams, thread_name_prefix="m2d-openvino")

    def chunks(self, arrays: dict[str, np.ndarray], exits: list[int]
               ) -> list[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """``(layer, rows, inputs)`` to run, costliest first: each exit's rows cut into pieces of about
        ``1 / (streams x CHUNKS_PER_STREAM)`` of the batch's cost (rows x tokens x depth), each trimmed again."""
        groups = list(exit_groups(arrays, exits, lambda n: self.encoders[n].input_names,
                                  left_padding=self.left_padding))
        if self.streams == 1:
            return groups

        def cost(route: int, group: dict[str, np.ndarray]) -> int:
            return abs(route) * int(group["input_ids"].size)

        target = sum(cost(n, g) for n, _, g in groups) / (self.streams * CHUNKS_PER_STREAM)
        out = []
        for layer, rows, group in groups:
            pieces = min(math.ceil(cost(layer, group) / target - 1e-9), max(1, len(rows) // MIN_CHUNK_ROWS))
            for part in np.array_split(np.arange(len(rows)), max(1, pieces)):
                sub = {k: v[part] for k, v in group.items()}
                width = int(sub["attention_mask"].sum(1).max())
                cols = slice(sub["input_ids"].shape[1] - width, None) if self.left_padding else slice(0, width)
                out.append((layer, rows[part], {k: v[:, cols] for k, v in sub.items()}))
        return sorted(out, key=lambda c: -cost(c[0], c[2]))

    def _infer(self, layer: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one chunk in a stream worker, on this worker's own request for the exit."""
        requests = self._local.__dict__.setdefault("requests", {})
        if layer not in requests:
            requests[layer] = self.encoders[layer].compiled.create_infer_request()
        return self.encoders[layer].run(inputs, requests[layer])

    def __call__(self, arrays: dict[str, np.ndarray], exits: list[int], on_exit: OnExit) -> None:
        chunks = self.chunks(arrays, exits)
        if self._pool is None or len(chunks) == 1:
            for layer, rows, inputs in chunks:
                on_exit(rows, self.encoders[layer].run(inputs))
            return
        futures = {self._pool.submit(self._infer, layer, inputs): rows for layer, rows, inputs in chunks}
        try:
            for future in concurrent.futures.as_completed(futures):
                on_exit(futures[future], future.result())
        finally:  # on a failure, let the other chunks finish before the batcher re-runs the batch
            concurrent.futures.wait(futures)

    def describe(self) -> dict[str, Any]:
        """What ``/info`` shows of this runner."""
        first = self.encoders[max(self.encoders)]
        return {"name": self.name, **routes(self.encoders), "precision": first.precision,
                "precision_reason": first.precision_reason, "streams": self.streams, "threads": first.threads,
                "export_dir": self.export_dir, **({"why": self.why} if self.why else {})}

    @classmethod
    def from_model(cls, model: MatryoshkaEncoder, folder: str | os.PathLike[str], *, threads: int | None = None,
                   precision: str = "auto", sts: ScoredPairs | None = None) -> OpenVinoRunner:
        """Export every exit of ``model`` to OpenVINO under ``folder`` (reusing exports that still match), load them.

        Precision and streams follow the library's one rule (:func:`~matryoshka2d.export.runtime.auto_precision`
        at every exit: bf16 only if every exit allows it; :func:`~matryoshka2d.export.runtime.auto_streams` for
        a server, which has more than one batch).

        Args:
            model: the encoder (fp32, on the CPU).
            folder: where the exports are kept (:func:`~matryoshka2d.serve.exports.exit_exports`).
            threads: OpenVINO threads, all streams together (``None``: the machine's CPUs).
            precision: ``auto``, ``f32`` or ``bf16``.
            sts: an STS set each export scores itself on in f32 and bf16 (what ``auto`` reads).

        Raises:
            ImportError: openvino missing (the ``openvino`` extra).
            ValueError: an export that does not reproduce the model, or a folder in the way.
        """
        from matryoshka2d.export.runtime import (
            OpenVinoEncoder,
            auto_precision,
            auto_streams,
            read_export_meta,
            require_openvino,
        )
        from matryoshka2d.serve.exports import exit_exports

        require_openvino()
        length = model.max_seq_length

        def exact(path: os.PathLike[str]) -> OpenVinoEncoder:
            return OpenVinoEncoder(path, precision="f32", threads=threads, streams=1, max_seq_length=length)

        folders = exit_exports(model, folder, "openvino", check=exact, sts=sts)
        reason = "asked for"
        if precision == "auto":  # every exit or none: bf16 only where each exit's recorded checks allow it
            choices = {n: auto_precision(read_export_meta(path)) for n, path in folders.items()}
            refused = {n: why for n, (p, why) in choices.items() if p != "bf16"}
            precision = "f32" if refused else "bf16"
            first = min(refused, key=abs) if refused else 0
            reason = (f"auto: {'query ' if first < 0 else ''}exit {abs(first)}: {refused[first]}" if refused
                      else f"auto at every exit: {choices[max(choices)][1]}")
        streams = auto_streams(threads, batches=2)
        encoders = {n: OpenVinoEncoder(path, precision=precision, threads=threads, streams=streams,
                                       max_seq_length=length) for n, path in folders.items()}
        for encoder in encoders.values():
            encoder.precision_reason = reason
        left = getattr(model.tokenizer, "padding_side", "right") == "left"
        return cls(encoders, streams=streams, left_padding=left, export_dir=str(folder))
