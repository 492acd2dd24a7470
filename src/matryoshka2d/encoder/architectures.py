"""Where each supported backbone keeps its transformer blocks.

This is the only module that knows architecture internals. Everything else asks it for the block list,
the depth, or a context in which the backbone runs only its first ``n`` blocks (real early exit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """Location of the block list inside a backbone and the config field holding the depth."""

    blocks_path: str
    depth_field: str


LAYOUTS: dict[str, BlockLayout] = {
    "bert": BlockLayout("encoder.layer", "num_hidden_layers"),
    "roberta": BlockLayout("encoder.layer", "num_hidden_layers"),
    "xlm-roberta": BlockLayout("encoder.layer", "num_hidden_layers"),
    "camembert": BlockLayout("encoder.layer", "num_hidden_layers"),
    "electra": BlockLayout("encoder.layer", "num_hidden_layers"),
    "mpnet": BlockLayout("encoder.layer", "num_hidden_layers"),
    "distilbert": BlockLayout("transformer.layer", "n_layers"),
}


def layout_for(model_type: str) -> BlockLayout:
    """Return the block layout of ``model_type``.

    Raises:
        ValueError: the architecture is not supported.
    """
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise ValueError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}. "
            "Use one of these encoders or open an issue to add its block layout."
        ) from None


def _owner_and_attr(backbone: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    owner = backbone
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


def get_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks."""
    owner, attr = _owner_and_attr(backbone, layout_for(backbone.config.model_type).blocks_path)
    return getattr(owner, attr)


def get_depth(backbone: nn.Module) -> int:
    """Number of transformer blocks the backbone holds."""
    return len(get_blocks(backbone))


def set_depth_in_config(config: object, depth: int) -> None:
    """Write ``depth`` into the config field that the architecture reads its depth from."""
    setattr(config, layout_for(config.model_type).depth_field, depth)  # type: ignore[attr-defined]


def config_depth(config: object) -> int:
    """Depth recorded in a config (may disagree with the weights of a damaged folder)."""
    return int(getattr(config, layout_for(config.model_type).depth_field))  # type: ignore[attr-defined]


@contextlib.contextmanager
def running_blocks(backbone: nn.Module, n: int) -> Iterator[None]:
    """Within the context, the backbone runs only blocks ``1..n`` (the others are detached, never called).

    The original block list is restored on exit, even if the forward pass raises. Not thread-safe: do not
    share one model across threads that exit at different depths.
    """
    owner, attr = _owner_and_attr(backbone, layout_for(backbone.config.model_type).blocks_path)
    blocks = getattr(owner, attr)
    if n == len(blocks):
        yield
        return
    setattr(owner, attr, nn.ModuleList(list(blocks)[:n]))
    try:
        yield
    finally:
        setattr(owner, attr, blocks)
