"""Atomic writes and the ``matryoshka2d.json`` model-folder config.

Every folder the library saves (models, checkpoints, exports) is written into a temporary sibling and
renamed into place, so a crash leaves either the old complete folder or the new complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CONFIG_NAME = "matryoshka2d.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a saved model (recorded in every saved folder)."""
    import tokenizers
    import torch
    import transformers

    from matryoshka2d import __version__

    return {
        "matryoshka2d": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    Args:
        path: the final folder.
        overwrite: replace an existing non-empty folder. Without it, such a folder is an error.

    Raises:
        FileExistsError: ``path`` exists, is not empty and ``overwrite`` is false.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder; choose another output path")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_model_config(folder: Path) -> dict[str, Any]:
    """Read ``matryoshka2d.json`` from ``folder``.

    Raises:
        ValueError: unreadable JSON or a ``format_version`` newer than this library understands.
    """
    path = folder / CONFIG_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); re-save the model or remove the file") from e
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version} is newer than this library supports ({FORMAT_VERSION}); "
            "upgrade matryoshka2d (pip install -U matryoshka2d)"
        )
    return meta


MANIFEST_NAME = "manifest.json"


def write_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Record size and SHA-256 of every file under ``folder`` in ``manifest.json`` (call before the rename)."""
    import hashlib

    root = Path(folder)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def verify_manifest(folder: str | os.PathLike[str]) -> None:
    """Check every file listed in ``manifest.json``.

    Raises:
        ValueError: a missing, truncated or altered file (named in the message), or no manifest.
    """
    import hashlib

    root = Path(folder)
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is missing or unreadable ({e}); the folder is incomplete") from e
    for name, expected in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise ValueError(f"{file} is listed in the manifest but missing; the folder is damaged")
        size = file.stat().st_size
        if size != expected["size"]:
            raise ValueError(
                f"{file} is damaged: {size} bytes, the manifest says {expected['size']} (truncated or altered)"
            )
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            raise ValueError(f"{file} is damaged: its checksum differs from the manifest (altered)")
