"""Exclusive writers: one process at a time writes an output file or folder.

:func:`output_lock` takes an ``fcntl`` lock on ``.NAME.lock`` beside the output (beside, not inside, so it
survives the atomic replacement of a folder) and writes ``PID@HOST`` into it. A second writer of the same
output fails at once with :class:`OutputLockedError` naming the holder. The kernel drops the lock when its
process dies (even by SIGKILL), so a stale lock file is simply taken over by the next writer (its old
``PID@HOST`` is logged). The lock file is removed on release. Take the lock *before* checking whether the
output exists and hold it until the final rename; see ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from matryoshka2d.io.outputs import OutputError, OutputKind, check_writable, nearest_existing

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class OutputLockedError(FileExistsError):
    """Another live process holds the lock of this output."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder

    def __str__(self) -> str:
        return str(self.args[0])


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``DIR/.NAME.lock`` for ``DIR/NAME`` (resolved, so ``x`` and ``./x`` agree)."""
    out = Path(os.path.abspath(os.fspath(path)))
    return out.parent / f".{out.name}.lock"


def read_holder(path: str | os.PathLike[str]) -> str:
    """``PID@HOST`` recorded in the lock file of ``path`` (``""`` when none)."""
    try:
        return lock_path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str], *, what: str = "output") -> Iterator[Path]:
    """Hold the exclusive writer lock of ``path`` (a file or a folder) for the ``with`` block.

    Creates the missing parent folders of ``path`` (the lock file lives there).

    Args:
        path: the output.
        what: what the output is, for the message (``"run folder"``, ``"output"``...).

    Yields:
        The lock file.

    Raises:
        OutputLockedError: another live process holds it; the message names its PID and host.
        OSError: the lock file cannot be created (e.g. a read-only folder).
    """
    lock = lock_path(path)
    if fcntl is None:  # pragma: no cover
        yield lock
        return
    anchor = nearest_existing(lock.parent)
    if not anchor.is_dir():
        raise OutputError(f"{path}: {anchor} is a file, not a folder, so nothing can be written under it; "
                          "choose another path")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()}@{socket.gethostname()}"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = read_holder(path) or "?@?"
            pid, _, host = holder.partition("@")
            raise OutputLockedError(
                f"{path} is being written by another process (pid {pid} on host {host or '?'}; lock file {lock}); "
                f"wait for it to finish or choose another {what}", holder) from None
        try:  # the file may have been removed by its previous holder between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = os.read(fd, 200).decode("utf-8", "replace").strip()
        if previous and previous != me:
            logger.info("took over the lock of %s from %s, which no longer holds it", path, previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{me}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before unlocking: a waiter that opened it re-checks the inode
        os.close(fd)


@contextlib.contextmanager
def output_locks(*paths: str | os.PathLike[str] | None, what: str = "output") -> Iterator[list[Path]]:
    """:func:`output_lock` on every path given (``None`` skipped), in a fixed order (no deadlock)."""
    unique = sorted({os.path.abspath(os.fspath(p)) for p in paths if p})
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(output_lock(p, what=what)) for p in unique]


@contextlib.contextmanager
def claim_output(path: str | os.PathLike[str] | None, *, kind: OutputKind = "file", overwrite: bool = False,
                 flag: str = "--output", what: str = "output") -> Iterator[Path | None]:
    """The start-up sequence of every writing command, held for the ``with`` block.

    1. the output's shape and place (:func:`~matryoshka2d.io.outputs.check_writable` without the existence
    check: not a folder where a file is due, files can be created there), 2. the writer lock
    (:func:`output_lock`), 3. under the lock, the whole check again (an existing output only with
    ``overwrite``). ``None`` claims nothing (an optional output that was not asked for).

    Raises:
        OutputError, OutputLockedError, FileExistsError: with one-line messages.
    """
    if path is None:
        yield None
        return
    check_writable(path, kind=kind, overwrite=True, flag=flag)
    with output_lock(path, what=what):
        yield check_writable(path, kind=kind, overwrite=overwrite, flag=flag)
