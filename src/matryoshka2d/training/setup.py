"""Everything :func:`matryoshka2d.training.loop.train` sets up before its first step.

Checking the run folder (and what ``--resume`` may change), loading the model, training data and dev set,
building the objective and the exit heads, the optimizer with its param groups and lr schedule, and the
``Accelerator``. Every input check runs here, before anything is written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka2d.training import checkpoint as ckpt
from matryoshka2d.training.config import (
    RESUMABLE_CHANGES,
    Config,
    check_against_model,
    config_differences,
    load_config,
)
from matryoshka2d.vocab import install_hint

logger = logging.getLogger("matryoshka2d.training.loop")  # the name these messages had before the split

CONFIG_FILE = "config.resolved.toml"


def check_run_dir(config: Config, *, resume: bool, overwrite: bool) -> Path | None:
    """Check the run folder before anything is loaded; return the checkpoint to resume from.

    Raises:
        FileExistsError: the folder exists and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: ``resume`` without a checkpoint.
        ValueError: ``resume`` with a config that differs from the run's, or both flags set.
    """
    run_dir = Path(config.run.output_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run, overwrite "
                         "deletes it; pass one")
    if resume:
        latest = ckpt.latest_checkpoint(run_dir)
        saved = load_config(run_dir / CONFIG_FILE)
        diff = config_differences(saved, config)
        if diff:
            raise ValueError(f"cannot resume {run_dir}: the config differs from its {CONFIG_FILE} in "
                             f"{'; '.join(diff)}; resume with the run's config or start a new --output-dir")
        budget = [(k, getattr(saved.train, k), getattr(config.train, k)) for k in ("max_steps", "epochs")]
        for key, old, new in budget:
            if old != new:
                logger.warning("resuming with train.%s = %s instead of the run's %s: the lr schedule is "
                               "recomputed for the new number of steps", key, new, old)
        return latest
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise FileExistsError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                                  f"--overwrite to replace it, or choose another --output-dir")
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileExistsError(f"{run_dir} is not a matryoshka2d run folder (no {CONFIG_FILE}); refusing "
                                  f"to delete it with --overwrite; choose another --output-dir")
    return None


def check_finished_run(config: Config) -> None:
    """Check that the finished run in ``config.run.output_dir`` was trained with ``config``'s settings, before it
    is reused in its place (a study does): every field counts but where and how often it saved and logged, and,
    unlike :func:`check_run_dir`'s resume, the training budget counts too. A folder without
    ``config.resolved.toml`` is not checked.

    Raises:
        ValueError: naming the fields that differ and the fix.
    """
    run_dir = Path(config.run.output_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        return
    ignore = RESUMABLE_CHANGES - {"train.max_steps", "train.epochs"}
    diff = config_differences(load_config(run_dir / CONFIG_FILE), config, ignore=ignore)
    if diff:
        raise ValueError(f"{run_dir / 'final'} was trained with other settings than the study asks for now: "
                         f"{'; '.join(diff)}; restore the study's settings, or delete {run_dir} to retrain it")


def load_unlabelled(config: Config) -> list[str]:
    """The texts of ``data.unlabelled`` (blank and repeated ones dropped), shuffled by ``train.seed``; empty when
    it is unset. Steps take them in this order, cycling, so a resumed run sees the same texts.

    Raises:
        ValueError / FileNotFoundError: a missing or empty file, or unlabelled texts without an alignment term.
    """
    d, o = config.data, config.objective
    if not d.unlabelled:
        return []
    if o.align_weight <= 0:
        raise ValueError(f"data.unlabelled = {d.unlabelled} adds texts that only embedding alignment uses, but "
                         "objective.align_weight is 0; set objective.align_weight > 0 (e.g. 1.0) or drop "
                         "data.unlabelled")
    from matryoshka2d.data.datasets import read_sentences
    from matryoshka2d.training.align import unlabelled_texts

    texts = unlabelled_texts([t for path in d.unlabelled for t in read_sentences(path, data_dir=d.data_dir)])[0]
    order = np.random.default_rng(config.train.seed).permutation(len(texts))
    return [texts[i] for i in order]


def build(config: Config, *, world_size: int = 1) -> tuple[Any, Any, dict[str, Any], Any]:
    """Load the model, data and dev set and build the objective; every input check runs here.

    Returns:
        ``(model, training data, {dev name: ScoredPairs}, objective)``.

    Raises:
        ValueError / FileNotFoundError: any bad input, before training starts.
    """
    from matryoshka2d.data.datasets import load_sts, load_training_data
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.losses.base import build_base_loss
    from matryoshka2d.losses.objective import TwoDMatryoshkaLoss

    m, d, o, t = config.model, config.data, config.objective, config.train
    if t.batch_size % world_size:
        fit = world_size * max(1, t.batch_size // world_size)
        raise ValueError(f"train.batch_size = {t.batch_size} must be divisible by the {world_size} processes "
                         f"(it is the global batch); use e.g. {fit}")
    model = MatryoshkaEncoder.from_pretrained(m.name, m.pooling,  # type: ignore[arg-type]  # validated
                                              max_seq_length=m.max_seq_length)
    if o.strategy == "separate":
        if o.separate_layers >= model.num_layers:  # type: ignore[operator]
            raise ValueError(f"objective.separate_layers = {o.separate_layers} must be in "
                             f"1..{model.num_layers - 1} (the model has {model.num_layers} layers); use "
                             f"strategy 'full' for the whole model")
        model = model.truncate(o.separate_layers)  # type: ignore[arg-type]
    check_against_model(config, model.num_layers, model.hidden_size)
    from matryoshka2d.data.beir import is_beir_source, load_beir_pairs

    if is_beir_source(d.source, d.data_dir):  # a BEIR set's qrels: (query, relevant document) pairs
        if d.kind not in (None, "pairs") or d.columns is not None:
            raise ValueError(f"data.source = {d.source!r} is a BEIR set: it gives (query, document) pairs, so "
                             f"data.kind must be 'pairs' (or unset) and data.columns unset")
        data = load_beir_pairs(d.source, d.split, data_dir=d.data_dir, limit=d.limit)
    else:
        data = load_training_data(d.source, kind=d.kind, columns=d.columns, split=d.split, data_dir=d.data_dir,
                                  limit=d.limit)
    if len(data) < t.batch_size:
        raise ValueError(f"train.batch_size = {t.batch_size} is larger than the {len(data)} training rows of "
                         f"{data.name!r}; lower it to at most {len(data)}")
    base = build_base_loss(config.loss.name, **config.loss.options)
    _check_loss_fits(base, data, t.batch_size)
    objective = TwoDMatryoshkaLoss(model, base, o, seed=t.seed if o.seed is None else o.seed)
    _add_exit_heads(model, objective, m.exit_heads, o.strategy, last=m.head_on_last)
    if t.head_lr is not None and not model.exit_head_layers:
        logger.warning("train.head_lr = %g is unused: the model has no exit heads (model.exit_heads = %r, "
                       "strategy %r)", t.head_lr, m.exit_heads, o.strategy)
    dev = {}
    if config.run.eval_every > 0:
        pairs = load_sts(d.dev_set, d.dev_split, data_dir=d.data_dir)
        dev[pairs.name] = pairs
    if m.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, data, dev, objective


def require_accelerate() -> None:
    """Raises: ImportError naming the ``train`` extra when accelerate (not needed for inference) is missing."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ImportError(f"training needs accelerate: {install_hint('train')}") from None


def make_accelerator(mixed_precision: str) -> Any:
    """An ``Accelerator``; processes come from the launcher's environment (torchrun / accelerate launch).

    Raises:
        ValueError: fp16 without a CUDA GPU.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision = 'fp16' needs a CUDA GPU and none is visible; use 'no' or "
                         "'bf16'")
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()  # an earlier run in this process (notebook, tests) used another one
    # cpu=True on a machine without CUDA: accelerate only sets up gloo DDP under torchrun when told so
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _check_loss_fits(base: Any, data: Any, batch_size: int) -> None:
    """Run the base loss once on random embeddings shaped like a batch, so it rejects unfit data now."""
    if batch_size < 2 and (base.name == "ibn" or getattr(base, "w_ibn", 0) > 0) and data.scores is None:
        raise ValueError(f"train.batch_size = {batch_size} leaves in-batch negatives ({base.name!r}) with no "
                         "negative to contrast; use a batch size >= 2 (e.g. 32)")
    gen = torch.Generator().manual_seed(0)
    rows = max(2, batch_size)
    emb = [torch.randn(rows, 8, generator=gen) for _ in data.columns]
    labels = torch.arange(rows, dtype=torch.float32) if data.scores is not None else None
    with torch.no_grad():
        base(emb, labels)


def _add_exit_heads(model: Any, objective: Any, kind: str, strategy: str, *, last: bool = False) -> None:
    """Give the shallow exits the objective trains a head of ``kind`` (``"none"``: add nothing), and the last
    exit one too if ``last``.

    Heads go only where a gradient reaches them: without ``last`` the last exit stays the plain backbone
    output, and ``full``, ``mrl`` and ``separate`` (which train only the last exit) get none.
    """
    if kind == "none":
        return
    layers = [n for n in objective.trained_layers if n < model.num_layers or last]
    if not layers:
        logger.warning("model.exit_heads = %r adds no head: strategy %r trains only the last exit, which "
                       "never has one", kind, strategy)
        return
    added = model.add_exit_heads(kind, layers=layers)  # type: ignore[arg-type]  # validated by the config
    logger.info("added %s exit heads on layers %s", kind, added)


def make_optimizer(objective: torch.nn.Module, config: Config, total: int) -> tuple[Any, Any]:
    """AdamW with param groups: backbone weights (decayed), biases and LayerNorms (not decayed), and, when
    the model has exit heads, the heads at ``train.head_lr`` without decay (decay would pull them toward zero,
    not toward their identity start); then a linear warm-up and decay of every group's lr.

    With ``train.layer_lr_decay = g < 1`` block n of N learns at ``lr * g**(N - n)`` and the weights outside
    the blocks (the embeddings) at ``lr * g**N``: one decayed and one undecayed group per depth, after the
    groups at the full lr. Every group has a ``name`` (``backbone``, ``backbone-no-decay``, ``heads``,
    ``block-n``...) so the loop logs the right ones."""
    from transformers import get_linear_schedule_with_warmup

    from matryoshka2d.encoder.architectures import get_blocks

    t = config.train
    model: Any = objective.model
    head_ids = {id(p) for p in model.exit_heads.parameters()}
    params = [p for p in objective.parameters() if p.requires_grad]
    depth = {id(p): 0 for p in model.backbone.parameters()}  # outside the blocks: below block 1
    for n, block in enumerate(get_blocks(model.backbone), start=1):
        depth.update({id(p): n for p in block.parameters()})
    n_last = model.num_layers

    def steps_down(p: torch.nn.Parameter) -> int:  # how many layers below the top: 0 keeps the full lr
        return 0 if t.layer_lr_decay == 1.0 or id(p) not in depth else n_last - depth[id(p)]

    body = [p for p in params if id(p) not in head_ids]
    groups: list[dict[str, Any]] = []
    for k in sorted({steps_down(p) for p in body}):
        label = "backbone" if k == 0 else ("embeddings" if k == n_last else f"block-{n_last - k}")
        scale = {} if k == 0 else {"lr": t.lr * t.layer_lr_decay ** k}
        groups.append({"name": label, "params": [p for p in body if steps_down(p) == k and p.ndim >= 2],
                       "weight_decay": t.weight_decay, **scale})
        groups.append({"name": f"{label}-no-decay", "weight_decay": 0.0, **scale,  # biases, LayerNorm
                       "params": [p for p in body if steps_down(p) == k and p.ndim < 2]})
    head_params = [p for p in params if id(p) in head_ids]
    if head_params:
        groups.append({"name": "heads", "params": head_params, "weight_decay": 0.0, "lr": t.head_lr or t.lr})
    groups = [g for g in groups if g["params"] or g["name"].startswith("backbone")]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total)
    return optimizer, get_linear_schedule_with_warmup(optimizer, min(warmup, total), total)
