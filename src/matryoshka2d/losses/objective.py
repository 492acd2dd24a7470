"""The 2D Matryoshka objective (method.md section 3) and its baselines, from one code path.

Per step, each input column goes through the backbone ONCE, asking for the sampled shallow layer(s) and
the last layer together; every (layer, dim) exit is then a pooled vector or a slice of one. The option
defaults (dims, Starbucks pairs, lambda(n)) and checks are in :mod:`matryoshka2d.losses.options`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.losses.base import BaseLoss, check_positive, check_weight
from matryoshka2d.losses.options import (
    STARBUCKS_MAX_PAIRS,
    _check_pairs,
    _int_list,
    _per_step,
    default_starbucks_pairs,
    depth_weight,
)

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

Strategy = Literal["full", "mrl", "layers", "2dmse", "starbucks", "separate", "dense"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DepthWeighting = Literal["none", "linear", "log"]
DEPTH_WEIGHTINGS: tuple[str, ...] = get_args(DepthWeighting)
KLSpace = Literal["coordinates", "batch"]
KL_SPACES: tuple[str, ...] = get_args(KLSpace)
_SAMPLES_LAYERS = ("layers", "2dmse", "dense")  # "dense" takes every layer of the pool, every step
_SAMPLES_DIMS = ("mrl", "2dmse", "dense")

__all__ = [  # the option defaults and checks are defined in objective_options and re-exported here
    "DEPTH_WEIGHTINGS", "KL_SPACES", "STARBUCKS_MAX_PAIRS", "STRATEGIES", "DepthWeighting", "KLSpace", "Strategy",
    "TwoDMatryoshkaLoss", "default_starbucks_pairs", "depth_weight",
]


class TwoDMatryoshkaLoss(nn.Module):
    """Train every (layer, dim) exit of ``model`` with ``base_loss``; see docs/objective.md for the formulas.

    Args:
        model: the encoder; called as ``model(features, layers=...)`` once per column per step. Under DDP,
            assign the wrapped model to ``.model`` (depth and width are read here, once).
        base_loss: applied to a batch of exits (one tensor per column).
        strategy: ``full``, ``mrl``, ``layers``, ``2dmse``, ``starbucks``, ``separate`` or ``dense`` (every
            shallow exit every step, each with 2dmse's per-exit weight; see docs/research.md).
        dims: Matryoshka dims (``d`` is sampled from those below D; D is always included).
        layer_pool: shallow layers to sample from, within ``1..N-1``.
        n_layers_per_step: shallow layers per step (an int, or ``"all"``/-1).
        n_dims_per_step: dims below D per step (an int, or ``"all"``/-1).
        last_weight, prior_weight, kl_weight: weights of the last-layer, shallow-layer and KL terms.
        kl_temperature: T in ``KL(softmax(t/T) || softmax(s/T))``.
        kl_space: what the KL aligns: ``coordinates`` (the paper: a softmax over each raw pooled vector's
            coordinates) or ``batch`` (each row's softmax over its cosine similarities to every other row of
            the batch, all columns together: the last exit's in-batch similarity distribution is distilled
            into the shallow exit; use a small T such as 0.05, cosines lie in [-1, 1]).
        depth_weighting: lambda(n) on the shallow terms.
        detach_teacher: stop the KL gradient through the last layer.
        starbucks_pairs: the fixed (layer, dim) pairs of ``starbucks``.
        seed: seed of the loss's own sampler.

    Raises:
        ValueError: an option outside its range (the message names field, value and allowed range).
    """

    def __init__(
        self,
        model: MatryoshkaEncoder,
        base_loss: BaseLoss,
        *,
        strategy: Strategy = "2dmse",
        dims: Sequence[int] | None = None,
        layer_pool: Sequence[int] | None = None,
        n_layers_per_step: int | Literal["all"] = 1,
        n_dims_per_step: int | Literal["all"] = 1,
        last_weight: float = 1.0,
        prior_weight: float = 1.0,
        kl_weight: float = 1.0,
        kl_temperature: float = 1.0,
        kl_space: KLSpace = "coordinates",
        depth_weighting: DepthWeighting = "none",
        detach_teacher: bool = True,
        starbucks_pairs: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(base_loss, BaseLoss):
            raise ValueError(
                f"base_loss must be a matryoshka2d BaseLoss, got {type(base_loss).__name__}; "
                "use matryoshka2d.losses.base.build_base_loss(name)"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        if depth_weighting not in DEPTH_WEIGHTINGS:
            raise ValueError(
                f"depth_weighting {depth_weighting!r} is unknown; choose one of {', '.join(DEPTH_WEIGHTINGS)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.model: nn.Module = model
        self.base_loss = base_loss
        self.strategy: Strategy = strategy
        self.num_layers = n_layers = int(model.num_layers)
        self.hidden_size = d_full = int(model.hidden_size)
        self.last_weight = check_weight("last_weight", last_weight)
        self.prior_weight = check_weight("prior_weight", prior_weight)
        self.kl_weight = check_weight("kl_weight", kl_weight)
        self.kl_temperature = check_positive("kl_temperature", kl_temperature, 1.0)
        self.depth_weighting: DepthWeighting = depth_weighting
        if kl_space not in KL_SPACES:
            raise ValueError(f"kl_space {kl_space!r} is unknown; choose one of {', '.join(KL_SPACES)}")
        self.kl_space: KLSpace = kl_space
        if not isinstance(detach_teacher, bool):
            raise ValueError(f"detach_teacher must be True or False, got {detach_teacher!r}")
        self.detach_teacher = detach_teacher
        self.seed = int(seed)

        fix = f"the model's embeddings have {d_full} dims"
        given = _int_list("dims", dims, 1, d_full, fix) if dims is not None else matryoshka_dims(d_full)
        self.dims = tuple(sorted({*given, d_full}))
        self.small_dims = tuple(d for d in self.dims if d < d_full)
        if strategy in _SAMPLES_DIMS and not self.small_dims:
            raise ValueError(
                f"dims {list(self.dims)} has no dim below D={d_full}; strategy {strategy!r} samples d "
                f"from dims < D; pass e.g. dims=[8, 16, {d_full}]"
            )

        if strategy in _SAMPLES_LAYERS and n_layers < 2:
            raise ValueError(
                f"strategy {strategy!r} needs a model with at least 2 layers (shallow exits are "
                f"1..N-1), this one has {n_layers}; use 'full' or 'mrl'"
            )
        samples_layers, samples_dims = strategy in _SAMPLES_LAYERS, strategy in _SAMPLES_DIMS
        fix = f"shallow exits are layers 1..N-1 of this {n_layers}-layer model (layer 0 is never an exit)"
        checked = samples_layers and layer_pool is not None
        self.layer_pool = tuple(_int_list("layer_pool", layer_pool, 1, n_layers - 1, fix) if checked else ())
        self.layer_pool = self.layer_pool or tuple(range(1, n_layers))
        if strategy == "dense" and n_layers_per_step not in (1, "all", -1, len(self.layer_pool)):
            logger.warning("n_layers_per_step=%r is ignored by strategy 'dense' (every shallow exit, every step)",
                           n_layers_per_step)
        self.n_layers_per_step = (
            len(self.layer_pool) if strategy == "dense"
            else _per_step("n_layers_per_step", n_layers_per_step, len(self.layer_pool)) if samples_layers else 0
        )
        self.n_dims_per_step = (
            _per_step("n_dims_per_step", n_dims_per_step, len(self.small_dims)) if samples_dims else 0
        )

        if strategy == "starbucks":
            self.starbucks_pairs = (
                _check_pairs(starbucks_pairs, n_layers, d_full)
                if starbucks_pairs is not None
                else default_starbucks_pairs(n_layers, d_full, self.dims)
            )
        else:
            self.starbucks_pairs = ()
            for name, value in (("starbucks_pairs", starbucks_pairs), ("layer_pool", layer_pool)):
                if value is not None and not (name == "layer_pool" and samples_layers):
                    logger.warning("%s=%r is ignored by strategy %r", name, value, strategy)
        if strategy == "separate" and "truncated_from" not in getattr(model, "metadata", {}):
            logger.warning(
                "strategy 'separate' expects a physically truncated model (model.truncate(n)); "
                "on an untruncated model it is the same as 'full'"
            )

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
        return (*self.layer_pool, self.num_layers) if self.strategy in _SAMPLES_LAYERS else (self.num_layers,)

    @property
    def trained_dims(self) -> tuple[int, ...]:
        """Every dim this objective trains (for the saved model's metadata)."""
        if self.strategy == "starbucks":
            return tuple(sorted({d for _, d in self.starbucks_pairs}))
        return self.dims if self.strategy in _SAMPLES_DIMS else (self.hidden_size,)

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
            self._draw(self.layer_pool, self.n_layers_per_step) if self.strategy in _SAMPLES_LAYERS else []
        )
        dims = self._draw(self.small_dims, self.n_dims_per_step) if self.strategy in _SAMPLES_DIMS else []
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
        self, features: Sequence[dict[str, Tensor]], labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One training step's loss.

        Args:
            features: one tokenized batch per input column.
            labels: one score per row, or ``None`` for unscored pairs/triplets.

        Returns:
            ``{"loss": total (backward this), "loss/last": ..., "loss/prior": ..., "loss/kl": ...}``: the
            weighted parts that apply (detached); they sum to ``loss``.

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

        pooled = [self.model(f, layers=sorted(needed)) for f in features]  # the ONE backbone pass per column

        parts: dict[str, Tensor] = {}
        for name, terms in groups.items():
            losses = [c * self.base_loss([p[n][:, :d] for p in pooled], labels) for n, d, c in terms]
            parts[f"loss/{name}"] = getattr(self, f"{name}_weight") * torch.stack(losses).sum()
        if kl_layers and self.kl_space == "batch":
            teacher = torch.cat([p[n_last] for p in pooled])
            kls = [self._kl_batch(teacher, torch.cat([p[n] for p in pooled])) for n in kl_layers]
            parts["loss/kl"] = self.kl_weight * torch.stack(kls).mean() * self._layer_scale(kl_layers)
        elif kl_layers:
            kls = [self._kl(p[n_last], p[n]) for n in kl_layers for p in pooled]
            parts["loss/kl"] = self.kl_weight * torch.stack(kls).mean() * self._layer_scale(kl_layers)
        total = torch.stack(list(parts.values())).sum()
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

    def _layer_scale(self, layers: Sequence[int]) -> float:
        """How much heavier a step's shallow terms are than their mean: ``len(layers)`` for ``dense`` (each exit
        gets the full weight 2dmse gives its one sampled exit), 1 otherwise (shallow layers averaged)."""
        return float(len(layers)) if self.strategy == "dense" else 1.0

    def _plan(self, sample: dict[str, Any]) -> tuple[dict[str, list[tuple[int, int, float]]], list[int]]:
        """The (layer, dim, coefficient) base-loss terms of ``last`` and ``prior``, and the KL layers.

        Terms with a zero group weight are left out (their exits are not computed).
        """
        n_last, d_full = self.num_layers, self.hidden_size
        lam = partial(depth_weight, mode=self.depth_weighting)
        if self.strategy == "starbucks":  # each pair once; the mean over pairs keeps the scale of one B
            k = len(self.starbucks_pairs)
            last = [(n, d, 1 / k) for n, d in self.starbucks_pairs if n == n_last]
            prior = [(n, d, lam(n) / k) for n, d in self.starbucks_pairs if n < n_last]
            kl_layers = sorted({n for n, _ in self.starbucks_pairs if n < n_last})
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
