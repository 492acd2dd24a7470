"""Base losses over a batch of sentence embeddings: CoSENT, in-batch negatives, Angle and AnglE.

Every loss takes ``embeddings`` (one ``(batch, d)`` tensor per input column, pooled and possibly
truncated, NOT normalised) and ``labels`` (a ``(batch,)`` score tensor or ``None`` for unscored
pairs/triplets) and returns a scalar. None of them sees the model, so each is testable on plain tensors.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matryoshka2d.vocab import BASE_LOSSES

logger = logging.getLogger(__name__)

_ALIASES = {"infonce": "ibn"}


# --------------------------------------------------------------------------------------- checks
def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_positive(name: str, value: float, example: float = 20.0) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise ValueError naming ``name``."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; pass e.g. {example:g}")
    return float(value)


def check_weight(name: str, value: float) -> float:
    """Return ``value`` as float if it is a finite number >= 0, else raise ValueError naming ``name``."""
    if not _is_real(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}; pass e.g. 1.0 (0 = term off)")
    return float(value)


def _check_embeddings(
    loss: str, embeddings: Sequence[Tensor], *, exact: int | None = None, minimum: int = 2
) -> list[Tensor]:
    cols = list(embeddings) if isinstance(embeddings, (list, tuple)) else None
    if cols is None or not all(isinstance(e, Tensor) for e in cols):
        raise ValueError(f"{loss}: embeddings must be a list of (batch, dim) tensors, one per input column")
    if (exact is not None and len(cols) != exact) or len(cols) < minimum:
        want = f"exactly {exact}" if exact is not None else f"at least {minimum}"
        raise ValueError(f"{loss} needs {want} input columns, got {len(cols)}")
    shape = cols[0].shape
    if len(shape) != 2 or shape[0] == 0 or any(e.shape != shape for e in cols):
        raise ValueError(
            f"{loss}: every column must be a non-empty (batch, dim) tensor of the same shape, "
            f"got shapes {[tuple(e.shape) for e in cols]}"
        )
    return cols


def _check_scores(loss: str, labels: Tensor | None, batch: int) -> Tensor:
    if labels is None:
        raise ValueError(
            f"{loss} needs graded scores (columns sentence1, sentence2, score) but got no labels; "
            "for unscored pairs or triplets use the 'ibn' loss (or 'angle-total' on triplets)"
        )
    scores = torch.as_tensor(labels).reshape(-1)
    if scores.numel() != batch:
        raise ValueError(
            f"{loss}: got {scores.numel()} scores for a batch of {batch} pairs; pass one score per pair"
        )
    scores = scores.float()
    if not torch.isfinite(scores).all():
        raise ValueError(
            f"{loss}: scores contain NaN or inf; clean the data (every score must be a finite number)"
        )
    return scores


# --------------------------------------------------------------------------------------- functions
def pair_cosine(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise cosine similarity of two ``(batch, d)`` tensors (float32)."""
    return (F.normalize(x.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(-1)


def angle_difference(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise angle difference in complex space, in radians ``[0, pi]``.

    Each ``d``-vector is read as ``d/2`` complex numbers (first half real parts, second half imaginary
    parts). The result is ``|arg(<x, y>)|`` where ``<x, y> = sum_k x_k * conj(y_k)``: the circular mean of the
    per-coordinate phase differences, 0 for identical directions and pi for opposite ones. Pairs whose
    complex inner product is (numerically) zero get pi/2 and no gradient.

    Raises:
        ValueError: odd ``d``.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(
            f"angle loss splits each vector into real and imaginary halves, so dim must be even, got {d}"
        )
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    c, e = y[..., : d // 2], y[..., d // 2 :]
    re = (a * c + b * e).sum(-1)
    im = (b * c - a * e).sum(-1)
    small = re.square() + im.square() < 1e-12
    angle = torch.atan2(torch.where(small, 0.0, im), torch.where(small, 1.0, re)).abs()
    return torch.where(small, torch.full_like(angle, math.pi / 2), angle)


def ranking_loss(similarity: Tensor, scores: Tensor, scale: float) -> Tensor:
    """CoSENT ranking: ``log(1 + sum_{y_i > y_j} exp(scale * (sim_j - sim_i)))``.

    Only the order of ``scores`` matters (any scale, e.g. STS 0..5, works). With all scores equal there is
    nothing to rank and the loss is 0.
    """
    diff = scale * (similarity[None, :] - similarity[:, None])  # [i, j] = scale * (sim_j - sim_i)
    ordered = scores[:, None] > scores[None, :]
    terms = diff[ordered]
    if terms.numel() == 0:
        return similarity.sum() * 0.0  # keeps the graph (and the device) with a zero gradient
    return F.softplus(torch.logsumexp(terms, dim=0))  # log(1 + sum exp), precise for tiny sums


# --------------------------------------------------------------------------------------- losses
class BaseLoss(nn.Module):
    """A loss over ``embeddings`` (one ``(batch, d)`` tensor per column, not normalised) and ``labels``."""

    name: ClassVar[str] = "base"
    requires_scores: ClassVar[bool] = False
    """True when the loss needs a graded score per pair (``labels`` must not be ``None``)."""
    requires_even_dim: bool = False
    """True when every dim it sees must be even (the Angle term)."""

    def forward(
        self, embeddings: Sequence[Tensor], labels: Tensor | None = None
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments (for run logs and model cards)."""
        return {"name": self.name}


class _PairRankingLoss(BaseLoss):
    """Shared body of CoSENT and Angle: rank the pairs' similarity by their gold scores."""

    requires_scores = True

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = check_positive("scale", scale)

    def similarity(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        x, y = _check_embeddings(self.name, embeddings, exact=2)
        scores = _check_scores(self.name, labels, x.shape[0]).to(x.device)
        return ranking_loss(self.similarity(x, y), scores, self.scale)

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


class CoSENTLoss(_PairRankingLoss):
    """CoSENT on scored pairs: rank the pair cosines in the order of the gold scores.

    Args:
        scale: multiplies the cosines (method.md calls it tau; it is an inverse temperature).
    """

    name = "cosent"

    def similarity(self, x: Tensor, y: Tensor) -> Tensor:
        return pair_cosine(x, y)


class AngleLoss(_PairRankingLoss):
    """The AnglE angle objective on scored pairs: CoSENT ranking of the complex-space angle difference.

    A higher score must come with a smaller angle: ``log(1 + sum_{y_i > y_j} exp(scale * (a_i - a_j)))``
    with ``a`` from :func:`angle_difference`.

    Args:
        scale: multiplies the angles (radians).
    """

    name = "angle"
    requires_even_dim = True

    def similarity(self, x: Tensor, y: Tensor) -> Tensor:
        return -angle_difference(x, y)


class InBatchNegativesLoss(BaseLoss):
    """In-batch negatives (InfoNCE / multiple negatives ranking) on unscored pairs or triplets.

    Columns: ``anchor, positive[, negative, ...]``. Row ``i``'s target is its own positive; every other
    row's positive and every hard negative of every row are its negatives (cross-entropy over
    ``scale * cosine``). Under ``torch.distributed`` the candidates of all processes are gathered with
    gradients, so the negatives do not shrink with the number of processes; every process must then
    use the same batch size (drop the last incomplete batch).

    Args:
        scale: multiplies the cosines.
        gather_across_processes: gather candidates from all processes when distributed.

    Raises:
        ValueError (at call time): scores given (this loss is for positives only), or no negative at
        all (batch size 1 without hard negatives).
    """

    name = "ibn"

    def __init__(self, scale: float = 20.0, gather_across_processes: bool = True) -> None:
        super().__init__()
        self.scale = check_positive("scale", scale)
        self.gather_across_processes = bool(gather_across_processes)

    def forward(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        cols = _check_embeddings(self.name, embeddings)
        if labels is not None:
            raise ValueError(
                "ibn (in-batch negatives) trains on unscored (anchor, positive[, negative...]) columns, but "
                "scores were given; for scored pairs use 'cosent' or 'angle' ('angle-total' skips its ibn "
                "term on scored data), or keep only high-score pairs as unscored positives"
            )
        anchors = F.normalize(cols[0].float(), dim=-1)
        candidates = [F.normalize(c.float(), dim=-1) for c in cols[1:]]
        offset = 0
        if self.gather_across_processes and _world_size() > 1:
            import torch.distributed as dist
            from torch.distributed.nn.functional import all_gather

            candidates = [torch.cat(all_gather(c), dim=0) for c in candidates]
            offset = dist.get_rank() * anchors.shape[0]
        pool = torch.cat(candidates, dim=0)
        if pool.shape[0] < 2:
            raise ValueError(
                "ibn (in-batch negatives) got a batch of 1 pair and no hard negatives, so there is no "
                "negative to contrast with; use a batch size >= 2 (e.g. 32) or add a negative column"
            )
        logits = self.scale * anchors @ pool.T
        target = torch.arange(anchors.shape[0], device=logits.device) + offset
        return F.cross_entropy(logits, target)

    def config_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scale": self.scale,
            "gather_across_processes": self.gather_across_processes,
        }


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AnglELoss(BaseLoss):
    """The AnglE objective: ``w_cos * CoSENT + w_ibn * InBatchNegatives + w_angle * Angle``.

    On scored pairs the CoSENT and Angle terms rank the gold scores and the ibn term is skipped (scores
    do not say which pairs are positives). On unscored data the ibn term uses every column; the CoSENT and
    Angle terms rank (anchor, positive) above (anchor, negative) when negative columns exist, and are
    skipped for plain pairs.

    Args:
        w_cos, w_ibn, w_angle: term weights (0 disables a term).
        cos_scale, ibn_scale, angle_scale: each term's scale (method.md's tau).
        gather_across_processes: passed to the ibn term.

    Raises:
        ValueError: every weight is 0, or (at call time) no term applies to the data.
    """

    name = "angle-total"

    def __init__(
        self,
        w_cos: float = 1.0,
        w_ibn: float = 1.0,
        w_angle: float = 1.0,
        *,
        cos_scale: float = 20.0,
        ibn_scale: float = 20.0,
        angle_scale: float = 20.0,
        gather_across_processes: bool = True,
    ) -> None:
        super().__init__()
        self.w_cos = check_weight("w_cos", w_cos)
        self.w_ibn = check_weight("w_ibn", w_ibn)
        self.w_angle = check_weight("w_angle", w_angle)
        if self.w_cos == self.w_ibn == self.w_angle == 0:
            raise ValueError("angle-total: w_cos, w_ibn and w_angle are all 0; set at least one > 0")
        self.cosent = CoSENTLoss(cos_scale)
        self.ibn = InBatchNegativesLoss(ibn_scale, gather_across_processes)
        self.angle = AngleLoss(angle_scale)
        self.requires_even_dim = self.w_angle > 0
        self._warned_skip = False

    def parts(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted terms that apply to this batch (``cos``, ``ibn``, ``angle``); they sum to the loss."""
        cols = _check_embeddings(self.name, embeddings)
        if labels is not None:
            if len(cols) != 2:
                raise ValueError(f"{self.name}: scored data needs exactly 2 columns (pairs), got {len(cols)}")
            pair, scores = cols, labels
            if self.w_ibn > 0 and not self._warned_skip:
                logger.warning("angle-total: the ibn term (w_ibn=%g) is skipped on scored pairs", self.w_ibn)
                self._warned_skip = True
        elif len(cols) > 2:  # anchor vs positive (1) and vs each hard negative (0)
            n_neg = len(cols) - 2
            pair = [cols[0].repeat(n_neg + 1, 1), torch.cat(cols[1:], dim=0)]
            batch = cols[0].shape[0]
            scores = torch.cat([torch.ones(batch), torch.zeros(batch * n_neg)]).to(cols[0].device)
        else:
            pair, scores = None, None
        out: dict[str, Tensor] = {}
        if pair is not None and self.w_cos > 0:
            out["cos"] = self.w_cos * self.cosent(pair, scores)
        if labels is None and self.w_ibn > 0:
            out["ibn"] = self.w_ibn * self.ibn(cols, None)
        if pair is not None and self.w_angle > 0:
            out["angle"] = self.w_angle * self.angle(pair, scores)
        if not out:
            raise ValueError(
                f"angle-total: no term applies (w_cos={self.w_cos:g}, w_ibn={self.w_ibn:g}, "
                f"w_angle={self.w_angle:g}, {'scored' if labels is not None else 'unscored'} data with "
                f"{len(cols)} columns); unscored pairs need w_ibn > 0, scored pairs need w_cos or w_angle > 0"
            )
        return out

    def forward(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        return torch.stack(list(self.parts(embeddings, labels).values())).sum()

    def config_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "w_cos": self.w_cos,
            "w_ibn": self.w_ibn,
            "w_angle": self.w_angle,
            "cos_scale": self.cosent.scale,
            "ibn_scale": self.ibn.scale,
            "angle_scale": self.angle.scale,
            "gather_across_processes": self.ibn.gather_across_processes,
        }


_REGISTRY: dict[str, type[BaseLoss]] = {
    "cosent": CoSENTLoss,
    "ibn": InBatchNegativesLoss,
    "angle": AngleLoss,
    "angle-total": AnglELoss,
}


def build_base_loss(name: str, **kwargs: Any) -> BaseLoss:
    """Build a base loss by name (one of :data:`BASE_LOSSES`; ``infonce`` is an alias of ``ibn``).

    Raises:
        ValueError: unknown name, or an argument the loss does not take.
    """
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown base loss {name!r}; choose one of {', '.join(BASE_LOSSES)}")
    cls = _REGISTRY[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"base loss {key!r} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )
    return cls(**kwargs)
