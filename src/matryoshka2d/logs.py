"""How the applications (``m2d``, ``make demo``) set up logging: the one place, since the library configures
none (each module only has ``logging.getLogger(__name__)``).

Other libraries' chatter on success is silenced here, once (``-v`` keeps it):

- faiss tries its fastest build first and logs every build this CPU lacks ("Could not load library with
  AVX512 support") at INFO: the build it then loads works, so only its warnings are kept.
- transformers draws a progress bar for every ``save_pretrained`` ("Writing model shards"); the bars worth
  seeing are those of work that takes time. Set through the hub's variable, before transformers is imported.
"""

from __future__ import annotations

import logging
import os


def setup_logging(level: int, *, verbose: bool = False) -> None:
    """Log ``level`` and above to stderr as ``LEVEL name: message``; third parties quiet unless ``verbose``."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if verbose:
        return
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
