"""Training configuration: the whole run's :class:`Config`, read from and written to TOML.

Precedence is defaults < TOML file < command-line flags. The sections and their defaults live in
:mod:`matryoshka2d.training.sections` (re-exported here); each validates itself in ``__post_init__``
(messages name the field, the value and the allowed range); checks that need the model (dims, layers) are
in :func:`check_against_model`. A resolved config is written to every run folder as TOML and can be passed
back with ``--config`` to repeat the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka2d.training.sections import (
    DataConfig,
    LossConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
    invalid,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# fields that may differ between a run and its --resume (they do not change what is computed per step);
# max_steps / epochs may grow to extend a run: the lr schedule is then recomputed for the new total
RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.epochs", "run.output_dir", "run.save_every", "run.keep_last", "run.eval_every",
    "run.log_every", "run.progress_bar", "run.eval_batch_size", "data.data_dir",
})


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
        if file.is_dir():
            raise IsADirectoryError(f"config file {file} is a folder, not a file; pass a .toml file such as "
                                    f"configs/stsb-minilm-2dmse.toml")
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
        ValueError: a dim above D, a layer outside its range (the objective's checks are
            :meth:`~matryoshka2d.losses.options.ObjectiveOptions.resolve`).
    """
    obj, data = config.objective, config.data
    obj.resolve(num_layers, hidden_size)
    for d in data.dev_dims or []:
        if d > hidden_size:
            invalid("data.dev_dims", data.dev_dims,
                    f"dims must be in 1..{hidden_size} (the model's hidden size); drop {d}")
    for n in data.dev_layers or []:
        if n > num_layers:
            invalid("data.dev_layers", data.dev_layers, f"layers must be in 1..{num_layers}; drop {n}")


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
