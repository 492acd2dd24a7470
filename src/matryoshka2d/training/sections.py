"""The six sections of a training config (``[model]``, ``[data]``, ``[objective]``, ``[loss]``, ``[train]``,
``[run]``): dataclasses that hold every default once and check their own values.

Each section validates itself in ``__post_init__`` with the value checks below (messages name the field, the
value and the allowed range). The whole config, its TOML reading and writing, ``--set`` overrides and the
checks that need the model are in :mod:`matryoshka2d.training.config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from matryoshka2d.losses.options import ObjectiveOptions
from matryoshka2d.vocab import (
    DATA_KINDS,
    EXIT_HEADS,
    MIXED_PRECISIONS,
    POOLING_MODES,
    DataKind,
    ExitHeads,
    MixedPrecision,
)


def invalid(key: str, value: Any, allowed: str) -> NoReturn:
    """Raise the config's ValueError: ``"{key} = {value!r} is invalid: {allowed}"``."""
    raise ValueError(f"{key} = {value!r} is invalid: {allowed}")


def _int(key: str, value: Any, low: int = 0, high: float = math.inf, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        upper = "" if high == math.inf else f"..{int(high)}"
        invalid(key, value, f"expected an integer in {low}{upper or ' or more'}")


def _float(key: str, value: Any, low: float = 0.0, high: float = math.inf, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        upper = "" if high == math.inf else f" and <= {high}"
        invalid(key, value, f"expected a finite number {bound}{upper}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        invalid(key, value, f"choose one of {', '.join(map(str, choices))}")


def _int_list(key: str, value: Any, low: int = 1, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, list) or not value:
        invalid(key, value, f"expected a non-empty list of integers >= {low}, e.g. [64, 128]")
    for item in value:
        _int(f"{key}[]", item, low)


def _to_float(obj: Any, *names: str) -> None:
    """TOML writes ``1`` for ``1.0``; accept ints in float fields."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, name, float(value))


@dataclass
class ModelConfig:
    """Which encoder to train.

    Attributes:
        name: model folder, hub id, or ``minilm`` (the offline all-MiniLM-L6-v2).
        pooling: pooling mode; ``None`` keeps the model's own.
        max_seq_length: tokens per sentence; ``None`` keeps the model's own.
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower steps).
        exit_heads: ``linear`` gives every shallow exit the objective trains a head (identity-initialised
            ``D x D`` map of its pooled vector, see :mod:`matryoshka2d.encoder.heads`); ``none`` adds none (heads the
            model already has are kept and trained). Strategies that train no shallow exit get no heads.
        head_on_last: also give the LAST exit a head of ``exit_heads``' kind (a control: ``full`` + head,
            ``separate`` + head tell whether a head's gain comes from the shared model or from any head).
    """

    name: str = "minilm"
    pooling: str | None = None
    max_seq_length: int | None = None
    gradient_checkpointing: bool = False
    exit_heads: ExitHeads = "none"
    head_on_last: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            invalid("model.name", self.name, "expected a model folder, hub id or 'minilm'")
        if self.pooling is not None:
            _choice("model.pooling", self.pooling, POOLING_MODES)
        _int("model.max_seq_length", self.max_seq_length, 1, optional=True)
        if self.exit_heads not in EXIT_HEADS:
            invalid("model.exit_heads", self.exit_heads,
                    f"choose one of {', '.join(EXIT_HEADS)} (e.g. model.exit_heads = \"linear\")")
        if not isinstance(self.head_on_last, bool):
            invalid("model.head_on_last", self.head_on_last, "expected true or false")
        if self.head_on_last and self.exit_heads == "none":
            invalid("model.head_on_last", self.head_on_last,
                    "a head on the last exit needs a head kind: set model.exit_heads = \"linear\" too")


@dataclass
class DataConfig:
    """Training data and the dev set evaluated during training.

    Attributes:
        source: a named set (``stsb``, ``sickr``, ``nli``) or a .tsv/.csv/.jsonl file.
        kind: ``scored`` / ``pairs`` / ``triplets``; ``None`` detects it from the column names.
        columns: columns to read, in canonical order (text, text[, score or text]).
        split: split of a named set.
        data_dir: folder holding the named sets (default: ``$M2D_DATA_DIR`` or the shared data).
        limit: read only the first rows.
        dev_set: STS set evaluated every ``run.eval_every`` steps.
        dev_split: its split.
        dev_layers: exits evaluated; ``None`` means ``{N // 2, N}``.
        dev_dims: widths evaluated; ``None`` means ``{64, D}``.
        unlabelled: text files (one text per line) of unlabelled texts; each step adds a batch of them on which
            only embedding alignment (``objective.align_weight``) is computed.
        unlabelled_batch_size: texts of ``unlabelled`` per step; ``None`` means ``train.batch_size``.
    """

    source: str = "stsb"
    kind: DataKind | None = None
    columns: list[str] | None = None
    split: str = "train"
    data_dir: str | None = None
    limit: int | None = None
    dev_set: str = "stsb"
    dev_split: str = "dev"
    dev_layers: list[int] | None = None
    dev_dims: list[int] | None = None
    unlabelled: list[str] | None = None
    unlabelled_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.unlabelled is not None and (not isinstance(self.unlabelled, list) or not self.unlabelled
                                            or not all(isinstance(f, str) and f for f in self.unlabelled)):
            invalid("data.unlabelled", self.unlabelled, "expected a list of text files, e.g. ['queries.txt']")
        _int("data.unlabelled_batch_size", self.unlabelled_batch_size, 1, optional=True)
        if not isinstance(self.source, str) or not self.source:
            invalid("data.source", self.source, "expected a named set (stsb, sickr, nli) or a file path")
        if self.kind is not None:
            _choice("data.kind", self.kind, DATA_KINDS)
        if self.columns is not None and (
            not isinstance(self.columns, list) or not all(isinstance(c, str) and c for c in self.columns)
            or len(self.columns) not in (2, 3)
        ):
            invalid("data.columns", self.columns, "expected 2 or 3 column names, e.g. ['s1', 's2', 'label']")
        _int("data.limit", self.limit, 1, optional=True)
        _int_list("data.dev_layers", self.dev_layers)
        _int_list("data.dev_dims", self.dev_dims)


@dataclass
class ObjectiveConfig(ObjectiveOptions):
    """The 2D Matryoshka objective (see ``docs/method.md`` section 3): every option of
    :class:`~matryoshka2d.losses.options.ObjectiveOptions` (with its default and its checks), plus:

    Attributes:
        separate_layers: depth of the physically truncated model trained by ``separate``.
        seed: seed of the objective's own (layer, dim) sampler; ``None`` uses ``train.seed``.
    """

    PREFIX: ClassVar[str] = "objective."

    separate_layers: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _int("objective.separate_layers", self.separate_layers, 1, optional=True)
        if self.strategy == "separate" and self.separate_layers is None:
            invalid("objective.separate_layers", None,
                    "strategy 'separate' trains a model truncated to this many layers; set it, e.g. 3")
        _int("objective.seed", self.seed, 0, optional=True)


@dataclass
class LossConfig:
    """The base loss applied to each trained exit.

    Attributes:
        name: a base loss name (see :func:`matryoshka2d.losses.base.build_base_loss`), e.g. ``cosent``.
        options: keyword arguments of that loss (e.g. ``{scale = 30.0}``); unset ones keep its defaults.
    """

    name: str = "cosent"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            invalid("loss.name", self.name, "expected a base loss name such as 'cosent'")
        if not isinstance(self.options, dict):
            invalid("loss.options", self.options, "expected a table of keyword arguments, e.g. {scale = 30.0}")


@dataclass
class TrainConfig:
    """Optimisation and budget.

    Attributes:
        batch_size: examples per micro-batch summed over all processes (each process takes its share).
        grad_accumulation: micro-batches per optimizer step.
        epochs: passes over the data (fractions allowed); ignored when ``max_steps`` is set.
        max_steps: optimizer steps; ``None`` derives them from ``epochs``.
        lr: peak learning rate of AdamW.
        head_lr: peak learning rate of the exit heads (same schedule); ``None`` means ``lr``.
        layer_lr_decay: layer-wise lr decay g in (0, 1]: block n of N learns at ``lr * g**(N - n)``, the
            embeddings at ``lr * g**N``; 1 (the default) trains every backbone weight at ``lr``.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: share of the steps with a linear warm-up.
        warmup_steps: warm-up steps; overrides ``warmup_ratio`` when set.
        max_grad_norm: gradient clipping norm; 0 disables clipping.
        mixed_precision: ``no``, ``fp16`` (CUDA only) or ``bf16``.
        seed: seed of the model's RNGs, the data order and (by default) the objective's sampler.
    """

    batch_size: int = 32
    grad_accumulation: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-5
    head_lr: float | None = None
    layer_lr_decay: float = 1.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "no"
    seed: int = 42

    def __post_init__(self) -> None:
        _to_float(self, "epochs", "lr", "layer_lr_decay", "weight_decay", "warmup_ratio", "max_grad_norm")
        _int("train.batch_size", self.batch_size, 1)
        _int("train.grad_accumulation", self.grad_accumulation, 1)
        _float("train.epochs", self.epochs, open_low=True)
        _int("train.max_steps", self.max_steps, 1, optional=True)
        _float("train.lr", self.lr, open_low=True)
        if self.head_lr is not None:
            _to_float(self, "head_lr")
            value = self.head_lr
            if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                invalid("train.head_lr", value, "expected a finite number > 0 (e.g. 1e-3, often 10-100x train.lr), "
                      "or leave it unset to train the exit heads at train.lr")
        _float("train.layer_lr_decay", self.layer_lr_decay, 0.0, 1.0, open_low=True)
        _float("train.weight_decay", self.weight_decay)
        _float("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _int("train.warmup_steps", self.warmup_steps, 0, optional=True)
        _float("train.max_grad_norm", self.max_grad_norm)
        _choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _int("train.seed", self.seed, 0)


@dataclass
class RunConfig:
    """Where the run is written and how often it logs, evaluates and checkpoints.

    Attributes:
        output_dir: the run folder.
        save_every: checkpoint every this many steps (and at the end); 0 saves only at the end.
        keep_last: checkpoints kept (older ones are deleted).
        eval_every: evaluate on the dev set every this many steps (and at the end); 0 disables it.
        eval_batch_size: sentences per forward pass during evaluation.
        log_every: write a ``log.jsonl`` line every this many steps.
        progress_bar: show a tqdm bar.
    """

    output_dir: str = "runs/train"
    save_every: int = 500
    keep_last: int = 2
    eval_every: int = 0
    eval_batch_size: int = 64
    log_every: int = 1
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            invalid("run.output_dir", self.output_dir, "expected a folder path")
        _int("run.save_every", self.save_every, 0)
        _int("run.keep_last", self.keep_last, 1)
        _int("run.eval_every", self.eval_every, 0)
        _int("run.eval_batch_size", self.eval_batch_size, 1)
        _int("run.log_every", self.log_every, 1)
        if not isinstance(self.progress_bar, bool):
            invalid("run.progress_bar", self.progress_bar, "expected true or false")

