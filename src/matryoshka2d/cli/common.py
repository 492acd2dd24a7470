"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from matryoshka2d.vocab import POOLING_MODES, install_hint


def add_model_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """The MODEL positional plus the loading flags every model-taking command has."""
    if optional:
        parser.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: minilm)")
    else:
        parser.add_argument("model", help="model folder, hub id, or 'minilm' (the offline default)")
    parser.add_argument("--pooling", default=None, help=f"override pooling: {', '.join(POOLING_MODES)}")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow code shipped in the model folder to run"
    )
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens per text (longer input is truncated); default: the model folder's value, "
                             "e.g. 64 for a model trained on STS-B sentences, so pass 256 or 512 for documents")


def load_model(args: argparse.Namespace):  # noqa: ANN201
    """The model of ``args.model`` with the loading flags of :func:`add_model_args`.

    Raises:
        ValueError: ``--max-seq-length`` outside ``1..`` the backbone's position limit.
    """
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.encoder.tokenization import default_max_length

    model = MatryoshkaEncoder.from_pretrained(
        args.model, pooling=args.pooling, trust_remote_code=args.trust_remote_code
    )
    length = getattr(args, "max_seq_length", None)
    if length is not None:
        limit = default_max_length(model.backbone, model.tokenizer)
        if not 1 <= length <= limit:
            raise ValueError(f"--max-seq-length {length} is out of range 1..{limit} (the positions this model "
                             f"has); pass a value in 1..{limit}")
        model.max_seq_length = length
    return model


def int_list(text: str, *, name: str, upper: int, allow_all: bool = True) -> list[int]:
    """Parse ``"1,2,4"`` or ``"all"`` into integers within ``1..upper``.

    Raises:
        ValueError: an item that is not an integer or is out of range.
    """
    if allow_all and text.strip().lower() == "all":
        return list(range(1, upper + 1))
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{name} {item!r} is not an integer; pass e.g. 1,2,4 or 'all'") from None
        if not 1 <= value <= upper:
            raise ValueError(f"{name} {value} is out of range 1..{upper}; pass values in 1..{upper}")
        values.append(value)
    return sorted(set(values))


def check_plot_path(path: str | None, *, flag: str = "--plot") -> None:
    """Before any work: matplotlib is installed and ``path``'s suffix is an image format it writes.

    Raises:
        ImportError: no matplotlib.
        ValueError: an unknown image format.
    """
    if path is None:
        return
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ImportError(f"{flag} needs matplotlib: {install_hint('plot')}") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if fmt not in formats:
        raise ValueError(f"{flag} {path}: matplotlib cannot write .{fmt} images; end the name with one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def add_input_type_arg(parser: argparse.ArgumentParser, *, default: str, when: str = "") -> None:
    """``--input-type query|document``: whether texts take an aligned exit's own query path (m2d align)."""
    from matryoshka2d.vocab import INPUT_TYPES

    parser.add_argument("--input-type", choices=INPUT_TYPES, default=default,
                        help=f"{when}how the texts are encoded: 'query' takes the own path of exits aligned by m2d "
                             f"align, 'document' the shared path (what an index holds); default {default}")
