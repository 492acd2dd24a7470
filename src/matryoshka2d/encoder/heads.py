"""Exit heads: a small trainable map from the pooled vector of an exit to the embedding it reports.

Without heads, exit ``n`` reports ``pool(hidden_states[n])``, the very states that block ``n + 1`` reads, so
training a shallow exit pulls on what the block passes on. A head decouples the two: exit ``n`` reports
``head_n(pool(hidden_states[n]))`` while block ``n + 1`` still reads the raw states. Heads act on the
pooled float32 vector, before dim truncation (the Matryoshka prefix is taken from the head's output).

Kinds: ``linear``, a square ``D x D`` ``nn.Linear`` with bias, initialised to the identity and a zero bias,
so adding heads changes no embedding until they are trained.

A model folder stores its heads in ``exit_heads.safetensors`` (tensors ``"{layer}.weight"`` and
``"{layer}.bias"``) and names them in ``matryoshka2d.json`` as ``"exit_heads": {"kind": ..., "layers": [...]}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

ExitHeadKind = Literal["linear"]
EXIT_HEAD_KINDS: tuple[str, ...] = get_args(ExitHeadKind)
HEADS_FILE = "exit_heads.safetensors"


def check_kind(kind: Any) -> ExitHeadKind:
    """Return ``kind`` if it is a known head kind.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in EXIT_HEAD_KINDS:
        raise ValueError(f"unknown exit head kind {kind!r}; choose one of {', '.join(EXIT_HEAD_KINDS)}")
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


def heads_entry(model: MatryoshkaEncoder) -> dict[str, Any] | None:
    """The ``exit_heads`` entry of ``matryoshka2d.json`` (``None`` when the model has no heads)."""
    layers = model.exit_head_layers
    return {"kind": model.exit_head_kind, "layers": layers} if layers else None


def save_heads(model: MatryoshkaEncoder, folder: Path) -> dict[str, Any] | None:
    """Write ``exit_heads.safetensors`` into ``folder`` when ``model`` has heads.

    Returns:
        The ``exit_heads`` entry for ``matryoshka2d.json``, or ``None`` (nothing written).
    """
    from safetensors.torch import save_file

    entry = heads_entry(model)
    if entry is None:
        return None
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.exit_heads.state_dict().items()}
    save_file(tensors, str(Path(folder) / HEADS_FILE), metadata={"kind": str(entry["kind"])})
    return entry


def load_heads(model: MatryoshkaEncoder, folder: Path, entry: Any) -> None:
    """Add the heads named by ``entry`` (from ``matryoshka2d.json``) to ``model`` with the weights in ``folder``.

    Raises:
        ValueError: a malformed entry, a missing or damaged file, or tensors that do not match the entry
            or the model's width.
    """
    from safetensors.torch import load_file

    where = Path(folder)
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), list) or not entry["layers"]:
        raise ValueError(f"{where}: matryoshka2d.json has exit_heads = {entry!r}, expected "
                         "{'kind': 'linear', 'layers': [1, 2, ...]}; re-save the model")
    kind, layers = entry.get("kind"), entry["layers"]
    if kind not in EXIT_HEAD_KINDS:
        raise ValueError(f"{where}: exit head kind {kind!r} is not known to this version of matryoshka2d "
                         f"(it knows {', '.join(EXIT_HEAD_KINDS)}); upgrade matryoshka2d")
    n = model.num_layers
    if not all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= n for m in layers):
        raise ValueError(f"{where}: exit_heads layers {layers} must be integers in 1..{n} (this model has {n} "
                         "layers); the folder is inconsistent, re-save it")
    path = where / HEADS_FILE
    if not path.is_file():
        raise ValueError(
            f"{where}: matryoshka2d.json lists {kind} exit heads on layers {layers}, but {HEADS_FILE} is "
            "missing, so those exits cannot be computed; copy the whole folder again or re-save the model"
        )
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is damaged or not a safetensors file ({e}); re-save or re-copy the "
                         "folder") from e
    d = model.hidden_size
    expected = {f"{m}.{p}": (d, d) if p == "weight" else (d,) for m in layers for p in ("weight", "bias")}
    if set(tensors) != set(expected):
        raise ValueError(f"{path} holds tensors {sorted(tensors)}, but matryoshka2d.json lists heads on layers "
                         f"{layers} (expected {sorted(expected)}); the folder is inconsistent, re-save it")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} for a "
                             f"model of width {d}; the heads belong to another model, re-save it")
    model.add_exit_heads(kind, layers=layers)
    model.exit_heads.load_state_dict({k: v.float() for k, v in tensors.items()})


def folded_dense(head: nn.Module, modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(D, modes * D)`` and bias ``(D,)`` of one ``Dense`` that applies ``head`` to the average of
    ``modes`` concatenated pooled vectors (``modes`` = 1: the head itself; 2: cls_avg's CLS and mean).
    """
    weight: torch.Tensor = head.weight.detach().float().cpu()  # type: ignore[operator]
    bias: torch.Tensor = head.bias.detach().float().cpu()  # type: ignore[operator]
    return torch.cat([weight / modes] * modes, dim=1).contiguous(), bias.contiguous()


def check_layers(model: MatryoshkaEncoder, layers: Sequence[int] | None) -> list[int]:
    """Layers for new heads: ``None`` means ``1..N-1`` (the last exit stays the plain backbone output).

    Raises:
        ValueError: a layer outside ``1..N``.
    """
    if layers is None:
        return list(range(1, model.num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of exit layers, got {layers!r}; pass e.g. [1, 2, 3] or None")
    if any(m is None for m in layers):
        raise ValueError(f"layers {list(layers)} holds None; pass exit layers in 1..{model.num_layers}")
    return sorted({model.check_layer(m) for m in layers})
