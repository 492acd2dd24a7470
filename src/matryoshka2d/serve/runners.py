"""What runs the rows of a batch: the torch encoder (``--backend torch``) or one ONNX graph per exit (``onnx``).

A runner is called by the batcher thread with one padded batch (int64 numpy arrays), the exit layer of each
row, and ``on_exit(positions, vectors)``, which it calls as rows finish (positions in the batch, float32
vectors, normalised or not: the server truncates and normalises them again).

- :class:`TorchRunner`: one depth-sorted pass (:func:`~matryoshka2d.encoder.mixed_depth.forward_mixed_depth`):
  the shared blocks run once, a row leaves after its exit block.
- :class:`OnnxRunner`: every exit exported to ONNX at full width (physically truncated to ``n`` blocks, pooling,
  head and normalisation inside the graph), run with onnxruntime. A batch's rows are grouped by exit and each
  group runs its exit's graph, so a row still runs only the blocks up to its exit; the groups are smaller
  batches than one shared pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.export.runtime import OnnxEncoder

logger = logging.getLogger(__name__)

OnExit = Callable[[np.ndarray, np.ndarray], None]
PROBE = ["a man is playing a guitar on the street", "the dog runs"]  # checks a reused export against the model
MARK = ".m2d-serve"  # marks a folder m2d serve keeps its exports in (and may replace them)


def claim_folder(folder: str | os.PathLike[str], *, flag: str = "--onnx-dir") -> Path:
    """Make ``folder`` one m2d serve may write and replace exports in: a new or empty folder gets the
    :data:`MARK` file, a folder that has it is reused, any other folder is refused.

    Raises:
        ValueError: ``folder`` is a file, or a folder holding files without the mark (another tool's).
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{flag} {root} is a file; pass a folder")
    if root.is_dir() and not (root / MARK).is_file() and any(root.iterdir()):
        raise ValueError(f"{flag} {root} holds files m2d serve did not write (no {MARK} mark); pass a new or empty "
                         "folder, so nothing else is replaced")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARK).write_text("m2d serve keeps its exported exits here and replaces those that no longer match the "
                             "model\n", encoding="utf-8")
    return root


def check_replaceable(path: Path) -> None:
    """Refuse to replace the export folder ``path`` unless every file in it is one its ``manifest.json`` lists.

    Raises:
        ValueError: a file the export did not write (named), or no readable manifest.
    """
    try:
        listed = set(json.loads((path / "manifest.json").read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    others = [] if listed is None else [p for p in sorted(path.rglob("*")) if p.is_file() and p.name !=
                                        "manifest.json" and p.relative_to(path).as_posix() not in listed]
    if listed is None or others:
        what = f"{others[0]}, a file" if others else "files"
        raise ValueError(f"{path} must be exported again, but it holds {what} m2d serve did not write; move "
                         f"{'it' if others else 'them'} away or pass another --onnx-dir")


class TorchRunner:
    """The encoder itself, one mixed-depth pass per batch.

    Args:
        model: the encoder, on its device, in eval mode.
        threads: torch intra-op threads of the batcher thread (``None``: leave torch's setting).
    """

    name = "torch"

    def __init__(self, model: MatryoshkaEncoder, *, threads: int | None = None) -> None:
        self.model, self.threads = model, threads

    def start_thread(self) -> None:
        """Called once in the batcher thread before its first batch."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def __call__(self, arrays: dict[str, np.ndarray], exits: list[int], on_exit: OnExit) -> None:
        import torch

        from matryoshka2d.encoder.mixed_depth import forward_mixed_depth

        device = self.model.device
        features = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        forward_mixed_depth(self.model, features, exits, on_exit=lambda positions, pooled: on_exit(
            positions.numpy(), pooled.detach().float().cpu().numpy()))


class OnnxRunner:
    """One onnxruntime session per exit layer.

    Args:
        encoders: ``{layer: OnnxEncoder}`` for every exit ``1..N``.
        left_padding: whether the tokenizer pads on the left (for trimming a group's padding).
    """

    name = "onnx"

    def __init__(self, encoders: dict[int, OnnxEncoder], *, left_padding: bool = False) -> None:
        self.encoders, self.left_padding = encoders, left_padding

    def start_thread(self) -> None:
        """Nothing to set: each session has its own threads."""

    def __call__(self, arrays: dict[str, np.ndarray], exits: list[int], on_exit: OnExit) -> None:
        depth = np.asarray(exits)
        for layer in sorted(set(depth.tolist()), reverse=True):
            rows = np.flatnonzero(depth == layer)
            mask = arrays["attention_mask"][rows]
            width = int(mask.sum(1).max())
            cols = slice(mask.shape[1] - width, None) if self.left_padding else slice(0, width)
            group = {k: v[rows][:, cols] for k, v in arrays.items()}
            encoder = self.encoders[layer]
            if "token_type_ids" in encoder.input_names and "token_type_ids" not in group:
                group["token_type_ids"] = np.zeros_like(group["input_ids"])
            on_exit(rows, encoder.run(group))

    @classmethod
    def from_model(cls, model: MatryoshkaEncoder, folder: str | os.PathLike[str], *,
                   threads: int | None = None) -> OnnxRunner:
        """Export every exit of ``model`` to ``folder/exit-<n>`` (reusing exports that still match) and load them.

        An existing ``exit-<n>`` is reused only when its graph reproduces the model's exit on :data:`PROBE`
        (max abs difference within the export's own check, :data:`~matryoshka2d.export.onnx.MAX_ABS_DIFF`);
        otherwise it is exported again.

        Raises:
            ImportError: onnx / onnxruntime missing (the ``onnx`` extra).
            ValueError: an exit whose ONNX graph does not reproduce the model (from the export's check); a
                ``folder`` or an ``exit-<n>`` holding files m2d serve did not write (:func:`claim_folder`,
                :func:`check_replaceable`).
        """
        from matryoshka2d.export.exporter import export_model
        from matryoshka2d.export.runtime import OnnxEncoder, require_onnx

        require_onnx()
        root = claim_folder(folder)
        width = model.hidden_size
        encoders: dict[int, OnnxEncoder] = {}
        for n in range(1, model.num_layers + 1):
            path = root / f"exit-{n}"
            expected = model.encode(PROBE, layer=n, dim=width)
            encoder = _reusable(path, expected, threads, model.max_seq_length)
            if encoder is None:
                if path.exists():
                    logger.info("%s does not match the model's exit %d; exporting it again", path, n)
                    check_replaceable(path)
                    shutil.rmtree(path)
                # the export itself checks onnxruntime against the model (export.onnx.MAX_ABS_DIFF)
                export_model(model, path, layer=n, dim=width, format="onnx", verify=False)
                encoder = OnnxEncoder(path, threads=threads, max_seq_length=model.max_seq_length)
            encoders[n] = encoder
        left = getattr(model.tokenizer, "padding_side", "right") == "left"
        return cls(encoders, left_padding=left)


def _reusable(path: Path, expected: np.ndarray, threads: int | None, max_seq_length: int) -> OnnxEncoder | None:
    """The session of an existing export at ``path`` when it reproduces ``expected`` on the probe, else ``None``."""
    from matryoshka2d.export.onnx import MAX_ABS_DIFF
    from matryoshka2d.export.runtime import OnnxEncoder, exported_format

    if exported_format(path) != "onnx":
        return None
    try:
        encoder = OnnxEncoder(path, threads=threads, max_seq_length=max_seq_length)
        got = encoder.encode(PROBE)
    except Exception as error:  # noqa: BLE001 - a broken cached export is exported again
        logger.info("cannot reuse %s (%s)", path, error)
        return None
    if got.shape != expected.shape or float(np.abs(got - expected).max()) > MAX_ABS_DIFF:
        return None
    return encoder
