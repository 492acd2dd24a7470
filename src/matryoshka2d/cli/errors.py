"""The CLI's error boundary: which exceptions are the user's or the environment's (exit 2, one line) and
which are bugs (exit 1, one line and a hint to rerun with ``--debug``).

Library modules raise ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``OSError`` with
messages that name the path or value and the fix; errors of the libraries underneath (safetensors,
tokenizers, zip archives, torch devices, memory) are recognised here by type, without importing those
libraries (``m2d --help`` stays light).
"""

from __future__ import annotations

import logging
import sys
import zipfile

from matryoshka2d.io.outputs import describe_os_error

logger = logging.getLogger(__name__)

USER_ERROR = 2
INTERNAL_ERROR = 1
_MAX_LINE = 600


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined, or only the first when they are many or long."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    joined = " ".join(lines)
    line = joined if len(joined) <= _MAX_LINE else lines[0]
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


def _loaded_type(module: str, name: str) -> type | None:
    """``module.name`` if that module is already imported (else it cannot have raised), else ``None``."""
    mod = sys.modules.get(module)
    found = getattr(mod, name, None) if mod is not None else None
    return found if isinstance(found, type) else None


def describe_error(e: BaseException) -> str | None:
    """The one-line message of a user or environment error, or ``None`` for an unexpected one (a bug)."""
    if isinstance(e, MemoryError):
        return "out of memory; lower --batch-size, use fewer sentences or a machine with more memory"
    oom = _loaded_type("torch", "OutOfMemoryError")
    if oom is not None and isinstance(e, oom):
        return f"the device ran out of memory ({one_line(str(e))[:160]}); lower --batch-size"
    if isinstance(e, OSError):
        return one_line(describe_os_error(e))
    if isinstance(e, zipfile.BadZipFile | zipfile.LargeZipFile):
        return f"a zip/.npz file is damaged ({one_line(str(e))}); rewrite it (e.g. rerun m2d eval --output)"
    safetensor_error = _loaded_type("safetensors", "SafetensorError")
    if safetensor_error is not None and isinstance(e, safetensor_error):
        return f"a .safetensors file is damaged ({one_line(str(e))}); re-save or re-copy the model folder"
    if isinstance(e, ValueError | ImportError):  # our checks (UnicodeError, JSON and TOML errors included)
        return one_line(str(e)) or type(e).__name__
    return None


def report(command: str, e: BaseException, *, debug: bool) -> int:
    """Print ``e`` for the user (with the traceback under ``--debug``); return the exit code."""
    if debug:
        import traceback

        traceback.print_exception(e)
    message = describe_error(e)
    if message is not None:
        print(f"m2d {command}: error: {message}", file=sys.stderr)
        return USER_ERROR
    detail = one_line(str(e))[:200]
    print(f"m2d {command}: internal error: {type(e).__name__}{': ' + detail if detail else ''}; "
          f"{'the traceback is above' if debug else 'rerun with --debug for the traceback'} and please "
          f"report it", file=sys.stderr)
    return INTERNAL_ERROR
