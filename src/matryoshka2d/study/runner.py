"""The reproduction study: train every strategy x seed, evaluate the grid, resume after interruption.

One TOML file drives it (``configs/reproduce-stsb-minilm.toml``); ``m2d reproduce --config FILE`` (or
``make reproduce``) runs what is missing and then writes the report (:mod:`matryoshka2d.study.report`).
Every unit of work leaves a file behind (``final/`` for a training run, ``eval.json`` for its grid), so a
killed study restarts where it stopped; a training run that was cut off resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from matryoshka2d.io.atomic import atomic_write_json
from matryoshka2d.study.config import ORIGINAL, StudyConfig, Unit, plan_units

logger = logging.getLogger(__name__)

@contextmanager
def unit_lock(study: StudyConfig, unit: Unit, *, wait: bool) -> Iterator[bool]:
    """Hold ``unit``'s lock file while it is trained and evaluated, so that several workers can run one study.

    Yields ``True`` when the lock is held, ``False`` when another worker holds it and ``wait`` is false. The
    operating system drops the lock of a killed worker, so a crash never leaves a unit locked. Without
    ``fcntl`` (Windows) every unit is taken: run one worker there.
    """
    folder = unit.folder(Path(study.runs_dir))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    with open(folder.parent / f".{folder.name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def for_each_unit(study: StudyConfig, units: list[Unit], work: Callable[[Unit], object], what: str = "") -> None:
    """Run ``work(unit)`` for every unit under its lock: free units first, then (waiting) those another
    worker held, so that two workers started on one study share its units and both end with all of them done."""
    busy = []
    for i, unit in enumerate(units, 1):
        with unit_lock(study, unit, wait=False) as held:
            if not held:
                busy.append(unit)
                continue
            logger.info("[%d/%d] %s seed %s%s", i, len(units), unit.label, unit.seed, what)
            work(unit)
    for unit in busy:
        logger.info("waiting for another worker's %s seed %s%s", unit.label, unit.seed, what)
        with unit_lock(study, unit, wait=True):
            work(unit)


def train_unit(study: StudyConfig, unit: Unit) -> Path:
    """Train ``unit`` unless its ``final/`` exists; resume a run that was cut off. Returns the model folder.

    Raises:
        ValueError: ``final/`` exists but was trained with settings the study no longer asks for (its
            ``config.resolved.toml`` differs in a field other than where and how often it saved and logged).
    """
    from matryoshka2d.training.config import load_config
    from matryoshka2d.training.loop import train
    from matryoshka2d.training.setup import check_finished_run

    if unit.label == ORIGINAL:
        return Path(base_model_name(study))
    folder = unit.folder(Path(study.runs_dir))
    final = folder / "final"
    overrides = {**study.overrides, **dict(unit.overrides), "train.seed": unit.seed,
                 "run.output_dir": str(folder), "run.progress_bar": False}
    if unit.lr is not None:
        overrides["train.lr"] = unit.lr
    config = load_config(study.train_config, overrides=overrides)
    if final.is_dir():
        check_finished_run(config)
        return final
    resume = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    logger.info("training %s seed %s -> %s%s", unit.label, unit.seed, folder, " (resuming)" if resume else "")
    start = time.perf_counter()
    result = train(config, resume=resume, overwrite=folder.exists() and not resume)
    logger.info("trained %s seed %s in %.0fs", unit.label, unit.seed, time.perf_counter() - start)
    return result.final_dir


def base_model_name(study: StudyConfig) -> str:
    """The model every run starts from: the training config's ``model.name`` with the study's ``overrides``
    applied (a study may swap the model, e.g. ``"model.name" = "models/all-mpnet-base-v2"``; its depth sets the
    report's layers)."""
    from matryoshka2d.training.config import load_config

    return load_config(study.train_config, overrides=dict(study.overrides)).model.name


def load_sets(names: list[str], split: str) -> dict[str, Any]:
    """``{name: set}`` of the ``split`` of each named STS set (``ScoredPairs``) or BEIR set (``BeirSet``)."""
    from matryoshka2d.data.beir import BEIR_SETS, load_beir
    from matryoshka2d.data.datasets import load_sts

    return {name: load_beir(name, split) if name in BEIR_SETS else load_sts(name, split) for name in names}


def eval_device() -> str:
    """Where units are evaluated: the first CUDA device when torch sees one (training uses it too through
    accelerate), else the CPU. Embeddings come back as float32 numpy either way."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_unit(study: StudyConfig, unit: Unit, model_dir: Path, sets: dict[str, Any], *,
                  tag: str = "eval") -> Path:
    """Evaluate the whole grid of ``unit`` on the sets of ``sets`` that ``<tag>.json`` does not hold yet (they
    are added to it): STS sets by Spearman (:func:`~matryoshka2d.evaluation.grid.evaluate_grid`), BEIR sets by
    retrieval over their corpus (:func:`~matryoshka2d.evaluation.retrieval.evaluate_retrieval`). Returns the
    JSON path."""
    from matryoshka2d.data.beir import BeirSet
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.evaluation.result import load_result

    out = unit.folder(Path(study.runs_dir)) / f"{tag}.json"
    done = load_result(out) if out.is_file() else None
    missing = {k: v for k, v in sets.items() if done is None or k not in done.sets}
    if not missing:
        return out
    model = MatryoshkaEncoder.from_pretrained(model_dir).to(eval_device())
    dims = [d for d in study.dims or [] if d <= model.hidden_size] or None
    name = f"{unit.label}/{'base' if unit.seed is None else f'seed{unit.seed}'}"
    if all(isinstance(v, BeirSet) for v in missing.values()):
        from matryoshka2d.evaluation.retrieval import evaluate_retrieval

        result = evaluate_retrieval(model, missing, dims=dims, batch_size=study.eval_batch_size, model_name=name)
    else:
        from matryoshka2d.evaluation.grid import evaluate_grid

        result = evaluate_grid(model, missing, dims=dims, batch_size=study.eval_batch_size, model_name=name)
    (result if done is None else done.merged(result)).save(out)
    return out


def select_lr(study: StudyConfig) -> tuple[float | None, dict[str, Any]]:
    """Choose the learning rate on the dev set: the best mean dev score (Spearman, or nDCG@10 on a BEIR dev
    split) over every exit with dim >= 64,
    averaged over ``selection_strategies`` (seed ``seeds[0]``). Test sets are never looked at."""
    if not study.lr_grid:
        return None, {}
    dev = load_sets([study.selection_set], "dev")
    units = _selection_units(study)
    for_each_unit(study, list(units.values()), lambda u: evaluate_unit(study, u, train_unit(study, u), dev, tag="dev"),
                  " (learning-rate selection)")
    return _score_selection(study, units)


def _selection_units(study: StudyConfig) -> dict[tuple[str, str], Unit]:
    """The runs of the learning-rate choice: ``{(lr, strategy): unit}`` at the first seed."""
    return {(f"{lr:g}", strategy): Unit(strategy, study.seeds[0], (("objective.strategy", strategy),), lr)
            for lr in study.lr_grid for strategy in study.selection_strategies}


def _score_selection(study: StudyConfig, units: dict[tuple[str, str], Unit]) -> tuple[float | None, dict[str, Any]]:
    """The learning rate whose selection runs have the best mean dev score (their ``dev.json`` must exist)."""
    from matryoshka2d.evaluation.result import load_result

    results = {key: load_result(unit.folder(Path(study.runs_dir)) / "dev.json") for key, unit in units.items()}
    metric = next(iter(results.values())).metric  # every run is scored on the same dev set
    scores: dict[str, dict[str, float]] = {}
    for (lr, strategy), result in results.items():
        floor = min(64, max(result.dims))  # narrow models: their widest dim
        values = [r[metric] for r in result.records if r["dim"] >= floor]
        scores.setdefault(lr, {})[strategy] = sum(values) / len(values)
    mean = {lr: sum(v.values()) / len(v) for lr, v in scores.items()}
    best = max(mean, key=mean.__getitem__)
    logger.info("learning rate chosen on %s dev: %s (%s)", study.selection_set, best, mean)
    return float(best), {"set": f"{study.selection_set} dev", "rule": f"mean {metric} over exits with dim >= 64, "
                         f"averaged over {', '.join(study.selection_strategies)}", "scores": scores,
                         "mean": mean, "chosen": best}


def run_study(study: StudyConfig, *, report_only: bool = False, seeds: list[int] | None = None,
              first: list[str] | None = None, only: list[str] | None = None) -> Path:
    """Run what is missing, then write the report. Returns the report path.

    ``seeds``: only these of the study's seeds (``None``: all); the learning rate is still chosen at the
    study's first seed, and the report covers only the runs of these seeds, so every strategy in it has the
    same seeds. ``first``: shell patterns (``fnmatch``) of unit labels trained before the others, in the
    order of the patterns; every unit still runs. ``only``: shell patterns of the unit labels to train now (the
    others wait for a later call, so two workers can split a long study); the report still covers every
    finished run of ``seeds``."""
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.study.report import write_report

    base = MatryoshkaEncoder.from_pretrained(base_model_name(study))
    for flag, patterns in (("--first", first), ("--only", only)):  # a typo fails now, not after the lr runs
        if patterns:
            check_patterns(plan_units(study, base.num_layers, None), patterns, flag)
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lr, selection = select_lr(study) if not report_only else _saved_selection(study, out)
    units = [u for u in plan_units(study, base.num_layers, lr) if seeds is None or u.seed is None or u.seed in seeds]
    evals = {u: u.folder(Path(study.runs_dir)) / f"{study.result_tag}.json" for u in units}
    if report_only and not any(p.is_file() for p in evals.values()):
        which = "" if seeds is None else f" of seeds {','.join(map(str, seeds))}"
        raise ValueError(f"--report-only: no finished run{which} of this study under {study.runs_dir}, so the report "
                         "and its results are left as they are; train and evaluate first (the same command "
                         "without --report-only), or point runs_dir at the runs")
    atomic_write_json(out / "selection.json", selection)
    todo = units_only(units, only) if only else units
    if first:
        todo = units_first(todo, first)
    sets = {} if report_only else load_sets(study.eval_sets, "test")
    priority = {k: v for k, v in sets.items() if k in study.priority_sets} or sets
    dev = load_sets([study.selection_set], "dev") if study.dev_eval and not report_only else {}

    def work(unit: Unit) -> None:
        model_dir = train_unit(study, unit)
        evaluate_unit(study, unit, model_dir, priority, tag=study.result_tag)
        if dev:
            evaluate_unit(study, unit, model_dir, dev, tag="dev")

    if not report_only:
        for_each_unit(study, todo, work)
        if len(priority) < len(sets):  # the other sets, once every run is trained
            for_each_unit(study, todo, lambda u: evaluate_unit(study, u, train_unit(study, u), sets,
                                                                tag=study.result_tag), ": the other sets")
    return write_report(study, {u: p for u, p in evals.items() if p.is_file()}, selection, base.num_layers)


def check_patterns(units: list[Unit], patterns: list[str], flag: str) -> None:
    """Raise ``ValueError`` naming the pattern, ``flag`` and the labels when a pattern matches no unit's label
    (a typo would otherwise silently change nothing)."""
    from fnmatch import fnmatchcase

    labels = list(dict.fromkeys(u.label for u in units))
    for pattern in patterns:
        if not any(fnmatchcase(label, pattern) for label in labels):
            raise ValueError(f"{flag} {pattern!r} matches none of the study's units; its labels are "
                             f"{', '.join(labels)} (shell patterns such as 'separate-head-*' are allowed)")


def units_only(units: list[Unit], patterns: list[str]) -> list[Unit]:
    """The ``units`` whose label matches one of the shell ``patterns``, in plan order (``run_study`` checks the
    patterns first, see ``check_patterns``)."""
    from fnmatch import fnmatchcase

    return [u for u in units if any(fnmatchcase(u.label, p) for p in patterns)]


def units_first(units: list[Unit], patterns: list[str]) -> list[Unit]:
    """``units`` with those whose label matches a pattern moved to the front (pattern order, then plan order;
    ``run_study`` checks the patterns first, see ``check_patterns``)."""
    from fnmatch import fnmatchcase

    def rank(unit: Unit) -> int:  # the first pattern it matches; unmatched units after every pattern
        return next((i for i, p in enumerate(patterns) if fnmatchcase(unit.label, p)), len(patterns))

    return sorted(units, key=rank)  # sorted is stable: plan order within a rank


def _saved_selection(study: StudyConfig, out: Path) -> tuple[float | None, dict[str, Any]]:
    import json

    path = out / "selection.json"
    if not path.is_file():
        return _selection_from_runs(study)
    try:
        selection = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it and the learning-rate choice is read from the "
                         "runs' dev results again") from None
    return (float(selection["chosen"]) if selection.get("chosen") else None), selection


def _selection_from_runs(study: StudyConfig) -> tuple[float | None, dict[str, Any]]:
    """The dev-set choice recomputed from the selection runs' ``dev.json`` (another study that shares
    ``runs_dir`` made them), without training anything; ``(None, {})`` when one is missing."""
    units = _selection_units(study)
    if not study.lr_grid or not all((u.folder(Path(study.runs_dir)) / "dev.json").is_file() for u in units.values()):
        return None, {}
    return _score_selection(study, units)
