"""Atomic writes: folders and files appear complete or not at all.

Every folder the library saves (models, checkpoints, exports) is written into a temporary sibling and
renamed into place, so a crash leaves either the old complete folder or the new complete one; single
files (results JSON, arrays) go the same way. See ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one atomic step.

    The sibling is named ``.NAME.tmp-PID@HOST-XXXX``. On Linux an existing ``path`` is swapped with it
    in one ``renameat2(RENAME_EXCHANGE)``, so a crash at any moment leaves the old complete folder or the
    new complete one at ``path``; elsewhere the old folder is first moved aside (``.NAME.old-...``) and
    put back by the next save if the process died in between. Leftovers of dead processes are removed
    by the next save to the same path (see :func:`remove_stale_siblings`).

    Args:
        path: the final folder.
        overwrite: replace an existing non-empty folder. Without it, such a folder is an error.

    Raises:
        FileExistsError: ``path`` exists, is not empty and ``overwrite`` is false.
    """
    final = Path(path)
    remove_stale_siblings(final)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder; choose another output path")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp makes 0700 and some writers (safetensors) 0600 files
        _fsync_tree(tmp)
        if not final.exists():
            os.replace(tmp, final)
        elif _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            trash = final.parent / f".{final.name}.old-{_owner()}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(trash, final)  # put the previous folder back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling (``.NAME.tmp-PID@HOST-XXXX``) for writing; on success it is flushed to
    disk and renamed onto ``path``, on error removed (``path`` keeps its previous content).

    Args:
        path: the final file.
        mode: ``"wb"`` (bytes, e.g. ``np.save(f, array)``) or ``"w"`` (UTF-8 text).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file through a temporary sibling and a rename (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def apply_umask(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything under it the modes of a plain ``open`` / ``mkdir`` under the umask.

    Folders become ``0777 & ~umask`` and files ``0666 & ~umask`` (0755 / 0644 with umask 022), whatever the
    writer used (``mkdtemp`` makes 0700 folders, safetensors writes 0600 files). Symbolic links are left.
    """
    mask = _umask()
    for dirpath, _subdirs, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def remove_stale_siblings(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary siblings of ``path`` left by processes of this host that no longer run.

    A ``.NAME.old-*`` folder is the previous complete version moved aside during a replace; when
    ``path`` itself is missing (the process died between the two renames) it is moved back instead.
    Siblings of running processes or of other hosts are never touched.

    Returns:
        The siblings removed or restored.
    """
    final = Path(path)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(\d+)@([0-9a-f]{{8}})-[A-Za-z0-9_]+$")
    stale: list[tuple[str, Path]] = []
    for sibling in final.parent.iterdir():
        m = pattern.match(sibling.name)
        if m and m.group(3) == _host_tag() and not _pid_alive(int(m.group(2))):
            stale.append((m.group(1), sibling))
    done = []
    olds = sorted((p for kind, p in stale if kind == "old" and p.is_dir()), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
        logger.warning("%s was missing after an interrupted replace; restored the previous version", final)
        done.append(final)
    for _, sibling in stale:
        if sibling.exists() and sibling != final:
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted write", sibling)
            done.append(sibling)
    return done


def _owner() -> str:
    """``PID@HOST`` tag of temporary names (computed per call: a forked child has its own pid)."""
    return f"{os.getpid()}@{_host_tag()}"


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own temporaries are cleaned by our own handlers
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


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
