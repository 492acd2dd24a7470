"""Embeddings of many texts at one or several exits from one backbone pass per batch.

:func:`embed_layers` is what :meth:`MatryoshkaEncoder.encode <matryoshka2d.encoder.model.MatryoshkaEncoder.encode>`
and the grid evaluator run; the batches come from :class:`~matryoshka2d.encoder.tokenization.TokenBatches`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka2d.encoder.tokenization import TokenBatches, check_texts
from matryoshka2d.truncation import truncate

logger = logging.getLogger(__name__)


class MultiExitModel(Protocol):
    """What :func:`embed_layers` needs of a model: :class:`~matryoshka2d.encoder.model.MatryoshkaEncoder`."""

    tokenizer: Any
    max_seq_length: int
    training: bool

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def check_layer(self, layer: int | None) -> int: ...

    def check_dim(self, dim: int | None) -> int: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def __call__(self, features: dict[str, torch.Tensor], layers: Sequence[int] | None = None,
                 input_type: str = "document") -> dict[int, torch.Tensor]: ...


@torch.inference_mode()
def embed_layers(model: MultiExitModel, texts: Sequence[str], layers: Sequence[int], *, dim: int | None = None,
                 normalize: bool = False, batch_size: int = 64, show_progress_bar: bool | None = None,
                 desc: str = "encode", progress: Callable[[int], None] | None = None,
                 input_type: str = "document") -> dict[int, np.ndarray]:
    """Pooled embeddings of ``texts`` at every layer in ``layers``, each batch from ONE backbone pass.

    The pass stops after the deepest requested layer. Rows come back in input order.

    Args:
        model: the encoder (switched to eval mode for the call, then restored).
        texts: non-empty list of strings.
        layers: exits in ``1..N``.
        dim: keep the first ``dim`` coordinates; ``None`` keeps all ``D``.
        normalize: L2-normalise each vector after the truncation to ``dim``.
        batch_size: texts per forward pass.
        show_progress_bar: ``None`` shows one for more than 10 batches when logging is at INFO.
        desc: the progress bar's label.
        progress: called with the number of texts after every batch (a caller's own bar).
        input_type: ``"query"`` takes the query path of exits that have one (see ``MatryoshkaEncoder.forward``).

    Returns:
        ``{layer: float32 array (len(texts), dim or D)}``.

    Raises:
        ValueError: bad texts, or a layer / dim / batch size out of range.
    """
    items = check_texts(texts)
    wanted = sorted({model.check_layer(n) for n in layers})
    width = model.hidden_size if dim is None else model.check_dim(dim)
    batches = TokenBatches(model.tokenizer, items, batch_size=batch_size, max_length=model.max_seq_length)
    out = {n: np.empty((len(items), width), dtype=np.float32) for n in wanted}
    if show_progress_bar is None:
        show_progress_bar = len(items) > 10 * batch_size and logger.isEnabledFor(logging.INFO)
    was_training, device = model.training, model.device
    model.eval()
    try:
        with tqdm(total=len(items), unit="text", desc=desc, disable=not show_progress_bar) as bar:
            for rows, arrays in batches:
                features = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
                kwargs = {"input_type": input_type} if input_type != "document" else {}
                for n, emb in model(features, layers=wanted, **kwargs).items():
                    emb = emb[:, :width]
                    out[n][rows] = (truncate(emb) if normalize else emb).cpu().numpy()
                bar.update(len(rows))
                if progress is not None:
                    progress(len(rows))
    finally:
        model.train(was_training)
    if batches.num_truncated:
        logger.warning("%s: %d of %d texts were longer than max_seq_length=%d tokens and were truncated",
                       desc, batches.num_truncated, len(items), model.max_seq_length)
    return out
