"""``--device`` checked against what this torch build and machine have, before any model is loaded."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_KNOWN = "cpu, cuda, cuda:N, mps"


def check_device(text: str, *, flag: str = "--device") -> str:
    """Return ``text`` if torch can run on that device here.

    Args:
        text: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        flag: the CLI flag, for the message.

    Raises:
        ValueError: an unknown device name, a device this torch build lacks (e.g. CUDA on a CPU-only
            torch), or a device index past the last one.
    """
    import torch

    name = str(text).strip()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {text!r} is not a device torch knows; pass one of {_KNOWN}") from None
    kind, index = device.type, device.index
    if kind == "cpu":
        return name
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"{flag} {text}: {why} (torch {torch.__version__}); pass {flag} cpu")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise ValueError(f"{flag} {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; "
                             f"pass one of those")
        return name
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {text}: MPS (Apple GPU) is not available here; pass {flag} cpu")
        return name
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    if callable(available) and available():
        return name
    raise ValueError(f"{flag} {text}: torch has no usable {kind!r} device here; pass one of {_KNOWN}")
