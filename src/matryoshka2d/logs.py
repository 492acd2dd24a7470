"""How the applications (``m2d``, ``make demo``) set up logging: the one place, since the library configures
none (each module only has ``logging.getLogger(__name__)``).

Other libraries' chatter on a successful run is silenced here, once, by :func:`setup_logging` (``-v`` keeps
all of it; ``-q`` also hides every progress bar):

- faiss tries its fastest build first and logs every build this CPU lacks ("Could not load library with
  AVX2 support") at INFO: the build it then loads works, so only its warnings are kept.
- numba (which ranx compiles its metrics with) warns about its optional threading layers (TBB) on import:
  nothing we run uses them.
- transformers draws a progress bar for every ``save_pretrained`` ("Writing model shards"); the bars worth
  seeing are those of work that takes time. Set through the hub's variable before transformers is imported,
  and through transformers' own switch when it already is.
- Ray Data logs its execution plan and progress at INFO for every dataset: set through the environment it
  reads (``RAY_DATA_LOG_LEVEL``); its logs under ``/tmp/ray`` keep everything. Ray's one
  ``E ... core_worker.cc`` line per run, about actor restarts, is explained in ``docs/encoding.md`` instead:
  ``RAY_BACKEND_LOG_LEVEL`` would hide it, but then every Ray process prints a line saying it read that variable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# library loggers whose INFO lines are noise for a user (faiss names every CPU build it tries: AVX512, AVX2)
NOISY_LOGGERS = ("faiss.loader", "numba")
# read by the libraries when they are imported or started; a value the user set is kept
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}
# -q: every progress bar (tqdm's, also inside Ray workers) and transformers' warnings too
SILENT_ENV = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def setup_logging(level: int, *, verbose: bool = False, quiet: bool = False) -> contextlib.ExitStack:
    """Log ``level`` and above to stderr as ``LEVEL name: message``, and quiet other libraries (module doc).

    The settings apply at once; the returned stack puts the libraries' settings (environment, logger levels,
    warning filters, transformers' bar switch) back when it is closed, so ``with setup_logging(...):`` around
    one command leaves an in-process caller (a test, a notebook) as it was.

    Args:
        level: the root logger's level.
        verbose: ``-v``: keep every library's output.
        quiet: ``-q``: also no progress bars and no transformers warnings.

    Returns:
        An :class:`contextlib.ExitStack` that restores the libraries' settings.
    """
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    stack = contextlib.ExitStack()
    if verbose:
        return stack
    env = {**QUIET_ENV, **(SILENT_ENV if quiet else {})}
    saved_env = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    stack.callback(_restore_environ, saved_env)
    for name in NOISY_LOGGERS:
        target = logging.getLogger(name)
        stack.callback(target.setLevel, target.level)
        target.setLevel(max(logging.WARNING, level))
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", module=r"numba(\.|$)")
    warnings.filterwarnings("ignore", message=r"(?s).*\bnumba\b", category=Warning)
    hf_logging = sys.modules.get("transformers.utils.logging")  # imported already: its switch, not the env
    if hf_logging is not None and hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        stack.callback(hf_logging.enable_progress_bar)
    return stack


def _restore_environ(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
