"""The options of the 2D objective: every default once, and every check once.

:class:`ObjectiveOptions` holds the options of :class:`~matryoshka2d.losses.objective.TwoDMatryoshkaLoss`
with their defaults and checks their values in ``__post_init__``; :meth:`ObjectiveOptions.resolve` checks
them against a model's depth N and width D and fills in what depends on it (dims, the layer pool, the
Starbucks pairs). The training config's ``[objective]`` section is a subclass, so a TOML file, the Python
API and the loss share one set of defaults and one set of messages (each names the option, the value and
the allowed range). Also here: the default Starbucks pairs and the depth weighting lambda(n).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.vocab import (
    ALIGN_DISTANCES,
    DEPTH_WEIGHTINGS,
    KL_SPACES,
    STRATEGIES,
    AlignDistance,
    DepthWeighting,
    KLSpace,
    Strategy,
    check_choice,
)

logger = logging.getLogger(__name__)

STARBUCKS_MAX_PAIRS = 6
SAMPLES_LAYERS = ("layers", "2dmse", "dense", "ese")  # strategies that train shallow layers ("dense", "ese": all)
EVERY_LAYER = ("dense", "ese")  # strategies that train every shallow layer of the pool on every step
ESE_MAX_COMPRESSION_DIM = 128  # the authors' default k
SAMPLES_DIMS = ("mrl", "2dmse", "dense")  # strategies that train dims below D


def default_starbucks_pairs(
    num_layers: int, hidden_size: int, dims: Sequence[int] | None = None
) -> tuple[tuple[int, int], ...]:
    """Fixed (layer, dim) pairs: the K largest ``dims`` matched in order with K layers spread over 1..N.

    ``K = min(6, N, len(dims))``; pair ``i`` (1-based) has layer ``ceil(i * N / K)``, so the last pair is
    always ``(N, D)``. N=12, D=768 gives (2,32) (4,64) (6,128) (8,256) (10,512) (12,768).
    """
    pool = sorted({int(d) for d in (dims or matryoshka_dims(hidden_size))} | {hidden_size})
    k = min(STARBUCKS_MAX_PAIRS, num_layers, len(pool))
    return tuple((-(-i * num_layers // k), d) for i, d in zip(range(1, k + 1), pool[-k:], strict=True))


def depth_weight(layer: int, mode: DepthWeighting, num_layers: int | None = None) -> float:
    """lambda(n): 1 (``none``), ``1/n`` (``linear``), ``1/(1 + ln n)`` (``log``) or ``2n/N`` (``rising``).

    ``rising`` leans the shallow terms towards the deep exits: its mean over ``n = 1..N-1`` is exactly 1, so
    the shallow terms keep their total weight (N = 6: 0.33, 0.67, 1, 1.33, 1.67). It needs ``num_layers``.
    """
    if mode == "linear":
        return 1.0 / layer
    if mode == "log":
        return 1.0 / (1.0 + math.log(layer))
    if mode == "rising":
        if num_layers is None:
            raise ValueError("depth_weighting 'rising' needs the model's depth N (num_layers)")
        return 2.0 * layer / num_layers
    return 1.0


def ese_depth_weight(layer: int) -> float:
    """ESE's weight of shallow layer ``n`` (the ``hidden_states`` index): ``1 / (1 + ln(1 + n))``."""
    return 1.0 / (1.0 + math.log(1.0 + layer))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class ResolvedObjective:
    """The options of one objective on one model: what it trains."""

    dims: tuple[int, ...]  # every dim, D included
    small_dims: tuple[int, ...]  # dims below D
    layer_pool: tuple[int, ...]  # shallow layers it may train
    n_layers_per_step: int  # 0 when the strategy trains no shallow layer
    n_dims_per_step: int  # 0 when the strategy trains no dim below D
    starbucks_pairs: tuple[tuple[int, int], ...]  # () unless starbucks
    compression_dim: int = 0  # ESE's k (0 unless ese)


@dataclass
class ObjectiveOptions:
    """Every option of the 2D objective, with its default (see docs/objective.md for the formulas).

    Attributes:
        strategy: ``full``, ``mrl``, ``layers``, ``2dmse``, ``starbucks``, ``separate``, ``dense`` (every
            shallow exit every step, each with 2dmse's per-exit weight) or ``ese`` (Espresso: every shallow
            exit every step at its first ``compression_dim`` dims, pulled towards a PCA-like target).
        dims: Matryoshka dims (``d`` is sampled from those below D; D is always included); ``None`` means
            8, 16, ... < D.
        layer_pool: shallow layers to sample from, within ``1..N-1``; ``None`` means all of them.
        n_layers_per_step: shallow layers per step (an int, or ``"all"``/-1; ``None``: 1).
        n_dims_per_step: dims below D per step (an int, or ``"all"``/-1; ``None``: 1).
        last_weight: weight of the last-layer terms.
        prior_weight: weight of the shallow-layer terms.
        kl_weight: weight of the shallow-to-last KL alignment.
        kl_temperature: T in ``KL(softmax(t/T) || softmax(s/T))``.
        kl_space: what the KL aligns: ``coordinates`` (the paper: a softmax over each raw pooled vector's
            coordinates) or ``batch`` (each row's softmax over its cosine similarities to every other row of
            the batch: the last exit's in-batch similarity distribution is distilled into the shallow exit;
            use a small T such as 0.05, cosines lie in [-1, 1]).
        depth_weighting: lambda(n) on the shallow terms (``none``, ``linear``, ``log`` or ``rising``).
        detach_teacher: stop the KL gradient through the last layer.
        starbucks_pairs: the fixed ``(layer, dim)`` pairs of ``starbucks``; ``None`` derives them.
        compression_dim: ESE's k, the width every shallow exit is trained at, in ``1..D-1``; ``None`` means
            ``min(128, D // 2)`` (128, the authors' default, on any model wider than 256).
        cross_weight: weight of the cross-exit contrastive term (method.md section 8): InfoNCE of the queries
            (first column) at each trained shallow exit ``(n, d)`` against the documents (the other columns) at
            ``(N, d)``. Needs pair or triplet data.
        align_weight: weight of embedding alignment: ``dist(x_n, sg(x_N))`` at each trained ``(n, d)`` for every
            text of the batch (and of the unlabelled batch, if the data adds one).
        score_kd_weight: weight of score distillation: ``KL(softmax(tau cos(sg(q_N), P)) || softmax(tau cos(q_n,
            P)))`` over the in-batch documents ``P`` at the full exit. Needs pair or triplet data.
        align_distance: ``cosine`` (1 - cos) or ``mse`` (of the normalised vectors) for ``align_weight``.

    Raises:
        ValueError: a value outside its range (the message names the option, the value and the range).
    """

    PREFIX: ClassVar[str] = ""  # how messages name an option ("objective." in the training config)

    strategy: Strategy = "2dmse"
    dims: list[int] | None = None
    layer_pool: list[int] | None = None
    n_layers_per_step: int | Literal["all"] | None = 1
    n_dims_per_step: int | Literal["all"] | None = 1
    last_weight: float = 1.0
    prior_weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    kl_space: KLSpace = "coordinates"
    depth_weighting: DepthWeighting = "none"
    detach_teacher: bool = True
    starbucks_pairs: list[list[int]] | None = None
    compression_dim: int | None = None
    cross_weight: float = 0.0
    align_weight: float = 0.0
    score_kd_weight: float = 0.0
    align_distance: AlignDistance = "cosine"

    @property
    def document_space_terms(self) -> bool:
        """Whether any term pulls shallow exits into the full exit's space (method.md section 8)."""
        return self.cross_weight > 0 or self.align_weight > 0 or self.score_kd_weight > 0

    def __post_init__(self) -> None:
        key = self.PREFIX
        for name, choices in (("strategy", STRATEGIES), ("depth_weighting", DEPTH_WEIGHTINGS),
                              ("kl_space", KL_SPACES), ("align_distance", ALIGN_DISTANCES)):
            check_choice(f"{key}{name}", getattr(self, name), choices)
        for name in ("last_weight", "prior_weight", "kl_weight", "cross_weight", "align_weight", "score_kd_weight"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"{key}{name} must be a finite number >= 0, got {value!r}; pass e.g. 1.0 "
                                 "(0 = term off)")
            setattr(self, name, float(value))
        if not _is_real(self.kl_temperature) or self.kl_temperature <= 0:
            raise ValueError(f"{key}kl_temperature must be a finite number > 0, got {self.kl_temperature!r}; "
                             "pass e.g. 1")
        self.kl_temperature = float(self.kl_temperature)
        if not isinstance(self.detach_teacher, bool):
            raise ValueError(f"{key}detach_teacher must be True or False, got {self.detach_teacher!r}")
        for name, fix in (("dims", "dims are widths 1..D"),
                          ("layer_pool", "shallow exits are layers 1..N-1; layer 0 is never an exit")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value \
                    or not all(_is_int(v) for v in value):
                raise ValueError(f"{key}{name} must be a non-empty list of integers, got {value!r}; pass "
                                 f"e.g. {'[64, 128]' if name == 'dims' else '[1, 2]'}")
            if min(value) < 1:
                raise ValueError(f"{key}{name} has {[v for v in value if v < 1]} below 1 (got {list(value)}); {fix}")
        for name in ("n_layers_per_step", "n_dims_per_step"):
            value = getattr(self, name)
            if value is not None and value != "all" and not (_is_int(value) and (value >= 1 or value == -1)):
                raise ValueError(f"{key}{name} must be a positive integer or 'all', got {value!r}")
        k = self.compression_dim
        if k is not None and not (_is_int(k) and k >= 1):
            raise ValueError(f"{key}compression_dim must be a positive integer, got {k!r}; pass e.g. 128 "
                             "(ESE trains every shallow exit at its first k dims)")
        pairs = self.starbucks_pairs
        if pairs is not None and (isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs):
            raise ValueError(f"{key}starbucks_pairs must be a non-empty list of (layer, dim) pairs, got "
                             f"{pairs!r}; pass e.g. [[2, 32], [6, 384]]")
        for p in pairs or ():
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2 \
                    or not all(_is_int(v) and v >= 1 for v in p):
                raise ValueError(f"{key}starbucks_pairs has {p!r}, not a (layer, dim) pair of positive integers; "
                                 "pass e.g. [[2, 32], [6, 384]]")

    def options(self) -> dict[str, Any]:
        """The options as keyword arguments of :class:`~matryoshka2d.losses.objective.TwoDMatryoshkaLoss`."""
        return {name: getattr(self, name) for name in ObjectiveOptions.__dataclass_fields__}

    def resolve(self, num_layers: int, hidden_size: int, *, model_metadata: dict[str, Any] | None = None
                ) -> ResolvedObjective:
        """Check the options against a model of ``num_layers`` blocks and width ``hidden_size``.

        Options a strategy ignores are logged. ``model_metadata`` tells whether the model was truncated
        (``separate`` expects it).

        Raises:
            ValueError: a dim above D, a layer outside 1..N-1, too many per step, a Starbucks pair out of
                range, or a strategy the model is too shallow for.
        """
        key, strategy, n_layers, d_full = self.PREFIX, self.strategy, int(num_layers), int(hidden_size)
        fix = f"the model's embeddings have {d_full} dims"
        given = _int_list(f"{key}dims", self.dims, 1, d_full, fix) if self.dims is not None \
            else matryoshka_dims(d_full)
        dims = tuple(sorted({*given, d_full}))
        small_dims = tuple(d for d in dims if d < d_full)
        samples_layers, samples_dims = strategy in SAMPLES_LAYERS, strategy in SAMPLES_DIMS
        if samples_dims and not small_dims:
            raise ValueError(f"{key}dims {list(dims)} has no dim below D={d_full}; strategy {strategy!r} samples d "
                             f"from dims < D; pass e.g. dims=[8, 16, {d_full}]")
        if samples_layers and n_layers < 2:
            raise ValueError(f"strategy {strategy!r} needs a model with at least 2 layers (shallow exits are "
                             f"1..N-1), this one has {n_layers}; use 'full' or 'mrl'")
        fix = f"shallow exits are layers 1..N-1 of this {n_layers}-layer model (layer 0 is never an exit)"
        checked = samples_layers and self.layer_pool is not None
        pool = tuple(_int_list(f"{key}layer_pool", self.layer_pool, 1, n_layers - 1, fix) if checked else ())
        pool = pool or tuple(range(1, n_layers))
        if strategy in EVERY_LAYER and self.n_layers_per_step not in (1, "all", -1, len(pool)):
            logger.warning("n_layers_per_step=%r is ignored by strategy %r (every shallow exit, every step)",
                           self.n_layers_per_step, strategy)
        n_layers_per_step = (
            len(pool) if strategy in EVERY_LAYER
            else _per_step(f"{key}n_layers_per_step", self.n_layers_per_step, len(pool)) if samples_layers else 0
        )
        n_dims_per_step = _per_step(f"{key}n_dims_per_step", self.n_dims_per_step, len(small_dims)) \
            if samples_dims else 0
        if strategy == "starbucks":
            pairs = _check_pairs(f"{key}starbucks_pairs", self.starbucks_pairs, n_layers, d_full) \
                if self.starbucks_pairs is not None else default_starbucks_pairs(n_layers, d_full, dims)
        else:
            pairs = ()
            for name in ("starbucks_pairs", "layer_pool"):
                value = getattr(self, name)
                if value is not None and not (name == "layer_pool" and samples_layers):
                    logger.warning("%s=%r is ignored by strategy %r", name, value, strategy)
        if self.document_space_terms and not (samples_layers or strategy == "starbucks"):
            raise ValueError(f"{key}cross_weight / align_weight / score_kd_weight train shallow exits, but strategy "
                             f"{strategy!r} trains none; use 'dense', '2dmse', 'layers', 'starbucks' or 'ese'")
        compression_dim = 0
        if strategy == "ese":
            compression_dim = _ese_compression_dim(f"{key}compression_dim", self.compression_dim, d_full)
            for name, default in (("depth_weighting", "none"), ("kl_space", "coordinates")):
                if getattr(self, name) != default:
                    logger.warning("%s=%r is ignored by strategy 'ese' (its shallow terms are weighted "
                                   "1/(1 + ln(1 + n)) and it has no shallow-to-last KL)", name, getattr(self, name))
        elif self.compression_dim is not None:
            logger.warning("compression_dim=%r is ignored by strategy %r (only 'ese' uses it)",
                           self.compression_dim, strategy)
        if strategy == "separate" and model_metadata is not None and "truncated_from" not in model_metadata:
            logger.warning("strategy 'separate' expects a physically truncated model (model.truncate(n)); "
                           "on an untruncated model it is the same as 'full'")
        return ResolvedObjective(dims, small_dims, pool, n_layers_per_step, n_dims_per_step, pairs, compression_dim)


def _ese_compression_dim(name: str, value: int | None, d_full: int) -> int:
    """ESE's k checked against the model's width D (``None``: ``min(128, D // 2)``)."""
    if value is None:
        if d_full < 2:
            raise ValueError(f"strategy 'ese' needs embeddings of at least 2 dims (k < D), this model has {d_full}")
        return min(ESE_MAX_COMPRESSION_DIM, d_full // 2)
    if not 1 <= value < d_full:
        raise ValueError(f"{name} must be in 1..{d_full - 1} (below the model's {d_full} dims), got {value}; "
                         f"pass e.g. {min(ESE_MAX_COMPRESSION_DIM, d_full // 2)}")
    return int(value)


def _int_list(name: str, values: Any, lo: int, hi: int, fix: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of integers in {lo}..{hi}, got {values!r}; {fix}")
    bad = [v for v in values if not _is_int(v) or not lo <= v <= hi]
    if bad:
        raise ValueError(f"{name} has {bad} outside the allowed range {lo}..{hi} (got {list(values)}); {fix}")
    return sorted({int(v) for v in values})


def _per_step(name: str, value: Any, available: int) -> int:
    """``value`` (an int, ``"all"`` or -1 for all, ``None`` for 1) checked against ``available`` choices."""
    if value is None:
        value = 1
    if value == "all" or (not isinstance(value, bool) and value == -1):
        return available
    if not _is_int(value) or not 1 <= value <= available:
        raise ValueError(f"{name} must be 1..{available} or 'all', got {value!r}")
    return int(value)


def _check_pairs(name: str, pairs: Any, n: int, d: int) -> tuple[tuple[int, int], ...]:
    """Starbucks ``(layer, dim)`` pairs checked against ``1..n`` x ``1..d``, sorted."""
    fix = f"pass (layer, dim) pairs in 1..{n} x 1..{d}, e.g. [[{n // 2 or 1}, {d // 2}], [{n}, {d}]]"
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"{name} must be a non-empty list of (layer, dim) pairs, got {pairs!r}; {fix}")
    out = []
    for p in pairs:
        ok = isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(_is_int(v) for v in p)
        if not ok or not (1 <= p[0] <= n and 1 <= p[1] <= d):
            raise ValueError(f"{name} has {p!r}, outside layers 1..{n} x dims 1..{d}; {fix}")
        out.append((int(p[0]), int(p[1])))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {out}; list each (layer, dim) pair once")
    return tuple(sorted(out))
