"""The 2D Matryoshka objective (method.md section 3) and its baselines, from one code path.

Per step, each input column goes through the backbone ONCE, asking for the sampled shallow layer(s) and
the last layer together; every (layer, dim) exit is then a pooled vector or a slice of one. The option
defaults and checks are in :mod:`matryoshka2d.losses.options`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matryoshka2d.losses.alignment import cross_exit_infonce, embedding_alignment, score_distillation
from matryoshka2d.losses.base import BaseLoss
from matryoshka2d.losses.options import (
    SAMPLES_DIMS,
    SAMPLES_LAYERS,
    ObjectiveOptions,
    depth_weight,
    ese_depth_weight,
)
from matryoshka2d.vocab import DepthWeighting, KLSpace, Strategy

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)


def pca_target(pooled: Tensor, k: int, *, seed: int = 0) -> Tensor:
    """ESE's PCA-like target of a pooled batch H (B x D), without gradient: ``A = softmax(H^T H / sqrt(D))``
    (each row a softmax), ``U_k, S_k`` = the top ``k`` of a randomized low-rank SVD of A (torch's
    ``svd_lowrank``, as the authors use), ``P_k(H) = H U_k diag(S_k)`` (B x k).

    The SVD draws its random projection from its own generator seeded with ``seed`` (the global RNG, which
    drives dropout, is left untouched), so a step's target is the same on a rerun and after a resume. Columns
    are defined up to sign, as in the authors' trainer.
    """
    with torch.no_grad():
        h = pooled.detach().float()
        a = torch.softmax(h.T @ h / math.sqrt(h.shape[-1]), dim=-1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, _ = torch.svd_lowrank(a, q=min(k + 8, a.shape[0]), niter=2)
        return h @ (u[:, :k] * s[:k])


class TwoDMatryoshkaLoss(nn.Module):
    """Train every (layer, dim) exit of ``model`` with ``base_loss``; see docs/objective.md for the formulas.

    Args:
        model: the encoder; called as ``model(features, layers=...)`` once per column per step. Under DDP,
            assign the wrapped model to ``.model`` (depth and width are read here, once).
        base_loss: applied to a batch of exits (one tensor per column).
        options: the objective's options (:class:`~matryoshka2d.losses.options.ObjectiveOptions`: strategy,
            dims, layer_pool, n_layers_per_step, n_dims_per_step, last_weight, prior_weight, kl_weight,
            kl_temperature, kl_space, depth_weighting, detach_teacher, starbucks_pairs, compression_dim), or
            pass them as keyword arguments instead; unset ones keep their defaults there.
        seed: seed of the loss's own sampler.

    Raises:
        ValueError: an option outside its range (the message names option, value and allowed range).
    """

    def __init__(self, model: MatryoshkaEncoder, base_loss: BaseLoss, options: ObjectiveOptions | None = None, *,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_loss, BaseLoss):
            raise ValueError(
                f"base_loss must be a matryoshka2d BaseLoss, got {type(base_loss).__name__}; "
                "use matryoshka2d.losses.base.build_base_loss(name)"
            )
        if options is not None and kwargs:
            raise ValueError(f"pass the objective's options either as options= or as keywords, not both "
                             f"(got options= and {', '.join(kwargs)})")
        if options is None:
            unknown = sorted(set(kwargs) - set(ObjectiveOptions.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown objective option(s) {unknown}; the options are "
                                 f"{', '.join(ObjectiveOptions.__dataclass_fields__)}")
            options = ObjectiveOptions(**kwargs)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.model: nn.Module = model
        self.base_loss = base_loss
        self.num_layers = int(model.num_layers)
        self.hidden_size = int(model.hidden_size)
        plan = options.resolve(self.num_layers, self.hidden_size, model_metadata=getattr(model, "metadata", {}))
        self.strategy: Strategy = options.strategy
        self.last_weight, self.prior_weight = options.last_weight, options.prior_weight
        self.kl_weight, self.kl_temperature = options.kl_weight, options.kl_temperature
        self.kl_space: KLSpace = options.kl_space
        self.depth_weighting: DepthWeighting = options.depth_weighting
        self.detach_teacher = options.detach_teacher
        self.cross_weight, self.align_weight = options.cross_weight, options.align_weight
        self.score_kd_weight, self.align_distance = options.score_kd_weight, options.align_distance
        self.seed = int(seed)
        self.dims, self.small_dims, self.layer_pool = plan.dims, plan.small_dims, plan.layer_pool
        self.n_layers_per_step, self.n_dims_per_step = plan.n_layers_per_step, plan.n_dims_per_step
        self.starbucks_pairs = plan.starbucks_pairs
        self.compression_dim = plan.compression_dim
        strategy = self.strategy
        samples_layers, samples_dims = strategy in SAMPLES_LAYERS, strategy in SAMPLES_DIMS

        if base_loss.requires_even_dim:
            odd = sorted({d for d in self.trained_dims if d % 2})
            if odd:
                raise ValueError(
                    f"base loss {base_loss.name!r} needs even dims (complex halves), but the objective "
                    f"trains dims {odd}; pass even dims"
                )
        self._generator = torch.Generator().manual_seed(self.seed)
        self.last_sample: dict[str, Any] = {}
        every = {"layers": list(self.layer_pool) * samples_layers, "dims": list(self.small_dims) * samples_dims}
        groups, kl_layers = self._plan(every)
        if not groups and not kl_layers:
            raise ValueError(
                f"every term of strategy {strategy!r} has weight 0 (last_weight={self.last_weight:g}, "
                f"prior_weight={self.prior_weight:g}, kl_weight={self.kl_weight:g}); set one > 0"
            )

    # ------------------------------------------------------------------------------- options
    @property
    def trained_layers(self) -> tuple[int, ...]:
        """Every layer this objective trains (for the saved model's metadata)."""
        if self.strategy == "starbucks":
            return tuple(sorted({n for n, _ in self.starbucks_pairs}))
        return (*self.layer_pool, self.num_layers) if self.strategy in SAMPLES_LAYERS else (self.num_layers,)

    @property
    def trained_dims(self) -> tuple[int, ...]:
        """Every dim this objective trains (for the saved model's metadata)."""
        if self.strategy == "starbucks":
            return tuple(sorted({d for _, d in self.starbucks_pairs}))
        if self.strategy == "ese":
            return (self.compression_dim, self.hidden_size)
        return self.dims if self.strategy in SAMPLES_DIMS else (self.hidden_size,)

    def config_dict(self) -> dict[str, Any]:
        """Resolved options (defaults filled in), for run logs and model cards."""
        return {
            "strategy": self.strategy,
            "base_loss": self.base_loss.config_dict(),
            "dims": list(self.dims),
            "layer_pool": list(self.layer_pool),
            "n_layers_per_step": self.n_layers_per_step or None,  # None: the strategy samples no layer
            "n_dims_per_step": self.n_dims_per_step or None,
            "last_weight": self.last_weight,
            "prior_weight": self.prior_weight,
            "kl_weight": self.kl_weight,
            "kl_temperature": self.kl_temperature,
            "kl_space": self.kl_space,
            "depth_weighting": self.depth_weighting,
            "detach_teacher": self.detach_teacher,
            "starbucks_pairs": [list(p) for p in self.starbucks_pairs],
            "compression_dim": self.compression_dim or None,
            "cross_weight": self.cross_weight,
            "align_weight": self.align_weight,
            "score_kd_weight": self.score_kd_weight,
            "align_distance": self.align_distance,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------------------- sampler
    def sampler_state(self) -> Tensor:
        """The sampler's ``torch.Generator`` state (store it in a checkpoint)."""
        return self._generator.get_state()

    def set_sampler_state(self, state: Tensor) -> None:
        """Restore a state from :meth:`sampler_state`, so the (layer, dim) sequence continues exactly."""
        if not isinstance(state, Tensor) or state.dtype != torch.uint8:
            raise ValueError(
                f"sampler state must be the uint8 tensor from sampler_state(), got {type(state).__name__}"
            )
        self._generator.set_state(state.cpu())

    def _draw(self, pool: Sequence[int], k: int) -> list[int]:
        if k >= len(pool):
            return list(pool)
        return sorted(pool[i] for i in torch.randperm(len(pool), generator=self._generator)[:k].tolist())

    def sample(self) -> dict[str, Any]:
        """Draw this step's shallow layers and small dims (advances the sampler)."""
        if self.strategy == "starbucks":
            pairs = self.starbucks_pairs
            return {
                "layers": sorted({n for n, _ in pairs}),
                "dims": sorted({d for _, d in pairs}),
                "pairs": [list(p) for p in pairs],
            }
        layers = (
            self._draw(self.layer_pool, self.n_layers_per_step) if self.strategy in SAMPLES_LAYERS else []
        )
        dims = self._draw(self.small_dims, self.n_dims_per_step) if self.strategy in SAMPLES_DIMS else []
        return {"layers": layers, "dims": dims}

    # ------------------------------------------------------------------------------- loss
    def _check_inputs(self, features: Any, labels: Tensor | None) -> None:
        if (
            not isinstance(features, (list, tuple))
            or not features
            or not all(isinstance(f, dict) for f in features)
        ):
            raise ValueError(
                "features must be a non-empty list of tokenized batches (model.tokenize output), "
                "one per input column"
            )
        sizes = {int(f["input_ids"].shape[0]) for f in features}
        if len(sizes) != 1:
            raise ValueError(f"every column must hold the same number of rows, got {sorted(sizes)}")
        if labels is None and self.base_loss.requires_scores:
            raise ValueError(
                f"base loss {self.base_loss.name!r} needs a score per pair (columns sentence1, "
                "sentence2, score) but the batch has no labels; for unscored pairs or triplets "
                "use the 'ibn' loss"
            )
        if labels is not None and int(torch.as_tensor(labels).numel()) != sizes.pop():
            raise ValueError(
                f"got {torch.as_tensor(labels).numel()} labels for a batch of "
                f"{int(features[0]['input_ids'].shape[0])} rows; pass one score per row"
            )

    def _kl(self, teacher: Tensor, student: Tensor) -> Tensor:
        """KL(softmax(t/T) || softmax(s/T)) over the coordinates of raw pooled vectors, mean over rows."""
        if self.detach_teacher:
            teacher = teacher.detach()
        temp = self.kl_temperature
        return F.kl_div(
            F.log_softmax(student.float() / temp, dim=-1),
            F.log_softmax(teacher.float() / temp, dim=-1),
            reduction="batchmean",
            log_target=True,
        )

    def _kl_batch(self, teacher: Tensor, student: Tensor) -> Tensor:
        """KL between each row's softmax over its cosines to the other rows (teacher: last exit), batchmean."""
        if self.detach_teacher:
            teacher = teacher.detach()

        def log_probs(x: Tensor) -> Tensor:
            x = F.normalize(x.float(), dim=-1)
            sims = (x @ x.T) / self.kl_temperature
            eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
            return F.log_softmax(sims.masked_fill(eye, -1e4), dim=-1)

        return F.kl_div(log_probs(student), log_probs(teacher), reduction="batchmean", log_target=True)

    def forward(
        self, features: Sequence[dict[str, Tensor]], labels: Tensor | None = None,
        unlabelled: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """One training step's loss.

        Args:
            features: one tokenized batch per input column.
            labels: one score per row, or ``None`` for unscored pairs/triplets.
            unlabelled: a tokenized batch of unlabelled texts; only embedding alignment (``align_weight``)
                is computed on it (one more backbone pass).

        Returns:
            ``{"loss": total (backward this), "loss/last": ..., "loss/prior": ..., "loss/kl": ...}`` and, with
            the document-space terms, ``"loss/cross"``, ``"loss/align"``, ``"loss/score_kd"``: the weighted
            parts that apply (detached); they sum to ``loss``.

        Raises:
            ValueError: malformed batch, or a score-based base loss on unscored data.
        """
        self._check_inputs(features, labels)
        sample = self.sample()
        self.last_sample = sample
        logger.debug("2D objective %s: layers=%s dims=%s", self.strategy, sample["layers"], sample["dims"])
        groups, kl_layers = self._plan(sample)
        n_last = self.num_layers
        needed = {n for terms in groups.values() for n, _, _ in terms} | set(kl_layers)
        needed |= {n_last} if kl_layers else set()
        shallow = self._shallow_exits(sample) if self._doc_space else []
        needed |= {n for n, _ in shallow} | ({n_last} if shallow else set())

        pooled = [self.model(f, layers=sorted(needed)) for f in features]  # the ONE backbone pass per column

        parts: dict[str, Tensor] = {}
        for name, terms in groups.items():
            losses = [c * self.base_loss([p[n][:, :d] for p in pooled], labels) for n, d, c in terms]
            if self.strategy == "ese":  # learn-to-compress: Dist(n) beside each B(n, k), with its coefficient
                losses += [c * self._compression_distance([p[n] for p in pooled]) for n, d, c in terms
                           if d == self.compression_dim]
            parts[f"loss/{name}"] = getattr(self, f"{name}_weight") * torch.stack(losses).sum()
        if kl_layers and self.kl_space == "batch":
            teacher = torch.cat([p[n_last] for p in pooled])
            kls = [self._kl_batch(teacher, torch.cat([p[n] for p in pooled])) for n in kl_layers]
            parts["loss/kl"] = self.kl_weight * torch.stack(kls).mean() * self._layer_scale(kl_layers)
        elif kl_layers:
            kls = [self._kl(p[n_last], p[n]) for n in kl_layers for p in pooled]
            parts["loss/kl"] = self.kl_weight * torch.stack(kls).mean() * self._layer_scale(kl_layers)
        if shallow:
            extra = [self.model(unlabelled, layers=sorted(needed))] if unlabelled and self.align_weight > 0 else []
            parts.update(self._document_space(pooled, extra, shallow, self._layer_scale(sample["layers"])))
        total = torch.stack(list(parts.values())).sum()
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

    @property
    def _doc_space(self) -> bool:
        return self.cross_weight > 0 or self.align_weight > 0 or self.score_kd_weight > 0

    def _shallow_exits(self, sample: dict[str, Any]) -> list[tuple[int, int]]:
        """The shallow exits ``(n, d)`` this step trains, which the document-space terms pull to ``(N, d)``."""
        if self.strategy == "starbucks":
            return [(n, d) for n, d in self.starbucks_pairs if n < self.num_layers]
        if self.strategy == "ese":
            return [(n, self.compression_dim) for n in sample["layers"]]
        return [(n, d) for n in sample["layers"] for d in (self.hidden_size, *sample["dims"])]

    def _document_space(self, pooled: Sequence[dict[int, Tensor]], unlabelled: Sequence[dict[int, Tensor]],
                        shallow: Sequence[tuple[int, int]], scale: float) -> dict[str, Tensor]:
        """The cross-exit terms of method.md section 8, each the mean over the step's shallow exits (times
        :meth:`_layer_scale`, as the shallow base-loss terms)."""
        n_last, parts = self.num_layers, {}
        docs = torch.cat([p[n_last] for p in pooled[1:]])  # every kind of training data has >= 2 columns
        queries = pooled[0]
        if self.cross_weight > 0:
            terms = [cross_exit_infonce(queries[n], docs, d) for n, d in shallow]
            parts["loss/cross"] = self.cross_weight * torch.stack(terms).mean() * scale
        if self.score_kd_weight > 0:
            terms = [score_distillation(queries[n], queries[n_last], docs, d) for n, d in shallow]
            parts["loss/score_kd"] = self.score_kd_weight * torch.stack(terms).mean() * scale
        if self.align_weight > 0:
            terms = [embedding_alignment(col[n], col[n_last], d, distance=self.align_distance)
                     for col in [*pooled, *unlabelled] for n, d in shallow]
            parts["loss/align"] = self.align_weight * torch.stack(terms).mean() * scale
        return parts

    def _compression_distance(self, columns: Sequence[Tensor]) -> Tensor:
        """ESE's ``Dist(x, y) = MSE(x, y) + T * KL(softmax(y/T) || softmax(x/T))`` averaged over the input
        columns, x the first k dims of a column's pooled batch, y its target :func:`pca_target` (method.md
        section 7)."""
        k, temp, dists = self.compression_dim, self.kl_temperature, []
        for pooled in columns:
            h = pooled.float()
            target, x = pca_target(h, k), h[:, :k]
            kl = F.kl_div(F.log_softmax(x / temp, dim=-1), F.log_softmax(target / temp, dim=-1),
                          reduction="batchmean", log_target=True)
            dists.append(F.mse_loss(x, target) + temp * kl)
        return torch.stack(dists).mean()

    def _layer_scale(self, layers: Sequence[int]) -> float:
        """How much heavier a step's shallow terms are than their mean: ``len(layers)`` for ``dense`` (each exit
        gets the full weight 2dmse gives its one sampled exit), 1 otherwise (shallow layers averaged)."""
        return float(len(layers)) if self.strategy == "dense" else 1.0

    def _plan(self, sample: dict[str, Any]) -> tuple[dict[str, list[tuple[int, int, float]]], list[int]]:
        """The (layer, dim, coefficient) base-loss terms of ``last`` and ``prior``, and the KL layers.

        Terms with a zero group weight are left out (their exits are not computed).
        """
        n_last, d_full = self.num_layers, self.hidden_size
        lam = partial(depth_weight, mode=self.depth_weighting, num_layers=n_last)
        if self.strategy == "starbucks":  # each pair once; the mean over pairs keeps the scale of one B
            k = len(self.starbucks_pairs)
            last = [(n, d, 1 / k) for n, d in self.starbucks_pairs if n == n_last]
            prior = [(n, d, lam(n) / k) for n, d in self.starbucks_pairs if n < n_last]
            kl_layers = sorted({n for n, _ in self.starbucks_pairs if n < n_last})
        elif self.strategy == "ese":  # B(N, D) + B(N, k); every shallow layer at k only, no shallow-to-last KL
            k, layers = self.compression_dim, sample["layers"]
            last = [(n_last, d_full, 1.0), (n_last, k, 1.0)]
            prior = [(n, k, ese_depth_weight(n) / len(layers)) for n in layers]
            kl_layers = []
        else:  # per exit layer: B(n, D) + mean over sampled d of B(n, d); shallow layers averaged ("dense": summed)
            layers, dims = sample["layers"], sample["dims"]
            share = len(layers) / self._layer_scale(layers)
            last = [(n_last, d_full, 1.0)] + [(n_last, d, 1 / len(dims)) for d in dims]
            prior = [(n, d_full, lam(n) / share) for n in layers]
            prior += [(n, d, lam(n) / share / len(dims)) for n in layers for d in dims]
            kl_layers = list(layers)
        groups = {"last": last, "prior": prior}
        groups = {k: v for k, v in groups.items() if v and getattr(self, f"{k}_weight") > 0}
        return groups, (kl_layers if self.kl_weight > 0 else [])
