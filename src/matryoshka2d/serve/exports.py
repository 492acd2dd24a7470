"""The server's exported exits: every exit of the model exported once under a folder, kept and reused.

``m2d serve --backend onnx|openvino --export-dir DIR`` keeps ``DIR/exit-<n>`` (one ``m2d export`` folder per exit,
at full width), and ``DIR/query-exit-<n>`` for each exit with its own query path (``m2d export --input-type
query``). It reuses one on the next start only when it still reproduces the model's exit on :data:`PROBE`. The
server writes only in a folder it owns (:func:`claim_folder`: a new or empty one gets the :data:`MARK` file, a
marked one is reused, any other is refused), and an exit that does not reproduce the model is exported again
only when every file in it is one its ``manifest.json`` lists (:func:`check_replaceable`): what the server did
not write is never deleted. Servers (e.g. replicas) sharing ``DIR`` on one machine take turns (a lock on the
folder), so the first exports and the others reuse.
"""

from __future__ import annotations

import fcntl
import json
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
MARK = ".m2d-serve"  # marks a folder m2d serve keeps its exports in (and may replace them)


def claim_folder(folder: str | os.PathLike[str], *, flag: str = "--export-dir") -> Path:
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
                         f"{'it' if others else 'them'} away or pass another --export-dir")


def max_abs_diff(fmt: str) -> float:
    """The largest per-coordinate difference an export of ``fmt`` may have from the model (its own check's)."""
    if fmt == "openvino":
        from matryoshka2d.export.openvino import MAX_ABS_DIFF
    else:
        from matryoshka2d.export.onnx import MAX_ABS_DIFF
    return MAX_ABS_DIFF


def exit_exports(model: MatryoshkaEncoder, root: str | Path, fmt: str, *, check: Callable[[Path], Any],
                 sts: ScoredPairs | None = None) -> dict[int, Path]:
    """Every exit ``1..N`` of ``model`` exported to ``fmt`` at full width under ``root/exit-<n>``, and the own
    query path of each aligned exit under ``root/query-exit-<n>``.

    Args:
        model: the encoder (fp32, on the CPU).
        root: the folder (created if missing; :func:`claim_folder`).
        fmt: ``onnx`` or ``openvino``.
        check: opens an export folder exactly (f32) for the reuse check; its ``encode(texts)`` is compared with
            the model's exit on :data:`PROBE`.
        sts: an STS set the export scores itself on (recorded in each exit's ``matryoshka2d.json``).

    Returns:
        ``{route: folder}``: ``n`` for exit ``n``, ``-n`` for exit ``n``'s query path.

    Raises:
        ValueError: ``root`` or an exit folder that does not reproduce the model holds files the server did
            not write (:func:`claim_folder`, :func:`check_replaceable`); an export that does not reproduce the
            model (from the export's own check).
    """
    from matryoshka2d.export.exporter import export_model
    from matryoshka2d.export.runtime import exported_format

    root = claim_folder(root)
    width, limit = model.hidden_size, max_abs_diff(fmt)
    folders: dict[int, Path] = {}
    lock = os.open(root, os.O_RDONLY)  # the folder itself is the lock: nothing is added to it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one server exports at a time; the others then reuse its folders
        own = model.query_path.layers if model.query_path is not None else []
        routes = [*range(1, model.num_layers + 1), *(-n for n in own)]
        for route in routes:
            n, kind = abs(route), "query" if route < 0 else "document"
            path = root / f"{'query-' if route < 0 else ''}exit-{n}"
            expected = model.encode(PROBE, layer=n, dim=width, input_type=kind)
            if not (exported_format(path) == fmt and _reproduces(path, check, expected, limit)):
                if path.exists():
                    logger.info("%s does not match the model's %s exit %d; exporting it again", path, kind, n)
                    check_replaceable(path)
                    shutil.rmtree(path)
                # the export checks itself against the model (and records the STS scores it was given)
                export_model(model, path, layer=n, dim=width, format=fmt, verify=False, sts=sts, input_type=kind)
            folders[route] = path
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
