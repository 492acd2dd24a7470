"""The 2D Matryoshka objective (method.md section 3) and its baselines, from one code path.

Per step, each input column goes through the backbone ONCE, asking for the sampled shallow layer(s) and
the last layer together; every (layer, dim) exit is then a pooled vector or a slice of one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matryoshka2d.losses import BaseLoss, check_positive, check_weight

if TYPE_CHECKING:
    from matryoshka2d.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

Strategy = Literal["full", "mrl", "layers", "2dmse", "starbucks", "separate"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DepthWeighting = Literal["none", "linear", "log"]
DEPTH_WEIGHTINGS: tuple[str, ...] = get_args(DepthWeighting)
KLSpace = Literal["coordinates", "batch"]
KL_SPACES: tuple[str, ...] = get_args(KLSpace)
STARBUCKS_MAX_PAIRS = 6
_SAMPLES_LAYERS = ("layers", "2dmse")
_SAMPLES_DIMS = ("mrl", "2dmse")


def default_dims(hidden_size: int) -> tuple[int, ...]:
    """Matryoshka dims: 8, 16, 32, ... doubling while < ``hidden_size``, plus ``hidden_size``."""
    dims, d = [], 8
    while d < hidden_size:
        dims.append(d)
        d *= 2
    return (*dims, hidden_size)


def default_starbucks_pairs(
    num_layers: int, hidden_size: int, dims: Sequence[int] | None = None
) -> tuple[tuple[int, int], ...]:
    """Fixed (layer, dim) pairs: the K largest ``dims`` matched in order with K layers spread over 1..N.

    ``K = min(6, N, len(dims))``; pair ``i`` (1-based) has layer ``ceil(i * N / K)``, so the last pair is
    always ``(N, D)``. N=12, D=768 gives (2,32) (4,64) (6,128) (8,256) (10,512) (12,768).
    """
    pool = sorted({int(d) for d in (dims or default_dims(hidden_size))} | {hidden_size})
    k = min(STARBUCKS_MAX_PAIRS, num_layers, len(pool))
    return tuple((-(-i * num_layers // k), d) for i, d in zip(range(1, k + 1), pool[-k:], strict=True))


def depth_weight(layer: int, mode: DepthWeighting) -> float:
    """lambda(n): 1 (``none``), ``1/n`` (``linear``) or ``1/(1 + ln n)`` (``log``)."""
    if mode == "linear":
        return 1.0 / layer
    if mode == "log":
        return 1.0 / (1.0 + math.log(layer))
    return 1.0


def _int_list(name: str, values: Any, lo: int, hi: int, fix: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of integers in {lo}..{hi}, got {values!r}; {fix}")
    bad = [
        v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi
    ]
    if bad:
        raise ValueError(f"{name} has {bad} outside the allowed range {lo}..{hi} (got {list(values)}); {fix}")
    return sorted({int(v) for v in values})


def _per_step(name: str, value: Any, available: int) -> int:
    """``value`` (an int, ``"all"`` or -1 for all) checked against ``available`` choices."""
    if value == "all" or (not isinstance(value, bool) and value == -1):
        return available
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= available:
        raise ValueError(f"{name} must be 1..{available} or 'all', got {value!r}")
    return int(value)


class TwoDMatryoshkaLoss(nn.Module):
    """Train every (layer, dim) exit of ``model`` with ``base_loss``; see docs/objective.md for the formulas.

    Args:
        model: the encoder; called as ``model(features, layers=...)`` once per column per step. Under DDP,
            assign the wrapped model to ``.model`` (depth and width are read here, once).
        base_loss: applied to a batch of exits (one tensor per column).
        strategy: ``full``, ``mrl``, ``layers``, ``2dmse``, ``starbucks`` or ``separate``.
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
                "use matryoshka2d.losses.build_base_loss(name)"
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
        given = _int_list("dims", dims, 1, d_full, fix) if dims is not None else default_dims(d_full)
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
        self.n_layers_per_step = (
            _per_step("n_layers_per_step", n_layers_per_step, len(self.layer_pool)) if samples_layers else 0
        )
        self.n_dims_per_step = (
            _per_step("n_dims_per_step", n_dims_per_step, len(self.small_dims)) if samples_dims else 0
        )

        if strategy == "starbucks":
            self.starbucks_pairs = (
                self._check_pairs(starbucks_pairs)
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
    def _check_pairs(self, pairs: Any) -> tuple[tuple[int, int], ...]:
        n, d = self.num_layers, self.hidden_size
        fix = f"pass (layer, dim) pairs in 1..{n} x 1..{d}, e.g. [[{n // 2 or 1}, {d // 2}], [{n}, {d}]]"
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
            raise ValueError(
                f"starbucks_pairs must be a non-empty list of (layer, dim) pairs, got {pairs!r}; {fix}"
            )
        out = []
        for p in pairs:
            ok = (
                isinstance(p, Sequence)
                and not isinstance(p, str)
                and len(p) == 2
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p)
            )
            if not ok or not (1 <= p[0] <= n and 1 <= p[1] <= d):
                raise ValueError(f"starbucks_pairs has {p!r}, outside layers 1..{n} x dims 1..{d}; {fix}")
            out.append((int(p[0]), int(p[1])))
        if len(set(out)) != len(out):
            raise ValueError(f"starbucks_pairs has duplicates: {out}; list each (layer, dim) pair once")
        return tuple(sorted(out))

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
            parts["loss/kl"] = self.kl_weight * torch.stack(kls).mean()
        elif kl_layers:
            kls = [self._kl(p[n_last], p[n]) for n in kl_layers for p in pooled]
            parts["loss/kl"] = self.kl_weight * torch.stack(kls).mean()
        total = torch.stack(list(parts.values())).sum()
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

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
        else:  # per exit layer: B(n, D) + mean over sampled d of B(n, d); shallow layers averaged
            layers, dims = sample["layers"], sample["dims"]
            last = [(n_last, d_full, 1.0)] + [(n_last, d, 1 / len(dims)) for d in dims]
            prior = [(n, d_full, lam(n) / len(layers)) for n in layers]
            prior += [(n, d, lam(n) / len(layers) / len(dims)) for n in layers for d in dims]
            kl_layers = list(layers)
        groups = {"last": last, "prior": prior}
        groups = {k: v for k, v in groups.items() if v and getattr(self, f"{k}_weight") > 0}
        return groups, (kl_layers if self.kl_weight > 0 else [])
