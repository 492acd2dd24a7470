"""Outputs checked before the work, and results kept when a late write fails.

Every command that writes checks its outputs at start-up with :func:`check_writable` (before any model is
loaded), so a read-only folder, a parent that is a file or an output that is a folder costs seconds, not
the whole run. A write that still fails at the end (disk full, the folder made read-only meanwhile) goes
through :func:`save_or_rescue`, which keeps a copy of the result in the system temporary folder and says
where. :func:`describe_os_error` turns an ``OSError`` into one line: the path, what went wrong, the fix.
See ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

OutputKind = Literal["file", "folder"]

# errno -> (what went wrong, the fix)
_ERRNO_TEXT: dict[int, tuple[str, str]] = {
    errno.EROFS: ("the file system is read-only", "write to another folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write to another disk"),
    errno.EFBIG: ("the file is too large for the file system or the process's file size limit (ulimit -f)",
                  "raise the limit or write to another disk"),
    errno.EISDIR: ("is a folder, not a file", "pass a file path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "pass a path whose parents are folders"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "pass --overwrite to replace it, or choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ELOOP: ("too many symbolic links", "check the path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
    errno.EIO: ("input/output error", "check the disk"),
    errno.ENOTEMPTY: ("the folder is not empty", "pass --overwrite or choose another path"),
    errno.EXDEV: ("cannot move across file systems", "write on the same file system"),
    errno.EBUSY: ("the file or folder is busy", "retry when it is free, or choose another path"),
}


class OutputError(OSError):
    """An output that cannot be written, with a one-line message naming the path and the fix."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "output error"


def describe_os_error(e: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One line for an ``OSError``: the path, what went wrong, the fix.

    Args:
        e: the error.
        path: the path to name when ``e`` carries none.

    Returns:
        e.g. ``/data/out.npy: the file system is read-only; write to another folder``.
    """
    if isinstance(e, OutputError) or (e.errno is None and not e.filename):
        text = str(e).strip().splitlines()
        return text[0] if text else type(e).__name__
    where = e.filename if e.filename is not None else path
    what, fix = _ERRNO_TEXT.get(e.errno or -1, (e.strerror or type(e).__name__, "check the path"))
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {what}; {fix}" if where is not None else f"{what}; {fix}"


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (``.`` for a relative path with none)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_writable(path: str | os.PathLike[str], *, kind: OutputKind = "file", overwrite: bool = False,
                   flag: str = "--output") -> Path:
    """Check, before any work, that ``path`` can be created (or replaced) as a ``kind``.

    The parent folders may be missing (they are created by the atomic writers); the closest one that
    exists must be a folder in which a file can really be created (probed with an empty temporary file,
    so a read-only mount, ``/proc``, missing permissions or a full inode table are all caught).

    Args:
        path: the output.
        kind: ``"file"`` or ``"folder"``.
        overwrite: an existing output may be replaced.
        flag: the CLI flag that named it (for the message).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: with a one-line message (an ``OSError``).
        FileExistsError: the output exists and ``overwrite`` is false.
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{flag} is empty; pass a {kind} path")
    out = Path(text)
    if text.endswith(os.sep) and kind == "file":
        raise OutputError(f"{flag} {text}: ends with '{os.sep}', so it names a folder; pass a file path such "
                          f"as {text}out")
    if out.is_dir() and kind == "file":
        raise OutputError(f"{flag} {text} is a folder; pass a file path inside it, e.g. {out / 'out'}")
    if os.path.lexists(out) and not out.is_dir() and kind == "folder":
        raise OutputError(f"{flag} {text} is a file, not a folder; pass a folder path (or remove the file)")
    if kind == "folder" and out.resolve() in (Path.cwd().resolve(), Path("/")):
        raise OutputError(f"{flag} {text} is the current or root folder, which would be replaced as a whole; "
                          f"pass a new folder such as {out / 'out'}")
    exists = out.is_dir() and any(out.iterdir()) if kind == "folder" else os.path.lexists(out)
    if exists and not overwrite:
        raise FileExistsError(f"{text} already exists; pass --overwrite to replace it")
    check_parent(out, kind=kind, flag=flag)
    return out


def check_parent(path: str | os.PathLike[str], *, kind: OutputKind = "file", flag: str = "--output") -> Path:
    """Check that files can be created where ``path`` will be written (its closest existing ancestor).

    Probed with an empty temporary file, so a read-only mount, ``/proc``, missing permissions or a full
    inode table are all caught; missing parent folders are fine (the writers create them).

    Returns:
        The closest existing ancestor folder.

    Raises:
        OutputError: with a one-line message.
    """
    out = Path(path)
    parent = out.resolve().parent if kind == "folder" else out.parent
    anchor = nearest_existing(parent)
    if not anchor.is_dir():
        raise OutputError(f"{flag} {out}: {anchor} is a file, not a folder, so nothing can be written under "
                          f"it; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".m2d-write-check-", dir=anchor)
    except OSError as e:
        why = ("it does not take new files: a virtual file system such as /proc?; write to another folder"
               if e.errno == errno.ENOENT else describe_os_error(e, anchor).split(": ", 1)[-1])
        raise OutputError(f"{flag} {out}: cannot create files in {anchor} ({why})") from e
    os.close(fd)
    os.unlink(probe)
    return anchor


def save_or_rescue(path: str | os.PathLike[str], write: Callable[[Path], Any], *, what: str = "result") -> Path:
    """Run ``write(path)``; if it fails with an ``OSError``, run ``write`` again into the temporary folder.

    The writers this wraps are atomic (a temporary sibling and a rename), so a failed write leaves the
    previous file at ``path``; the rescue copy keeps the computed result.

    Args:
        path: the output.
        write: writes the result to the path it is given (e.g. ``result.save``).
        what: what the result is, for the message.

    Returns:
        ``path``.

    Raises:
        OutputError: the write failed; the message names the rescue copy (or says that it failed too).
    """
    out = Path(path)
    try:
        write(out)
        return out
    except OSError as e:
        reason = describe_os_error(e, out)
        rescue_dir = Path(tempfile.gettempdir()) / f"m2d-rescued-{os.getpid()}"
        rescue = rescue_dir / (out.name or "output")
        try:
            rescue_dir.mkdir(parents=True, exist_ok=True)
            write(rescue)
        except OSError as e2:
            with contextlib.suppress(OSError):
                rescue_dir.rmdir()  # only if empty
            again = describe_os_error(e2, rescue).split(": ", 1)[-1]
            same = again == reason.split(": ", 1)[-1]
            raise OutputError(f"could not write the {what} to {out} ({reason}); a copy in {rescue_dir} failed "
                              f"too ({'the same error' if same else again}), so the {what} could not be kept; "
                              "fix that and rerun") from e
        logger.debug("rescued %s into %s", out, rescue)
        raise OutputError(f"could not write the {what} to {out} ({reason}); it was saved to {rescue} "
                          f"instead: move it from there") from e
