"""The per-unit sidecar of a result file: ``<stem>.preds.npz`` beside ``<stem>.json``, written atomically, its
SHA-256 recorded in the JSON so a result never reads another run's arrays, and every float array finite.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def write_sidecar(path: Path, arrays: dict[str, np.ndarray], sets: list[str]) -> dict[str, Any]:
    """Write the per-unit arrays of the result ``path`` to ``<stem>.preds.npz`` beside it, atomically.

    Returns:
        The result JSON's ``predictions`` entry: ``{"file", "sets", "sha256"}`` (the sidecar's digest, which
        :func:`read_sidecar` checks, so a result never reads another run's sidecar).
    """
    from matryoshka2d.io.atomic import atomic_open
    from matryoshka2d.io.manifest import file_sha256

    sidecar = predictions_path(path)
    with atomic_open(sidecar, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return {"file": sidecar.name, "sets": list(sets), "sha256": file_sha256(sidecar)}


def read_sidecar(path: Path, info: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of the sidecar that the result ``path``'s ``predictions`` entry ``info`` names.

    Its SHA-256 must be the one ``info`` records (results written before digests have none: not checked)
    and every float array finite.

    Returns:
        ``{name: array}``, or ``None`` (logged) when the file is missing.

    Raises:
        ValueError: a malformed ``info``, another file than the one written with the result, NaN or infinite
            values, or a damaged or truncated archive.
    """
    import zipfile

    from matryoshka2d.io.manifest import file_sha256

    fix = f"rewrite both with m2d eval --output {path} --overwrite"
    if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not isinstance(info.get("sets"), list):
        raise ValueError(f"{path}: 'predictions' must be {{'file': NAME, 'sets': [...], 'sha256': ...}}; {fix}")
    sidecar = path.with_name(info["file"])
    if not sidecar.is_file():
        logger.warning("%s: per-unit file %s is missing; bootstrap comparisons need it", path, sidecar)
        return None
    expected = info.get("sha256")
    if expected is not None and file_sha256(sidecar) != expected:
        raise ValueError(f"{sidecar} is not the sidecar written with {path} (its SHA-256 differs from the one the "
                         f"result records: another run's file, or altered); {fix}")
    try:
        with np.load(sidecar) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"{sidecar} is damaged or truncated ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                         f"; {fix}") from None
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ValueError(f"{sidecar}: array {name} holds {bad} NaN or infinite value(s), so no comparison or "
                             f"interval from it means anything; {fix}")
    return arrays


def predictions_path(path: str | os.PathLike[str]) -> Path:
    """``results.json`` -> ``results.preds.npz``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.preds.npz")
