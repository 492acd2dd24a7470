"""Losses that put a shallow query exit into the document exit's space (method.md section 8).

Notation: ``q`` = queries at a shallow exit ``(n, d)``, ``p`` = documents at the document exit ``(N, d)``,
``t`` = the same texts at the document exit (the teacher), all at width ``d``; ``sg`` = stop-gradient;
``tau`` = 20 as for InfoNCE. Every function takes pooled (not normalised) vectors, slices the Matryoshka prefix
``[:, :d]`` itself and L2-normalises it, so one call scores one width.

* :func:`cross_exit_infonce`: InfoNCE of ``tau * cos(q, p)``; row ``i`` of ``q`` has ``p[i]`` as its positive,
  every other document of the batch (and the hard negatives, more rows of ``p``) as negatives.
* :func:`embedding_alignment`: ``dist(x_n, sg(x_N))`` on every text, ``1 - cos`` (default) or the MSE of the
  normalised vectors; needs no labels.
* :func:`score_distillation`: ``KL(softmax(tau * cos(sg(q_N), p)) || softmax(tau * cos(q_n, p)))`` over the
  in-batch documents (KALE, Starbucks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import ALIGN_DISTANCES, AlignDistance

DEFAULT_TAU = 20.0


def _prefix(x: Tensor, dim: int | None) -> Tensor:
    """The first ``dim`` coordinates, L2-normalised (:func:`~matryoshka2d.truncation.truncate`), in float32."""
    return truncate(x.float(), dim)


def cross_exit_infonce(queries: Tensor, docs: Tensor, dim: int | None = None, *, tau: float = DEFAULT_TAU) -> Tensor:
    """InfoNCE of queries at a shallow exit against documents at the document exit.

    Args:
        queries: ``(B, D)`` pooled query vectors (the student exit).
        docs: ``(M, D)`` pooled document vectors at the document exit, ``M >= B``: row ``i < B`` is query ``i``'s
            positive, rows ``B..M-1`` extra (hard) negatives for every query.
        dim: the width ``d`` (``None``: all ``D``).
        tau: the scale of the cosines.

    Returns:
        The mean cross-entropy over queries (a 0-d tensor).
    """
    q, p = _prefix(queries, dim), _prefix(docs, dim)
    if p.shape[0] < q.shape[0]:
        raise ValueError(f"cross_exit_infonce needs a positive per query: {q.shape[0]} queries, {p.shape[0]} docs")
    logits = tau * q @ p.T
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def embedding_alignment(student: Tensor, teacher: Tensor, dim: int | None = None, *,
                        distance: AlignDistance = "cosine") -> Tensor:
    """``dist(student, sg(teacher))`` at width ``dim``, mean over rows.

    ``cosine``: ``1 - cos``; ``mse``: the mean squared difference of the normalised vectors, summed over
    coordinates (``= 2 - 2 cos``, so both have the same minimiser; ``mse`` weights far rows twice as much).
    """
    s, t = _prefix(student, dim), _prefix(teacher.detach(), dim)
    if distance == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    if distance == "mse":
        return ((s - t) ** 2).sum(-1).mean()
    raise ValueError(f"distance {distance!r} is not one of {', '.join(ALIGN_DISTANCES)}")


def score_distillation(queries: Tensor, teacher_queries: Tensor, docs: Tensor, dim: int | None = None, *,
                       tau: float = DEFAULT_TAU) -> Tensor:
    """KL of the student's in-batch score distribution from the teacher's, over the same documents.

    Args:
        queries: ``(B, D)`` the queries at the student exit.
        teacher_queries: ``(B, D)`` the same queries at the document exit (detached here).
        docs: ``(M, D)`` documents at the document exit (detached here: the document space is the target).
        dim: the width ``d``.
        tau: the scale of the cosines.

    Returns:
        ``KL(teacher || student)`` averaged over queries (``batchmean``).
    """
    p = _prefix(docs.detach(), dim)
    student = F.log_softmax(tau * _prefix(queries, dim) @ p.T, dim=-1)
    teacher = F.log_softmax(tau * _prefix(teacher_queries.detach(), dim) @ p.T, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def mean_over_dims(fn, dims: Sequence[int | None], *args, **kwargs) -> Tensor:  # noqa: ANN001
    """``fn(*args, dim=d, **kwargs)`` averaged over the widths ``dims``."""
    return torch.stack([fn(*args, dim=d, **kwargs) for d in dims]).mean()
