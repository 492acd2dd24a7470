"""Training configuration: dataclasses that hold every default once, read from and written to TOML.

Precedence is defaults < TOML file < command-line flags. Each section validates itself in
``__post_init__`` (messages name the field, the value and the allowed range); checks that need the model
(dims, layers) are in :func:`check_against_model`. A resolved config is written to every run folder as
TOML and can be passed back with ``--config`` to repeat the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Strategy = Literal["full", "mrl", "layers", "2dmse", "starbucks", "separate"]
DepthWeighting = Literal["none", "linear", "log"]
KLSpace = Literal["coordinates", "batch"]
MixedPrecision = Literal["no", "fp16", "bf16"]
DataKind = Literal["scored", "pairs", "triplets"]
ExitHeads = Literal["none", "linear"]
STRATEGY_NAMES: tuple[str, ...] = get_args(Strategy)

# fields that may differ between a run and its --resume (they do not change what is computed per step);
# max_steps / epochs may grow to extend a run: the lr schedule is then recomputed for the new total
RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.epochs", "run.output_dir", "run.save_every", "run.keep_last", "run.eval_every",
    "run.log_every", "run.progress_bar", "run.eval_batch_size", "data.data_dir",
})


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{key} = {value!r} is invalid: {allowed}")


def _int(key: str, value: Any, low: int = 0, high: float = math.inf, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        upper = "" if high == math.inf else f"..{int(high)}"
        _fail(key, value, f"expected an integer in {low}{upper or ' or more'}")


def _float(key: str, value: Any, low: float = 0.0, high: float = math.inf, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        upper = "" if high == math.inf else f" and <= {high}"
        _fail(key, value, f"expected a finite number {bound}{upper}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"choose one of {', '.join(map(str, choices))}")


def _int_list(key: str, value: Any, low: int = 1, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, list) or not value:
        _fail(key, value, f"expected a non-empty list of integers >= {low}, e.g. [64, 128]")
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
            ``D x D`` map of its pooled vector, see :mod:`matryoshka2d.heads`); ``none`` adds none (heads the
            model already has are kept and trained). Strategies that train no shallow exit get no heads.
    """

    name: str = "minilm"
    pooling: str | None = None
    max_seq_length: int | None = None
    gradient_checkpointing: bool = False
    exit_heads: ExitHeads = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("model.name", self.name, "expected a model folder, hub id or 'minilm'")
        if self.pooling is not None:
            from matryoshka2d.pooling import POOLING_MODES

            _choice("model.pooling", self.pooling, POOLING_MODES)
        _int("model.max_seq_length", self.max_seq_length, 1, optional=True)
        if self.exit_heads not in get_args(ExitHeads):
            _fail("model.exit_heads", self.exit_heads,
                  f"choose one of {', '.join(get_args(ExitHeads))} (e.g. model.exit_heads = \"linear\")")


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

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            _fail("data.source", self.source, "expected a named set (stsb, sickr, nli) or a file path")
        if self.kind is not None:
            _choice("data.kind", self.kind, get_args(DataKind))
        if self.columns is not None and (
            not isinstance(self.columns, list) or not all(isinstance(c, str) and c for c in self.columns)
            or len(self.columns) not in (2, 3)
        ):
            _fail("data.columns", self.columns, "expected 2 or 3 column names, e.g. ['s1', 's2', 'label']")
        _int("data.limit", self.limit, 1, optional=True)
        _int_list("data.dev_layers", self.dev_layers)
        _int_list("data.dev_dims", self.dev_dims)


@dataclass
class ObjectiveConfig:
    """The 2D Matryoshka objective (see ``docs/method.md`` section 3); passed to ``TwoDMatryoshkaLoss``.

    Attributes:
        strategy: which exits are trained each step.
        dims: Matryoshka dims; ``None`` means 8, 16, ... < D plus D.
        layer_pool: shallow layers to sample from; ``None`` means 1..N-1.
        n_layers_per_step: shallow layers sampled per step (or ``"all"``).
        n_dims_per_step: dims below D sampled per step (or ``"all"``).
        last_weight: weight of the last-layer terms.
        prior_weight: weight of the shallow-layer terms.
        kl_weight: weight of the shallow-to-last KL alignment.
        kl_temperature: softmax temperature of the KL term.
        kl_space: ``coordinates`` (the paper's softmax over embedding coordinates) or ``batch`` (in-batch
            cosine-similarity distributions of the last exit distilled into the shallow ones).
        depth_weighting: lambda(n) applied to shallow terms.
        detach_teacher: stop the gradient through the KL teacher (the last layer).
        starbucks_pairs: fixed ``[layer, dim]`` pairs for ``starbucks``; ``None`` derives them.
        separate_layers: depth of the physically truncated model trained by ``separate``.
        seed: seed of the objective's own (layer, dim) sampler; ``None`` uses ``train.seed``.
    """

    strategy: Strategy = "2dmse"
    dims: list[int] | None = None
    layer_pool: list[int] | None = None
    n_layers_per_step: int | Literal["all"] = 1
    n_dims_per_step: int | Literal["all"] = 1
    last_weight: float = 1.0
    prior_weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    kl_space: KLSpace = "coordinates"
    depth_weighting: DepthWeighting = "none"
    detach_teacher: bool = True
    starbucks_pairs: list[list[int]] | None = None
    separate_layers: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _to_float(self, "last_weight", "prior_weight", "kl_weight", "kl_temperature")
        _choice("objective.strategy", self.strategy, STRATEGY_NAMES)
        _choice("objective.depth_weighting", self.depth_weighting, get_args(DepthWeighting))
        _choice("objective.kl_space", self.kl_space, get_args(KLSpace))
        _int_list("objective.dims", self.dims)
        if self.layer_pool is not None:
            _int_list("objective.layer_pool", self.layer_pool)
        for name in ("n_layers_per_step", "n_dims_per_step"):
            if getattr(self, name) != "all":
                _int(f"objective.{name}", getattr(self, name), 1)
        for name in ("last_weight", "prior_weight", "kl_weight"):
            _float(f"objective.{name}", getattr(self, name))
        _float("objective.kl_temperature", self.kl_temperature, open_low=True)
        if not isinstance(self.detach_teacher, bool):
            _fail("objective.detach_teacher", self.detach_teacher, "expected true or false")
        if self.starbucks_pairs is not None:
            pairs = self.starbucks_pairs
            if not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, list) and len(p) == 2 for p in pairs
            ):
                _fail("objective.starbucks_pairs", pairs,
                      "expected [[layer, dim], ...], e.g. [[2, 32], [6, 384]]")
            for p in pairs:
                _int("objective.starbucks_pairs[] layer", p[0], 1)
                _int("objective.starbucks_pairs[] dim", p[1], 1)
        _int("objective.separate_layers", self.separate_layers, 1, optional=True)
        if self.strategy == "separate" and self.separate_layers is None:
            _fail("objective.separate_layers", None,
                  "strategy 'separate' trains a model truncated to this many layers; set it, e.g. 3")
        _int("objective.seed", self.seed, 0, optional=True)


@dataclass
class LossConfig:
    """The base loss applied to each trained exit.

    Attributes:
        name: a base loss name (see :func:`matryoshka2d.losses.build_base_loss`), e.g. ``cosent``.
        options: keyword arguments of that loss (e.g. ``{scale = 30.0}``); unset ones keep its defaults.
    """

    name: str = "cosent"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("loss.name", self.name, "expected a base loss name such as 'cosent'")
        if not isinstance(self.options, dict):
            _fail("loss.options", self.options, "expected a table of keyword arguments, e.g. {scale = 30.0}")


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
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "no"
    seed: int = 42

    def __post_init__(self) -> None:
        _to_float(self, "epochs", "lr", "weight_decay", "warmup_ratio", "max_grad_norm")
        _int("train.batch_size", self.batch_size, 1)
        _int("train.grad_accumulation", self.grad_accumulation, 1)
        _float("train.epochs", self.epochs, open_low=True)
        _int("train.max_steps", self.max_steps, 1, optional=True)
        _float("train.lr", self.lr, open_low=True)
        if self.head_lr is not None:
            _to_float(self, "head_lr")
            value = self.head_lr
            if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                _fail("train.head_lr", value, "expected a finite number > 0 (e.g. 1e-3, often 10-100x train.lr), "
                      "or leave it unset to train the exit heads at train.lr")
        _float("train.weight_decay", self.weight_decay)
        _float("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _int("train.warmup_steps", self.warmup_steps, 0, optional=True)
        _float("train.max_grad_norm", self.max_grad_norm)
        _choice("train.mixed_precision", self.mixed_precision, get_args(MixedPrecision))
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
            _fail("run.output_dir", self.output_dir, "expected a folder path")
        _int("run.save_every", self.save_every, 0)
        _int("run.keep_last", self.keep_last, 1)
        _int("run.eval_every", self.eval_every, 0)
        _int("run.eval_batch_size", self.eval_batch_size, 1)
        _int("run.log_every", self.log_every, 1)
        if not isinstance(self.progress_bar, bool):
            _fail("run.progress_bar", self.progress_bar, "expected true or false")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig, "loss": LossConfig,
    "train": TrainConfig, "run": RunConfig,
}


@dataclass
class Config:
    """A whole training run; see the section classes for every field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        """Build and validate a config from ``{section: {field: value}}``.

        Raises:
            ValueError: an unknown section or field (with the closest valid name), or an invalid value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected tables like [train], got {type(data).__name__}")
        sections = {}
        for name, values in data.items():
            if name not in SECTIONS:
                raise ValueError(f"{source}: unknown section [{name}]{_suggest(name, SECTIONS)}; "
                                 f"sections: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"{source}: [{name}] must be a table of fields, got {values!r}")
            known = [f.name for f in dataclasses.fields(SECTIONS[name])]
            for key in values:
                if key not in known:
                    raise ValueError(f"{source}: unknown field {name}.{key}{_suggest(key, known)}; "
                                     f"[{name}] has {', '.join(known)}")
            sections[name] = SECTIONS[name](**values)
        return cls(**sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.field": value}`` for every field."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A validated copy with ``{"section.field": value}`` (or an unambiguous bare ``field``) changed.

        Raises:
            ValueError: unknown or ambiguous key, or an invalid value.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            section, name = resolve_key(key)
            data[section][name] = value
        return Config.from_dict(data, source="overrides")

    def to_toml(self) -> str:
        """TOML text that :func:`load_config` reads back into an equal config (``None`` is omitted)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            tables = []
            for key, value in values.items():
                if value is None:
                    lines.append(f"# {key} = (unset)")
                elif isinstance(value, dict):
                    tables.append((key, value))
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
            for key, table in (t for t in tables if t[1]):
                lines.append(f"\n[{section}.{key}]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
            lines.append("")
        return "\n".join(lines)


def resolve_key(key: str) -> tuple[str, str]:
    """``"train.lr"`` or bare ``"lr"`` -> ``("train", "lr")``; ``loss.<option>`` becomes ``loss.options``.

    Raises:
        ValueError: unknown or ambiguous key.
    """
    all_keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            return section, name
        raise ValueError(f"unknown config key {key!r}{_suggest(key, all_keys)}; keys look like train.lr")
    matches = [k for k in all_keys if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return tuple(matches[0].split(".", 1))  # type: ignore[return-value]
    if matches:
        raise ValueError(f"config key {key!r} is ambiguous ({', '.join(matches)}); write it with its section")
    raise ValueError(f"unknown config key {key!r}{_suggest(key, all_keys)}; keys look like train.lr")


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``--set key=value``: the value is read as TOML (``0.5``, ``true``, ``[64, 128]``) or else text.

    ``loss.options.NAME=VALUE`` sets one loss option.

    Raises:
        ValueError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {text!r} is not key=value; write e.g. --set train.lr=3e-5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key, value


def apply_assignments(config: Config, assignments: list[str]) -> Config:
    """Apply ``--set key=value`` strings (later ones win).

    Raises:
        ValueError: a malformed assignment, unknown key or invalid value.
    """
    overrides: dict[str, Any] = {}
    options = dict(config.loss.options)
    for text in assignments:
        key, value = parse_assignment(text)
        if key.startswith("loss.options."):
            options[key.removeprefix("loss.options.")] = value
            overrides["loss.options"] = options
        else:
            overrides[key] = value
    return config.replace(overrides)


def load_config(path: str | os.PathLike[str] | None = None, *, overrides: dict[str, Any] | None = None,
                assignments: list[str] | None = None) -> Config:
    """Defaults < the TOML file at ``path`` < ``overrides`` (``{"section.field": value}``) < ``assignments``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed TOML, an unknown key or an invalid value.
    """
    config = Config()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {file} does not exist; pass a .toml file such as "
                                    f"configs/stsb-minilm-2dmse.toml")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid TOML: {e}") from None
        config = Config.from_dict(data, source=str(file))
    if overrides:
        config = config.replace({k: v for k, v in overrides.items() if v is not None})
    if assignments:
        config = apply_assignments(config, assignments)
    return config


def config_differences(old: Config, new: Config, *, ignore: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    """``"key: run has X, now Y"`` for every field that differs and is not in ``ignore``."""
    a, b = old.flat(), new.flat()
    return [f"{k} (run: {a[k]!r}, now: {b[k]!r})" for k in a if k not in ignore and a[k] != b[k]]


def check_against_model(config: Config, num_layers: int, hidden_size: int) -> None:
    """Check the fields whose range depends on the model (N layers, width D) before training starts.

    Args:
        config: the run's config.
        num_layers: N of the model as trained (after truncation for ``separate``).
        hidden_size: D.

    Raises:
        ValueError: a dim above D, a layer outside its range, or a batch that cannot be split.
    """
    obj, data = config.objective, config.data
    for key, dims in (("objective.dims", obj.dims), ("data.dev_dims", data.dev_dims)):
        for d in dims or []:
            if d > hidden_size:
                _fail(key, dims, f"dims must be in 1..{hidden_size} (the model's hidden size); drop {d}")
    if obj.layer_pool is not None:
        for n in obj.layer_pool:
            if not 1 <= n <= num_layers - 1:
                _fail("objective.layer_pool", obj.layer_pool,
                      f"shallow layers must be in 1..{num_layers - 1} (layer N is always trained); drop {n}")
        if obj.n_layers_per_step != "all" and obj.n_layers_per_step > len(obj.layer_pool):
            _fail("objective.n_layers_per_step", obj.n_layers_per_step,
                  f"cannot exceed the {len(obj.layer_pool)} layers of objective.layer_pool")
    for n in data.dev_layers or []:
        if n > num_layers:
            _fail("data.dev_layers", data.dev_layers, f"layers must be in 1..{num_layers}; drop {n}")
    for layer, dim in obj.starbucks_pairs or []:
        if layer > num_layers or dim > hidden_size:
            _fail("objective.starbucks_pairs", obj.starbucks_pairs,
                  f"each pair needs layer in 1..{num_layers}, dim in 1..{hidden_size}; drop [{layer}, {dim}]")


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
