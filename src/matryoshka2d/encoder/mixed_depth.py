"""One forward pass for a batch whose rows exit at different layers (a depth-sorted batch).

Rows are sorted deepest first. The embeddings and blocks ``1..n`` run once for every row still in the batch;
after block ``n`` the rows whose exit is ``n`` are pooled (and given their exit head) and leave the batch, so
block ``n + 1`` runs only on the deeper rows. A mixed-depth batch costs about its mean depth, not its maximum.

The inputs every block receives (hidden states, the attention mask in whatever form the installed
``transformers`` builds it, MPNet's relative position bias, ...) are taken from the backbone itself: a
pre-hook on block 1 records them and stops the pass, so this module knows no architecture internals beyond
:func:`~matryoshka2d.encoder.architectures.get_blocks`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from matryoshka2d.encoder import architectures, heads
from matryoshka2d.encoder.pooling import pool
from matryoshka2d.encoder.tokenization import FEATURE_KEYS

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)


class _BlockInputsCaptured(Exception):
    """Raised by the pre-hook on block 1 once it has recorded the block's inputs (stops the pass)."""


def block_inputs(backbone: torch.nn.Module, features: dict[str, torch.Tensor]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments the backbone passes to its first block for ``features``.

    The backbone runs its embeddings and its own mask construction, then stops before block 1.

    Args:
        backbone: a supported ``transformers`` encoder.
        features: ``input_ids``, ``attention_mask`` and optional ``token_type_ids`` tensors.

    Returns:
        ``(args, kwargs)``; ``args[0]`` (or ``kwargs["hidden_states"]``) is the embedding output.

    Raises:
        RuntimeError: the backbone finished without calling its first block.
    """
    first = architectures.get_blocks(backbone)[0]
    seen: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["args"], seen["kwargs"] = args, kwargs
        raise _BlockInputsCaptured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        backbone(**features, return_dict=True)
    except _BlockInputsCaptured:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise RuntimeError(f"{type(backbone).__name__} never called its first block; mixed-depth batches "
                           "cannot be formed for this architecture")
    return seen["args"], seen["kwargs"]


def _take(value: Any, size: int, keep: int) -> Any:
    """``value[:keep]`` for a tensor whose first dim is the batch (``size``); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[:keep]
    return value


@torch.inference_mode()
def forward_mixed_depth(model: MatryoshkaEncoder, features: dict[str, torch.Tensor],
                        exits: Sequence[int] | torch.Tensor,
                        on_exit: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Pooled (not normalised) embeddings, row ``i`` taken at layer ``exits[i]``, from one depth-sorted pass.

    Equal (to float rounding) to ``model.forward(features, layers=[n])[n]`` for the rows that exit at ``n``,
    head included. Row ``i`` runs blocks ``1..exits[i]`` only.

    Args:
        model: the encoder (used as is: put it in eval mode first).
        features: padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) tensors on the model's device.
        exits: one exit layer in ``1..N`` per row.
        on_exit: called as soon as rows leave the batch, with their positions in the input (a 1-D long tensor)
            and their pooled vectors, so their results can go out before the deeper rows finish.

    Returns:
        ``(batch, D)`` float32 tensor in input row order.

    Raises:
        ValueError: ``exits`` does not have one valid layer per row.
    """
    inputs = {k: v for k, v in features.items() if k in FEATURE_KEYS}
    mask = inputs["attention_mask"]
    batch = int(mask.shape[0])
    layers = [model.check_layer(int(n)) for n in (exits.tolist() if isinstance(exits, torch.Tensor) else exits)]
    if len(layers) != batch:
        raise ValueError(f"exits has {len(layers)} layers for a batch of {batch} rows; pass one exit per row")
    depth = torch.tensor(layers, dtype=torch.long)
    order = torch.sort(depth, descending=True, stable=True).indices  # deepest first: leaving rows are the tail
    sorted_depth = depth[order]
    device_order = order.to(mask.device)
    inputs = {k: v.index_select(0, device_order) for k, v in inputs.items()}
    mask = inputs["attention_mask"]
    args, kwargs = block_inputs(model.backbone, inputs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    blocks = architectures.get_blocks(model.backbone)
    out = torch.empty((batch, model.hidden_size), dtype=torch.float32, device=mask.device)
    active = batch
    for n, block in enumerate(blocks[: int(sorted_depth[0])], start=1):
        result = block(hidden, *rest, **kwargs)
        hidden = result[0] if isinstance(result, tuple) else result
        stay = int((sorted_depth > n).sum())  # rows deeper than n, at the head of the batch
        if stay < active:
            pooled = pool(hidden[stay:active].float(), mask[stay:active], model.pooling)
            if str(n) in model.exit_heads:
                pooled = heads.apply_head(model.exit_heads[str(n)], pooled)
            out[device_order[stay:active]] = pooled
            if on_exit is not None:
                on_exit(order[stay:active], pooled)
        if stay == 0:
            break
        if stay < active:
            hidden = hidden[:stay]
            rest = tuple(_take(a, active, stay) for a in rest)
            kwargs = {k: _take(v, active, stay) for k, v in kwargs.items()}
            active = stay
    return out
