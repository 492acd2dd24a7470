"""A study's configuration: the TOML that says what to train and evaluate, and its units of work."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka2d.data.beir import BEIR_SETS
from matryoshka2d.data.datasets import STS_SETS
from matryoshka2d.training.config import tomllib
from matryoshka2d.vocab import STRATEGIES

ORIGINAL = "original"  # the untrained model, evaluated as it is
TRAINED = STRATEGIES


@dataclass
class StudyConfig:
    """What the study trains and evaluates.

    Attributes:
        name: the study's name (report title).
        train_config: the training TOML every run starts from (model, data, loss, optimiser).
        overrides: ``{"section.field": value}`` applied to every run (same hyper-parameters everywhere).
        strategies: ``original`` (no training) and any of the training strategies.
        variants: extra named strategies, ``{label: {"section.field": value}}`` (e.g. an ablation). A variant
            that sets ``objective.strategy = "separate"`` (and no ``objective.separate_layers``) is a family of
            separately trained models, one per depth of ``separate_layers`` (``<label>-<n>``), such as
            ``separate`` + a head on the last exit: every shallow-exit strategy is compared with it too.
        separate_layers: depths trained by ``separate``; ``None`` means 1..N-1.
        seeds: one run per strategy and seed.
        lr_grid: learning rates tried on the dev set (seed ``seeds[0]``) before the study; empty: keep the
            training config's.
        selection_strategies: strategies whose dev score picks the learning rate.
        selection_set: dev set used to choose (never a test set): an STS set, or a BEIR set with a dev split
            (``nfcorpus``; SciFact has none).
        eval_sets: evaluation sets (test split): STS sets (Spearman), or BEIR sets (``scifact``, ``nfcorpus``:
            nDCG@10 and the other retrieval metrics over the whole corpus), not both.
        priority_sets: the sets of ``eval_sets`` evaluated right after each run; the others are evaluated once
            every run is trained, so an interrupted study holds the primary results of every strategy first.
        dev_eval: also evaluate every run on the ``selection_set`` dev split (``dev.json``), for ablations
            that are chosen on dev and reported on test.
        report: the markdown report written from the results; ``None`` means ``results.md`` beside
            ``output_dir`` (``research/results`` -> ``research/results.md``).
        command: the command quoted in the report as the one that generates it.
        dims: evaluated widths; ``None`` means the Matryoshka dims.
        eval_batch_size: sentences per forward pass in evaluation.
        runs_dir: where the runs are written.
        output_dir: where results JSON, tables and plots go.
        benchmark: encoding-speed JSON joined with quality (optional).
        draws: bootstrap resamples.
        verdict_within: the report's verdicts count an exit as close to the separate model of its depth when
            its Δ is at least ``-verdict_within``.
        verdict_full_exit: the goal for every strategy's full exit: Δ to plain fine-tuning at least
            ``-verdict_full_exit``.
        verdict_min_dim: the pooled verdicts (``m2d reproduce --pool``) count exits with dims at least this.
    """

    name: str = "stsb-minilm"
    train_config: str = "configs/stsb-minilm-2dmse.toml"
    overrides: dict[str, Any] = field(default_factory=dict)
    strategies: list[str] = field(default_factory=lambda: [ORIGINAL, *TRAINED])
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    separate_layers: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr_grid: list[float] = field(default_factory=list)
    selection_strategies: list[str] = field(default_factory=lambda: ["full", "2dmse"])
    selection_set: str = "stsb"
    eval_sets: list[str] = field(default_factory=lambda: ["stsb", "sickr", "sts12", "sts13", "sts14", "sts15",
                                                          "sts16"])
    priority_sets: list[str] = field(default_factory=lambda: ["stsb", "sickr"])
    dev_eval: bool = False
    report: str | None = None
    command: str = "make reproduce"
    dims: list[int] | None = None
    eval_batch_size: int = 128
    runs_dir: str = "runs/reproduce"
    output_dir: str = "research/results"
    benchmark: str | None = None
    draws: int = 1000
    verdict_within: float = 1.0
    verdict_full_exit: float = 0.5
    verdict_min_dim: int = 64

    def __post_init__(self) -> None:
        known = (ORIGINAL, *TRAINED)
        for s in self.strategies:
            if s not in known:
                raise ValueError(f"study.strategies: unknown strategy {s!r}; choose from {', '.join(known)}")
        for label, changes in self.variants.items():
            if label in known or not isinstance(changes, dict):
                raise ValueError(f"study.variants.{label}: expected a new label with a table of overrides")
        for key in ("verdict_within", "verdict_full_exit"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"study.{key} {value!r}: expected a number >= 0 (a Spearman / nDCG gap x100)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds {self.seeds!r}: expected distinct integers, e.g. [0, 1, 2]")
        for s in [*self.eval_sets, *self.priority_sets, self.selection_set]:
            if s not in STS_SETS and s not in BEIR_SETS:
                raise ValueError(f"study: unknown set {s!r}; known sets: {', '.join(STS_SETS)} (STS) and "
                                 f"{', '.join(BEIR_SETS)} (retrieval)")
        if not self.eval_sets:
            raise ValueError("study.eval_sets is empty; name the test sets, e.g. [\"stsb\", \"sickr\"] or "
                             "[\"scifact\"]")
        kinds = {s in BEIR_SETS for s in self.eval_sets}
        if len(kinds) > 1:
            raise ValueError(f"study.eval_sets {self.eval_sets} mixes STS and retrieval sets; a study evaluates "
                             "one kind: split it into two studies, which may share runs_dir (each run's STS "
                             "results go to eval.json, its retrieval results to retrieval.json)")

    @property
    def retrieval(self) -> bool:
        """Whether the study evaluates retrieval (BEIR sets, nDCG@10) rather than STS (Spearman)."""
        return bool(self.eval_sets) and self.eval_sets[0] in BEIR_SETS

    @property
    def result_tag(self) -> str:
        """The stem of each run's test result: ``eval`` (STS) or ``retrieval``, so that an STS study and a
        retrieval study can share ``runs_dir`` (and its trained models)."""
        return "retrieval" if self.retrieval else "eval"


def load_study(path: str | os.PathLike[str]) -> StudyConfig:
    """Read a study TOML (a ``[study]`` table and an optional ``[study.overrides]`` / ``[study.variants.X]``).

    Raises:
        FileNotFoundError / ValueError: missing file, bad TOML, unknown field or value.
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"study file {file} is a folder, not a file; pass a .toml file such as "
                                "configs/reproduce-stsb-minilm.toml")
    if not file.is_file():
        raise FileNotFoundError(f"study file {file} does not exist; see configs/reproduce-stsb-minilm.toml")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8")).get("study")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid TOML ({' '.join(str(e).split())}); fix it or start from "
                         "configs/reproduce-stsb-minilm.toml") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a [study] table")
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{file}: unknown field(s) study.{', study.'.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return StudyConfig(**data)


@dataclass(frozen=True)
class Unit:
    """One trained (or original) model of the study."""

    label: str  # strategy or variant label; separate runs are "separate-<n>"
    seed: int | None
    overrides: tuple[tuple[str, Any], ...] = ()
    lr: float | None = None

    def folder(self, runs_dir: Path) -> Path:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return runs_dir / f"{self.label}{lr}" / ("base" if self.seed is None else f"seed{self.seed}")


def plan_units(study: StudyConfig, num_layers: int, lr: float | None) -> list[Unit]:
    """Every model the study needs, seed by seed (an interrupted study has every strategy for its first seeds)."""
    units: list[Unit] = [Unit(ORIGINAL, None)] if ORIGINAL in study.strategies else []
    for seed in study.seeds:
        for strategy in study.strategies:
            if strategy == "separate":
                units += [Unit(f"separate-{n}", seed, (("objective.strategy", "separate"),
                                                       ("objective.separate_layers", n)), lr)
                          for n in study.separate_layers or range(1, num_layers)]
            elif strategy != ORIGINAL:
                units.append(Unit(strategy, seed, (("objective.strategy", strategy),), lr))
        for label, changes in study.variants.items():
            if label in separate_families(study):
                units += [Unit(f"{label}-{n}", seed, tuple(sorted({**changes, "objective.separate_layers": n}.items())),
                               lr) for n in study.separate_layers or range(1, num_layers)]
            else:
                units.append(Unit(label, seed, tuple(sorted(changes.items())), lr))
    return units


def separate_families(study: StudyConfig) -> tuple[str, ...]:
    """The variants that are families of separately trained models, one per depth (see ``variants``)."""
    return tuple(label for label, changes in study.variants.items()
                 if changes.get("objective.strategy") == "separate" and "objective.separate_layers" not in changes)
