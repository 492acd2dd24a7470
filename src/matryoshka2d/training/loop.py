"""The training loop: :func:`train` on Hugging Face Accelerate, with each part of a step a named function.

It runs as one process (CPU or GPU) or as several under ``accelerate launch`` / ``torchrun`` (DDP; gloo
on CPU). ``train.batch_size`` is the GLOBAL micro-batch: every process draws the same seeded order and
takes its share of each batch, so a config trains on the same examples whatever the number of processes.
A run folder holds ``config.resolved.toml``, ``log.jsonl``, ``checkpoints/``, ``best/`` (with a dev set)
and ``final/`` (a model folder: ``m2d eval RUN/final`` works).

The run's setup (run folder checks, loading and building, the optimizer) is in
:mod:`matryoshka2d.training.setup`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from matryoshka2d.training import checkpoint as ckpt
from matryoshka2d.training.checkpoint import DataOrder
from matryoshka2d.training.config import Config
from matryoshka2d.training.interrupts import SigintFlag, TrainingInterrupted, stop_requested
from matryoshka2d.training.setup import (
    CONFIG_FILE,
    build,
    check_run_dir,
    load_unlabelled,
    make_accelerator,
    make_optimizer,
    require_accelerate,
)

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
StepHook = Callable[[int, dict[str, Any]], None]


class TrainingDivergedError(RuntimeError):
    """A loss part or the gradient became NaN/inf; the last checkpoint on disk is the last good state."""


@dataclass
class TrainResult:
    """Where a finished run lives and what it reached."""

    run_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    best_step: int | None = None
    best_score: float | None = None


@dataclass
class TrainingRun:
    """Everything the steps share, built once before step 1 by :func:`start_run`.

    Attributes:
        objective: the 2D objective as Accelerate prepared it (DDP-wrapped on several processes).
        inner: the same objective unwrapped; ``inner.model`` is the encoder.
        order: the seeded data order every process draws alike.
        total: the last step; ``start`` the step the run resumes after (0 for a new run).
        best: the best dev score so far, ``{"step", "score"}``.
        truncated: training texts cut at ``max_seq_length`` so far (warned once at the end).
    """

    config: Config
    run_dir: Path
    accelerator: Any
    objective: Any
    inner: Any
    optimizer: Any
    scheduler: Any
    data: Any
    dev: dict[str, Any]
    unlabelled: list[str]
    order: DataOrder
    total: int
    start: int
    best: dict[str, Any]
    truncated: int = 0


def train(config: Config, *, resume: bool = False, overwrite: bool = False,
          on_step: StepHook | None = None) -> TrainResult:
    """Train ``config.model`` with the 2D Matryoshka objective; see ``docs/training.md``.

    Each step reads top to bottom: gradients accumulated over the micro-batches
    (:func:`accumulate_gradients`), one optimizer step and the step's record (:func:`optimizer_step`), then
    logging, dev evaluation, checkpoints and a requested stop (:func:`after_step`).

    Args:
        config: the run's configuration.
        resume: continue the run in ``config.run.output_dir`` from its latest checkpoint.
        overwrite: replace an existing run folder.
        on_step: called on the main process after every step with ``(step, log record)``.

    Returns:
        The run folder, the final model folder and the step count.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: bad input, before training starts.
        TrainingDivergedError: a NaN/inf loss part or gradient (the run stops, its checkpoints stay).
        TrainingInterrupted: Ctrl-C (SIGINT); the current step finished and was saved as a checkpoint.
    """
    run = start_run(config, resume=resume, overwrite=overwrite)
    main = run.accelerator.is_main_process
    log = open(run.run_dir / LOG_FILE, "a", encoding="utf-8") if main else None  # noqa: SIM115
    bar = tqdm(total=run.total, initial=run.start, desc="train", unit="step",
               disable=not (main and config.run.progress_bar))
    began = time.perf_counter()
    sigint = SigintFlag()
    try:
        for step in range(run.start + 1, run.total + 1):
            tick = time.perf_counter()
            parts, layers, dims = accumulate_gradients(run, step)
            record = optimizer_step(run, step, parts, layers=layers, dims=dims, tick=tick)
            after_step(run, step, record, log=log, bar=bar, sigint=sigint, on_step=on_step)
    finally:
        sigint.restore()
        bar.close()
        if log is not None:
            log.close()
    return finish_run(run, began=began)


def start_run(config: Config, *, resume: bool, overwrite: bool) -> TrainingRun:
    """Everything before step 1: checks, the model, data and objective, the optimizer, Accelerate, and the run
    folder (new, replaced with ``overwrite``, or resumed from its latest checkpoint with ``resume``)."""
    require_accelerate()
    from accelerate.utils import set_seed

    run_dir = Path(config.run.output_dir)
    accelerator = make_accelerator(config.train.mixed_precision)
    world = accelerator.num_processes
    resume_from = check_run_dir(config, resume=resume, overwrite=overwrite)
    set_seed(config.train.seed)
    model, data, dev, objective = build(config, world_size=world)
    unlabelled = load_unlabelled(config)
    accelerator.wait_for_everyone()  # every process has checked everything before anything is written
    t = config.train
    order = DataOrder(len(data), t.batch_size, t.seed)
    total = t.max_steps or max(1, math.ceil(t.epochs * order.batches_per_epoch / t.grad_accumulation))
    optimizer, scheduler = make_optimizer(objective, config, total)
    if world > 1 and model.exit_head_layers:
        # a step trains the heads of its sampled exits only; DDP must expect parameters without a gradient
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    objective, optimizer = accelerator.prepare(objective, optimizer)  # DDP wraps the objective (1 call/step)
    inner = accelerator.unwrap_model(objective)
    start, best = 0, {"step": None, "score": None}
    if resume_from is not None:
        start, best = _restore(resume_from, accelerator, inner, optimizer, scheduler, order)
    elif accelerator.is_main_process:
        if run_dir.exists() and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config.to_toml(), encoding="utf-8")
    accelerator.wait_for_everyone()
    return TrainingRun(config, run_dir, accelerator, objective, inner, optimizer, scheduler, data, dev,
                       unlabelled, order, total, start, best)


def accumulate_gradients(run: TrainingRun, step: int) -> tuple[dict[str, torch.Tensor], set[int], set[int]]:
    """Forward and backward over the step's ``grad_accumulation`` micro-batches (this process's share of each).

    Gradients are all-reduced only on the last micro-batch.

    Returns:
        The loss parts averaged over the micro-batches, and the exit layers and dims the objective sampled.
    """
    t, accelerator, inner = run.config.train, run.accelerator, run.inner
    world, rank, accum = accelerator.num_processes, accelerator.process_index, t.grad_accumulation
    per_rank = t.batch_size // world
    extra_batch = run.config.data.unlabelled_batch_size or t.batch_size
    run.objective.train()
    parts: dict[str, torch.Tensor] = {}
    layers: set[int] = set()
    dims: set[int] = set()
    for micro in range(accum):
        rows = run.order.next_batch()[rank * per_rank : (rank + 1) * per_rank]
        features, labels, cut = _collate(inner.model, run.data, rows, accelerator.device)
        run.truncated += cut
        kwargs = {}
        if run.unlabelled:  # the same texts for a step on every run (resume included)
            first = ((step - 1) * accum + micro) * extra_batch * world + rank * extra_batch
            chosen = [run.unlabelled[(first + i) % len(run.unlabelled)] for i in range(extra_batch)]
            batch = inner.model.tokenize(chosen)
            run.truncated += int(batch.pop("num_truncated", 0))
            kwargs["unlabelled"] = {k: v.to(accelerator.device) for k, v in batch.items()}
        with contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(run.objective):
            out = run.objective(features, labels, **kwargs)
            accelerator.backward(out["loss"] / accum)
        for key, value in out.items():
            parts[key] = parts.get(key, 0.0) + value.detach().float() / accum
        layers.update(inner.last_sample.get("layers", ()))
        dims.update(inner.last_sample.get("dims", ()))
    return parts, layers, dims


def optimizer_step(run: TrainingRun, step: int, parts: dict[str, torch.Tensor], *, layers: set[int],
                   dims: set[int], tick: float) -> dict[str, Any]:
    """Clip, check and take the optimizer and schedule step; return the step's log record.

    One all-reduce per step: the logged parts are the mean over processes, and a NaN on any process is seen by
    all of them, so they stop together.

    Raises:
        TrainingDivergedError: a NaN/inf loss part or gradient norm.
    """
    t, accelerator, optimizer = run.config.train, run.accelerator, run.optimizer
    names = list(parts)
    record = dict(zip(names, accelerator.reduce(torch.stack(list(parts.values())), "mean").tolist(),
                      strict=True))
    max_norm = t.max_grad_norm or math.inf  # inf: measure the norm (for logs and checks), never clip
    grad_norm = float(accelerator.clip_grad_norm_(run.objective.parameters(), max_norm))
    _check_finite(step, record, grad_norm, fp16=t.mixed_precision == "fp16")
    lrs = run.scheduler.get_last_lr()  # the first group is the backbone at the full lr
    heads = [x for g, x in zip(optimizer.param_groups, lrs, strict=True) if g.get("name") == "heads"]
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - tick
    return {"step": step, "epoch": round(run.order.epochs_done, 4), "lr": lrs[0],
            **({"head_lr": heads[0]} if heads else {}), **record,
            "grad_norm": grad_norm, "layers": sorted(layers), "dims": sorted(dims),
            "samples_per_s": round(t.batch_size * t.grad_accumulation / seconds, 2), "step_s": round(seconds, 4)}


def after_step(run: TrainingRun, step: int, record: dict[str, Any], *, log: Any, bar: Any, sigint: SigintFlag,
               on_step: StepHook | None) -> None:
    """Log the step, evaluate on the dev sets, checkpoint, call ``on_step``, and stop if asked (Ctrl-C / SIGTERM).

    Raises:
        TrainingInterrupted: a stop was requested before the last step; the step's checkpoint is saved first.
    """
    config, accelerator, total = run.config, run.accelerator, run.total
    if log is not None and (step % config.run.log_every == 0 or step == total):
        log.write(json.dumps(record) + "\n")
        log.flush()
    bar.update(1)
    shown = {k.removeprefix("loss/"): f"{v:.3f}" for k, v in record.items() if k.startswith("loss")}
    bar.set_postfix({**shown, "L": record["layers"], "d": record["dims"], "ex/s": f"{record['samples_per_s']:.0f}"})
    if run.dev and (step % config.run.eval_every == 0 or step == total):
        run.best = _evaluate(accelerator, run.inner, run.dev, config, step, run.best, log)
    saved = bool(config.run.save_every and step % config.run.save_every == 0) or step == total
    if saved:
        _checkpoint(accelerator, run.run_dir, step, run.inner, run.optimizer, run.scheduler, run.order, run.best,
                    config.run.keep_last)
    if accelerator.is_main_process and on_step is not None:
        on_step(step, record)
    if stop_requested(accelerator, sigint.raised) and step < total:
        if not saved:
            _checkpoint(accelerator, run.run_dir, step, run.inner, run.optimizer, run.scheduler, run.order,
                        run.best, config.run.keep_last)
        folder = ckpt.checkpoint_dir(run.run_dir, step)
        if accelerator.is_main_process:
            logger.warning("interrupted after step %d of %d; checkpoint saved in %s; resume with: "
                           "m2d train --config %s --resume", step, total, folder, run.run_dir / CONFIG_FILE)
        raise TrainingInterrupted(step, folder, sigint.signum)


def finish_run(run: TrainingRun, *, began: float) -> TrainResult:
    """After the last step: warn about truncated texts once and save ``final/`` from the main process.

    The run's seconds are counted from ``began`` (a ``time.perf_counter()``) to when ``final/`` is saved.
    """
    if run.truncated:
        logger.warning("%d training texts were longer than max_seq_length=%d tokens and were truncated",
                       run.truncated, run.inner.model.max_seq_length)
    final = run.run_dir / "final"
    if run.accelerator.is_main_process:
        _save_model(run.inner, run.config, run.data, final, steps=run.total, epochs=run.order.epochs_done,
                    world=run.accelerator.num_processes, best=run.best)
    run.accelerator.wait_for_everyone()
    seconds = time.perf_counter() - began
    logger.info("trained %d steps in %.1fs; final model in %s", run.total - run.start, seconds, final)
    return TrainResult(run.run_dir, final, run.total, seconds, run.best["step"], run.best["score"])


def _check_finite(step: int, record: dict[str, float], grad_norm: float, *, fp16: bool) -> None:
    """Stop on a NaN/inf loss part (named) or gradient norm; fp16's scaler skips inf-gradient steps itself."""
    bad = [k for k in [*list(record)[1:], "loss"] if not math.isfinite(record[k])]
    if bad:
        raise TrainingDivergedError(
            f"step {step}: {bad[0]} is {record[bad[0]]} (loss parts: {record}); the run stopped and its last "
            "checkpoint is intact; lower train.lr, or use train.mixed_precision = 'no'")
    if not math.isfinite(grad_norm) and not fp16:
        raise TrainingDivergedError(
            f"step {step}: the gradient norm is {grad_norm} (loss parts: {record}); the run stopped and its "
            "last checkpoint is intact; lower train.lr or set train.max_grad_norm")


def _restore(folder: Path, accelerator: Any, inner: Any, optimizer: Any, scheduler: Any,
             order: DataOrder) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint into the live objects; the RNGs are restored last, right before the loop."""
    state = ckpt.load_checkpoint(folder, rank=accelerator.process_index)
    inner.model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    order.load_state_dict({**state.state["data_order"], "generator": state.rng["data_order"]})
    inner.set_sampler_state(state.rng["sampler"])
    if state.state["world_size"] != accelerator.num_processes:
        logger.warning("resuming a %d-process run on %d processes: same data order, but other dropout RNG "
                       "streams, so not bitwise identical", state.state["world_size"],
                       accelerator.num_processes)
    if accelerator.is_main_process:
        ckpt.rewind_log(folder.parent.parent / LOG_FILE, state.step)
    ckpt.restore_rng(state.rng)
    logger.info("resuming %s from step %d", folder.parent.parent, state.step)
    return state.step, state.state["best"]


def _checkpoint(accelerator: Any, run_dir: Path, step: int, inner: Any, optimizer: Any, scheduler: Any,
                order: DataOrder, best: dict[str, Any], keep_last: int) -> None:
    """Gather every process's RNG state and write checkpoint ``step`` from the main process."""
    from accelerate.utils import gather_object

    order_state = order.state_dict()
    rng = ckpt.capture_rng(sampler=inner.sampler_state(), data_order=order_state.pop("generator"))
    rng_all = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    if accelerator.is_main_process:
        state = {"step": step, "epoch": order.epochs_done, "best": best, "data_order": order_state,
                 "world_size": accelerator.num_processes}
        ckpt.save_checkpoint(run_dir, step, model=inner.model.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), rng=rng_all, state=state, keep_last=keep_last)
    accelerator.wait_for_everyone()


def _collate(model: Any, data: Any, rows: list[int], device: torch.device) -> tuple[list, Any, int]:
    """Tokenize each text column of ``rows``; scores (raw scale) become a float tensor."""
    features, truncated = [], 0
    for texts in data.columns.values():
        batch = model.tokenize([texts[i] for i in rows])
        truncated += int(batch.pop("num_truncated", 0))
        features.append({k: v.to(device) for k, v in batch.items()})
    labels = None
    if data.scores is not None:
        labels = torch.as_tensor(data.scores[rows], dtype=torch.float32, device=device)
    return features, labels, truncated


def _evaluate(accelerator: Any, inner: Any, dev: dict[str, Any], config: Config, step: int,
              best: dict[str, Any], log: Any) -> dict[str, Any]:
    """Dev Spearman at a few exits on the main process; a new best mean score saves ``best/``."""
    if accelerator.is_main_process:
        from matryoshka2d.evaluation.grid import evaluate_grid

        model = inner.model
        n, d = model.num_layers, model.hidden_size
        layers = config.data.dev_layers or sorted({max(1, n // 2), n})
        dims = config.data.dev_dims or sorted({min(64, d), d})
        result = evaluate_grid(model, dev, layers=layers, dims=dims, batch_size=config.run.eval_batch_size,
                               show_progress_bar=False)
        scores = {f"dev/{r['set']}/L{r['layer']}/d{r['dim']}": r["spearman"] for r in result.records}
        score = sum(scores.values()) / len(scores)
        improved = best["score"] is None or score > best["score"]
        logger.info("step %d: dev mean Spearman %.2f over %d exits%s", step, score, len(scores),
                    " (new best)" if improved else "")
        log.write(json.dumps({"step": step, "event": "eval", "dev_score": score, **scores}) + "\n")
        log.flush()
        if improved:
            best = {"step": step, "score": score}
            _save_model(inner, config, None, Path(config.run.output_dir) / "best", steps=step, epochs=None,
                        world=accelerator.num_processes, best=best)
    accelerator.wait_for_everyone()  # only the main process's ``best`` is ever written
    return best


def _save_model(inner: Any, config: Config, data: Any, path: Path, *, steps: int, epochs: float | None,
                world: int, best: dict[str, Any]) -> None:
    """Save the encoder in the foundation's format with the training facts in its metadata."""
    model = inner.model
    meta = model.metadata
    meta["training"] = {
        "strategy": inner.strategy, "objective": inner.config_dict(), "base_loss": config.loss.name,
        "data": {"source": config.data.source, "split": config.data.split,
                 **({"name": data.name, "kind": data.kind, "rows": len(data)} if data is not None else {})},
        "steps": steps, "epochs": epochs, "batch_size": config.train.batch_size,
        "grad_accumulation": config.train.grad_accumulation, "lr": config.train.lr, "seed": config.train.seed,
        "mixed_precision": config.train.mixed_precision, "processes": world, "best_dev": best,
    }
    if model.exit_head_layers:
        meta["training"].update({"exit_heads": model.exit_head_kind, "head_lr": config.train.head_lr or
                                 config.train.lr})
    meta["trained_layers"], meta["trained_dims"] = list(inner.trained_layers), list(inner.trained_dims)
    terms = [name for name in ("cross", "align", "score_kd") if getattr(inner, f"{name}_weight") > 0]
    if terms:  # the shallow exits were trained into the full exit's space: an index at N serves them
        meta["document_space"] = {"document_exit": model.num_layers, "trained_by": terms,
                                  "query_exits": [n for n in inner.trained_layers if n < model.num_layers]}
    model.save(path, overwrite=True)
