"""Exit heads: a small trainable map from the pooled vector of an exit to the embedding it reports.

Without heads, exit ``n`` reports ``pool(hidden_states[n])``, the very states that block ``n + 1`` reads, so
training a shallow exit pulls on what the block passes on. A head decouples the two: exit ``n`` reports
``head_n(pool(hidden_states[n]))`` while block ``n + 1`` still reads the raw states. Heads act on the
pooled float32 vector, before dim truncation (the Matryoshka prefix is taken from the head's output).

Kinds: ``linear``, a square ``D x D`` ``nn.Linear`` with bias, initialised to the identity and a zero bias,
so adding heads changes no embedding until they are trained.

A model folder stores its heads in ``exit_heads.safetensors`` (tensors ``"{layer}.weight"`` and
``"{layer}.bias"``) and names them in ``matryoshka2d.json`` as ``"exit_heads": {"kind": ..., "layers": [...]}``
(see :mod:`matryoshka2d.io.exit_files`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from matryoshka2d.vocab import EXIT_HEAD_KINDS, ExitHeadKind, check_choice


def check_kind(kind: Any) -> ExitHeadKind:
    """Return ``kind`` if it is a known head kind.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in EXIT_HEAD_KINDS:
        check_choice("exit head kind", kind, EXIT_HEAD_KINDS)
    return kind  # type: ignore[no-any-return]


def build_head(kind: ExitHeadKind, hidden_size: int) -> nn.Module:
    """A new head of ``kind`` in float32 that returns its input unchanged (identity weight, zero bias)."""
    check_kind(kind)
    head = nn.Linear(hidden_size, hidden_size, bias=True, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(torch.eye(hidden_size))
        head.bias.zero_()
    return head


def apply_head(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """``head(pooled)`` computed in float32, whatever the head's dtype (a bf16 copy) and any autocast."""
    weight: torch.Tensor = head.weight  # type: ignore[assignment]
    bias: torch.Tensor | None = head.bias  # type: ignore[assignment]
    with _no_autocast(pooled.device.type):
        return F.linear(pooled.float(), weight.float(), None if bias is None else bias.float())


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    """Turn autocast off (mixed-precision training would run the head in bf16/fp16 otherwise)."""
    if device_type in ("cpu", "cuda"):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def folded_dense(head: nn.Module, modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(D, modes * D)`` and bias ``(D,)`` of one ``Dense`` that applies ``head`` to the average of
    ``modes`` concatenated pooled vectors (``modes`` = 1: the head itself; 2: cls_avg's CLS and mean).
    """
    weight: torch.Tensor = head.weight.detach().float().cpu()  # type: ignore[operator]
    bias: torch.Tensor = head.bias.detach().float().cpu()  # type: ignore[operator]
    return torch.cat([weight / modes] * modes, dim=1).contiguous(), bias.contiguous()
