"""The server's exported exits: every exit of the model exported once under a folder, kept and reused.

``m2d serve --backend onnx|openvino --export-dir DIR`` keeps ``DIR/exit-<n>`` (one ``m2d export`` folder per exit,
at full width) and reuses one on the next start only when it still reproduces the model's exit on
:data:`PROBE`. One that does not is exported again, but only if the server wrote it (it holds :data:`MARK`): a
folder the server did not write is never deleted. Servers (e.g. replicas) sharing ``DIR`` on one machine take
turns (a lock on the folder), so the first exports and the others reuse.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matryoshka2d.data.datasets import ScoredPairs
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

PROBE = ["a man is playing a guitar on the street", "the dog runs"]  # checks a reused export against the model
MARK = ".m2d-serve"  # in each exit folder the server exported: the server may replace it


def max_abs_diff(fmt: str) -> float:
    """The largest per-coordinate difference an export of ``fmt`` may have from the model (its own check's)."""
    if fmt == "openvino":
        from matryoshka2d.export.openvino import MAX_ABS_DIFF
    else:
        from matryoshka2d.export.onnx import MAX_ABS_DIFF
    return MAX_ABS_DIFF


def exit_exports(model: MatryoshkaEncoder, root: str | Path, fmt: str, *, check: Callable[[Path], Any],
                 sts: ScoredPairs | None = None) -> dict[int, Path]:
    """Every exit ``1..N`` of ``model`` exported to ``fmt`` at full width under ``root/exit-<n>``.

    Args:
        model: the encoder (fp32, on the CPU).
        root: the folder (created if missing).
        fmt: ``onnx`` or ``openvino``.
        check: opens an export folder exactly (f32) for the reuse check; its ``encode(texts)`` is compared with
            the model's exit on :data:`PROBE`.
        sts: an STS set the export scores itself on (recorded in each exit's ``matryoshka2d.json``).

    Returns:
        ``{layer: folder}``.

    Raises:
        ValueError: an exit folder that does not reproduce the model and was not written by the server; an
            export that does not reproduce the model (from the export's own check).
    """
    from matryoshka2d.export.exporter import export_model
    from matryoshka2d.export.runtime import exported_format

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    width, limit = model.hidden_size, max_abs_diff(fmt)
    folders: dict[int, Path] = {}
    lock = os.open(root, os.O_RDONLY)  # the folder itself is the lock: nothing is added to it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one server exports at a time; the others then reuse its folders
        for n in range(1, model.num_layers + 1):
            path = root / f"exit-{n}"
            expected = model.encode(PROBE, layer=n, dim=width)
            if not (exported_format(path) == fmt and _reproduces(path, check, expected, limit)):
                if path.exists():
                    if not (path / MARK).is_file():
                        raise ValueError(f"{path} exists, does not hold this model's exit {n} as {fmt}, and was not "
                                         f"written by m2d serve (no {MARK} file), so it is left alone; pass another "
                                         "--export-dir or remove that folder yourself")
                    logger.info("%s does not match the model's exit %d; exporting it again", path, n)
                    shutil.rmtree(path)
                # the export checks itself against the model (and records the STS scores it was given)
                export_model(model, path, layer=n, dim=width, format=fmt, verify=False, sts=sts)
                (path / MARK).write_text("exported by m2d serve; it replaces this folder when the model changes\n",
                                         encoding="utf-8")
            folders[n] = path
    finally:
        os.close(lock)  # releases the lock
    return folders


def _reproduces(path: Path, check: Callable[[Path], Any], expected: np.ndarray, limit: float) -> bool:
    """Whether the export at ``path`` reproduces ``expected`` on the probe within ``limit``."""
    try:
        got = check(path).encode(PROBE)
    except Exception as error:  # noqa: BLE001 - a broken kept export is exported again
        logger.info("cannot reuse %s (%s)", path, error)
        return False
    return got.shape == expected.shape and float(np.abs(got - expected).max()) <= limit
