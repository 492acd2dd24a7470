"""Helpers shared by the CLI fault tests and the fuzz: run ``m2d`` in-process, check the one-line exit-2
contract, and damage an index folder in the ways issue 35 found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from matryoshka2d.cli import main

# the kinds of index damage :func:`damage_index` makes (each must be exit 2 with one line)
INDEX_DAMAGE = ("truncated-faiss", "no-dims", "version-string", "files-list", "ids-dict", "duplicate-id",
                "swapped-rows")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``m2d -q ARGV`` in this process; return (exit code, stdout, stderr)."""
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 with exactly one stderr line, no traceback, holding every needle; return the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("m2d ") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def damage_index(index: Path, copy: Path, how: str) -> Path:
    """A copy of the index folder ``index`` damaged ``how`` (one of :data:`INDEX_DAMAGE`)."""
    shutil.copytree(index, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    faiss_file = next(copy.glob("shortlist-*.faiss"))
    if how == "truncated-faiss":
        faiss_file.write_bytes(faiss_file.read_bytes()[:40])
    elif how == "no-dims":
        manifest.pop("dims")
    elif how == "version-string":
        manifest["format_version"] = str(manifest["format_version"])
    elif how == "files-list":
        manifest["files"] = sorted(manifest["files"])
    elif how == "ids-dict":
        ids = json.loads((copy / "ids.json").read_text())
        (copy / "ids.json").write_text(json.dumps(dict(enumerate(ids))))
    elif how == "duplicate-id":  # the same bytes count: the second id becomes the first
        ids = json.loads((copy / "ids.json").read_text())
        assert len(ids[0]) == len(ids[1])
        ids[1] = ids[0]
        (copy / "ids.json").write_text(json.dumps(ids))
    elif how == "swapped-rows":  # row 1 copied over row 2 of the rerank vectors: same size, other content
        import numpy as np

        vectors_file = next(copy.glob("vectors-*.npy"))
        vectors = np.load(vectors_file)
        vectors[2] = vectors[1]
        np.save(vectors_file, vectors)
        assert vectors_file.stat().st_size == manifest["files"][vectors_file.name]["size"]
    else:
        raise ValueError(how)
    manifest_path.write_text(json.dumps(manifest))
    return copy
