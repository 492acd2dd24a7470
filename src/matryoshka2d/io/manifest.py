"""What a saved folder records about itself: ``matryoshka2d.json`` and ``manifest.json``.

``matryoshka2d.json`` holds the folder's config with a ``format_version``; the manifest records each
file's size and SHA-256 so that a truncated or altered file is named when the folder is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from matryoshka2d._version import __version__
from matryoshka2d.io.atomic import atomic_write_text

FORMAT_VERSION = 1
CONFIG_NAME = "matryoshka2d.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a saved model (recorded in every saved folder)."""
    import tokenizers
    import torch
    import transformers

    return {
        "matryoshka2d": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


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
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an object; re-save the model or remove "
                         "the file")
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


def file_entries(folder: str | os.PathLike[str], *, skip: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, Any]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` but ``skip`` (what manifests list)."""
    root = Path(folder)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name not in skip:
            files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def write_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Record size and SHA-256 of every file under ``folder`` in ``manifest.json``.

    Call it last, inside :func:`atomic_dir`, so the manifest describes exactly what is renamed into place.

    Returns:
        The manifest (``{"format_version": 1, "files": {relative path: {"size", "sha256"}}}``).
    """
    root = Path(folder)
    manifest = {"format_version": FORMAT_VERSION, "files": file_entries(root)}
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(folder: str | os.PathLike[str], *, digests: bool = True, fix: str | None = None) -> None:
    """Check every file listed in ``folder/manifest.json`` (size, then SHA-256).

    Args:
        folder: the folder holding ``manifest.json``.
        digests: also compare SHA-256 digests (``False``: sizes only, for huge folders read often).
        fix: the advice that ends the error (default: re-save or re-copy the folder).

    Raises:
        ValueError: a missing, truncated or altered file (every damaged one is named), or a missing,
            unreadable or malformed manifest.
    """
    root = Path(folder)
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is missing or unreadable ({e}); the folder is incomplete or damaged") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ValueError(f"{path} is not a matryoshka2d manifest (no 'files' table of sizes and checksums); "
                         "the folder is damaged, or delete the file if another tool wrote it")
    check_files(root, files, digests=digests, fix=fix or (
        "re-save or re-copy the folder (or load an earlier checkpoint); if you edited these files on purpose, "
        f"delete {MANIFEST_NAME}"))


def check_files(root: Path, files: dict[str, Any], *, digests: bool = True, fix: str) -> None:
    """Check that each ``{name: {"size", "sha256"}}`` of ``files`` is a file under ``root`` with that content.

    Raises:
        ValueError: the missing, truncated or altered files, each named, then ``fix``.
    """
    problems = []
    for name, expected in files.items():
        file = root / name
        if not isinstance(expected, dict):
            problems.append(f"{name} (its manifest entry is not {{'size', 'sha256'}})")
        elif Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name} (a path outside the folder)")
        elif not file.is_file():
            problems.append(f"{file} (missing)")
        elif (size := file.stat().st_size) != expected.get("size"):
            problems.append(f"{file} ({size} bytes, the manifest says {expected.get('size')}: "
                            "truncated or altered)")
        elif digests and file_sha256(file) != expected.get("sha256"):
            problems.append(f"{file} (same size, different SHA-256: altered)")
    if problems:
        raise ValueError(f"{root} is damaged: {len(problems)} of {len(files)} files differ from {MANIFEST_NAME}: "
                         + "; ".join(problems) + f"; {fix}")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (what manifests record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
