"""The peer: sentence-transformers loading the same folder, physically truncated like our exits."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka2d.encoder import architectures
from matryoshka2d.io.folder import resolve_model_path
from matryoshka2d.vocab import ST_POOLING_MODES, install_hint, st_pooling_name

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder


def require_peer() -> Any:
    """The ``SentenceTransformer`` class.

    Raises:
        ImportError: sentence-transformers is not installed (the message says how to install it).
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"--peer sentence-transformers needs the sentence-transformers library: "
                          f"{install_hint('st')}") from None
    return SentenceTransformer


def load_peer(source: str, model: MatryoshkaEncoder, device: str) -> Any:
    """sentence-transformers' model of the same folder, with the same pooling and max_seq_length.

    Raises:
        ImportError: sentence-transformers is not installed.
        ValueError: our pooling has no sentence-transformers equivalent.
    """
    sentence_transformer = require_peer()
    folder = Path(resolve_model_path(source))
    if (folder / "modules.json").is_file():
        st = sentence_transformer(str(folder), device=device)
    else:
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Normalize, Pooling, Transformer
        name = st_pooling_name(model.pooling)
        if name is None:
            single = [mode for mode in ST_POOLING_MODES if st_pooling_name(mode)]
            raise ValueError(f"pooling {model.pooling!r} has no sentence-transformers equivalent "
                             f"({', '.join(single)} do); run without --peer")
        pooling = Pooling(model.hidden_size, name)
        st = sentence_transformer(modules=[Transformer(str(folder)), pooling, Normalize()], device=device)
    st.max_seq_length = model.max_seq_length
    return st.eval()


def truncate_peer(st: Any, layers: int) -> Any:
    """A copy of the sentence-transformers model holding only blocks ``1..layers`` (config updated)."""
    with architectures.running_blocks(st[0].auto_model, layers):
        out = copy.deepcopy(st)
    architectures.set_depth_in_config(out[0].auto_model.config, layers)
    return out


def peer_runner(st: Any, dim: int, width: int) -> Callable[[list[str], int], np.ndarray]:
    """``run(texts, batch_size)`` of the peer at width ``dim`` (of ``width``), L2-normalised, float32."""
    return lambda texts, bs: np.asarray(st.encode(
        texts, batch_size=bs, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True,
        truncate_dim=dim if dim < width else None), dtype=np.float32)
