"""Post-hoc alignment of query exits to a deployed model's document exit, on unlabelled text (``m2d align``).

Nothing the document exit computes changes: the backbone and its exit heads are frozen, so the vectors of an
index built from the model stay valid bit for bit. Each query exit ``n`` is trained so that a text's exit
``(n, d)`` matches the same text's document-exit vector at width ``d`` (:func:`~matryoshka2d.losses.alignment.
embedding_alignment`, averaged over the Matryoshka widths). The teacher vectors are computed once, before
training. Methods (:data:`~matryoshka2d.vocab.ALIGN_METHODS`):

* ``head``: a query head per exit (``D x D``), on the exit's output, which is computed once for every text
  (the backbone is frozen), so training costs no backbone pass at all;
* ``lora``: a query head plus rank-``r`` adapters on every linear layer of blocks ``1..n``, specific to exit
  ``n`` (see :mod:`matryoshka2d.encoder.query_path`);
* ``separate``: the fair baseline, not a post-hoc method: a copy of the first ``n`` layers (plus a head on its
  last exit) fine-tuned as a whole on the same texts and loss, as Wang & Lyu train small query encoders.

Dropout is off for every method (the student runs as it will at inference).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka2d.encoder.batching import embed_layers
from matryoshka2d.encoder.model import MatryoshkaEncoder, matryoshka_dims
from matryoshka2d.encoder.query_path import DEFAULT_RANK
from matryoshka2d.encoder.tokenization import check_texts, tokenize_unpadded
from matryoshka2d.io.folder import model_fingerprint
from matryoshka2d.losses.alignment import embedding_alignment, mean_over_dims
from matryoshka2d.vocab import ALIGN_DISTANCES, ALIGN_METHODS, AlignDistance, AlignMethod, check_choice

logger = logging.getLogger(__name__)

# lora and separate: the best of their sweeps on the NFCorpus dev split (all-MiniLM-L6-v2, 41,908 unlabelled texts,
# research/query-exits/choose_lr.py: lora 3e-4 / 1e-3 / 3e-3 / 1e-2, separate 5e-5 / 2e-4 / 5e-4); head was not swept
DEFAULT_LR: dict[str, float] = {"head": 1e-3, "lora": 3e-3, "separate": 5e-4}
LENGTH_BUCKET = 50  # batches per bucket of similar-length texts (less padding, still shuffled)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_real(name: str, value: Any, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; pass e.g. {example}")
    return float(value)


@dataclass
class AlignConfig:
    """What :func:`align_query_exits` trains, with every default once.

    Attributes:
        exits: the query exits to align, each below ``document_exit``.
        method: ``head``, ``lora`` or ``separate`` (see the module docstring).
        rank: LoRA rank (``lora`` only).
        alpha: LoRA scale numerator (default: ``rank``).
        epochs: passes over the texts (a fraction is allowed: 0.5 = half the texts).
        lr: AdamW learning rate (``None``: :data:`DEFAULT_LR` of the method).
        batch_size: texts per step.
        max_seq_length: tokens per text while training (teacher and student see the same truncation).
        dims: the widths the loss averages over (``None``: the model's Matryoshka dims).
        distance: ``cosine`` (1 - cos) or ``mse`` (of the normalised vectors).
        warmup_ratio: share of the steps with a linear lr warm-up (then linear decay to 0).
        seed: shuffling and LoRA initialisation.
        document_exit: the index's exit (``None``: N).
    """

    exits: list[int]
    method: AlignMethod = "lora"
    rank: int = DEFAULT_RANK
    alpha: float | None = None
    epochs: float = 1.0
    lr: float | None = None
    batch_size: int = 64
    max_seq_length: int = 128
    dims: list[int] | None = None
    distance: AlignDistance = "cosine"
    warmup_ratio: float = 0.1
    seed: int = 0
    document_exit: int | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, ALIGN_METHODS)
        check_choice("distance", self.distance, ALIGN_DISTANCES)
        if isinstance(self.exits, (str, bytes)) or not isinstance(self.exits, Sequence) or not self.exits:
            raise ValueError(f"exits must be a non-empty list of layers, got {self.exits!r}; pass e.g. [1, 2, 3]")
        self.exits = sorted({_positive_int("each exit", n) for n in self.exits})
        self.rank = _positive_int("rank", self.rank)
        self.epochs = _positive_real("epochs", self.epochs, "1")
        if self.lr is not None:
            self.lr = _positive_real("lr", self.lr, "1e-3")
        self.batch_size = _positive_int("batch_size", self.batch_size)
        self.max_seq_length = _positive_int("max_seq_length", self.max_seq_length)
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}; pass e.g. 0.1")
        if self.dims is not None:
            self.dims = sorted({_positive_int("each dim", d) for d in self.dims})

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class AlignResult:
    """What :func:`align_query_exits` returns.

    Attributes:
        model: the input model, now with a query path (``head`` / ``lora``); unchanged for ``separate``.
        separate: ``{n: a standalone n-layer model}`` (``separate`` only).
        stats: texts, steps, seconds, the loss per epoch, own parameters per exit.
    """

    model: MatryoshkaEncoder
    separate: dict[int, MatryoshkaEncoder] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def unlabelled_texts(texts: Sequence[str]) -> tuple[list[str], int]:
    """The texts to align on: checked like every encoder input, blank and repeated ones dropped (in order).

    Returns:
        ``(texts, dropped)``.

    Raises:
        ValueError: a text that is not a string, or nothing left.
    """
    items = check_texts(texts)
    kept = list(dict.fromkeys(t for t in items if t.strip()))
    if not kept:
        raise ValueError(f"no text to align on: all {len(items)} texts are blank; pass files with one text per line")
    return kept, len(items) - len(kept)


def align_query_exits(model: MatryoshkaEncoder, texts: Sequence[str], config: AlignConfig, *,
                      vectors: dict[int, np.ndarray] | None = None,
                      show_progress_bar: bool | None = None) -> AlignResult:
    """Train query exits of ``model`` into its document exit's space on ``texts`` (no labels).

    Args:
        model: the deployed model; its backbone and exit heads are not changed.
        texts: unlabelled texts (queries, documents, sentences).
        config: what to train.
        vectors: the pooled shared-path vectors of :func:`unlabelled_texts` ``(texts)`` at the document exit (and,
            for ``head``, at every query exit), at ``config.max_seq_length`` tokens, as :func:`teacher_vectors`
            returns them: reuse them across runs on the same texts instead of encoding the texts again.
        show_progress_bar: ``None`` shows one when logging is at INFO.

    Returns:
        The aligned model (``head`` / ``lora``) or the separate query encoders (``separate``), and the stats.

    Raises:
        ValueError: an exit out of range or not below the document exit, a dim out of range, no texts, or a
            model that already has query exits.
    """
    items, dropped = unlabelled_texts(texts)
    doc, exits, dims = _checked_exits(model, config)
    if show_progress_bar is None:
        show_progress_bar = logger.isEnabledFor(logging.INFO)
    started = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = sorted({doc, *exits}) if config.method == "head" else [doc]
    if vectors is None:
        vectors = teacher_vectors(model, items, wanted, config.max_seq_length, show_progress_bar=show_progress_bar)
    elif any(n not in vectors or len(vectors[n]) != len(items) for n in wanted):
        raise ValueError(f"vectors must hold {len(items)} rows at layers {wanted} (the unlabelled texts' pooled "
                         f"vectors), got layers { {n: len(v) for n, v in vectors.items()} }; pass vectors=None")
    tokens = tokenize_unpadded(model.tokenizer, items, min(config.max_seq_length, model.max_seq_length))
    teacher_s = time.perf_counter() - started
    result = AlignResult(model)
    step, params = _student(model, config, exits, doc, result, tokens,
                            {n: torch.from_numpy(v) for n, v in vectors.items() if n in wanted}, dims)
    order = _batches(tokens.input_ids, config.batch_size, config.epochs, config.seed)
    losses = _optimise(step, params, order, config, f"align {config.method} {exits}", show_progress_bar)
    losses = [loss / len(exits) for loss in losses]
    window = max(1, min(20, len(losses) // 4))  # the loss at the start and at the end, over this many steps
    if config.method != "separate":
        # the document path is the source model's, bit for bit: an index built from that model stays valid
        model.metadata["document_fingerprint"] = (model.metadata.get("document_fingerprint")
                                                  or model_fingerprint(model.metadata.get("source")))
        model.metadata["aligned"] = {
            "method": config.method, "texts": len(items), "steps": len(order), "epochs": config.epochs,
            "lr": config.learning_rate, "batch_size": config.batch_size, "max_seq_length": config.max_seq_length,
            "dims": dims, "distance": config.distance, "seed": config.seed}
    result.stats = {
        "method": config.method, "exits": exits, "document_exit": doc, "texts": len(items), "dropped_texts": dropped,
        "steps": len(order), "teacher_s": round(teacher_s, 2), "seconds": round(time.perf_counter() - started, 2),
        "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
        "parameters": ({n: sum(p.numel() for p in s.parameters()) for n, s in result.separate.items()}
                       if config.method == "separate" else model.query_path.num_parameters()),  # type: ignore[union-attr]
    }
    logger.info("aligned query exits %s (%s) on %d texts in %d steps, %.0fs: loss %.4f -> %.4f", exits,
                config.method, len(items), len(order), result.stats["seconds"], result.stats["loss_first"],
                result.stats["loss_last"])
    return result


def _checked_exits(model: MatryoshkaEncoder, config: AlignConfig) -> tuple[int, list[int], list[int]]:
    """``(document exit, query exits, dims)`` of ``config`` checked against ``model``.

    Raises:
        ValueError: an exit out of range or not below the document exit, a dim out of range, or a model that
            already has query exits (``head`` / ``lora``).
    """
    doc = model.check_layer(config.document_exit if config.document_exit is not None else model.num_layers)
    exits = [model.check_layer(n) for n in config.exits]
    if exits[-1] >= doc:
        raise ValueError(f"query exits {exits} must lie below the document exit {doc}; pass exits in 1..{doc - 1}")
    if model.query_path is not None and config.method != "separate":
        raise ValueError(f"this model already has query exits {model.query_path.layers}; align the original model")
    dims = [model.check_dim(d) for d in config.dims] if config.dims else matryoshka_dims(model.hidden_size)
    return doc, exits, dims


def _student(model: MatryoshkaEncoder, config: AlignConfig, exits: list[int], doc: int, result: AlignResult,
             tokens: Any, vectors: dict[int, torch.Tensor], dims: list[int]
             ) -> tuple[Callable[[np.ndarray], torch.Tensor], list[torch.nn.Parameter]]:
    """What is trained, and the loss of one batch of rows: the separate encoders (put in ``result.separate``),
    or the query path added to ``model`` (heads on the cached exit vectors, or heads + LoRA on the texts)."""
    device, teacher = model.device, vectors[doc]

    def features(rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(device) for k, v in tokens.collate(rows).items()}

    def loss_of(student: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return mean_over_dims(embedding_alignment, dims, student, teacher[rows].to(student.device),
                              distance=config.distance)

    if config.method == "separate":
        for n in exits:
            sub = model.truncate(n)
            sub.add_exit_heads("linear", layers=[n])  # kept as it is when the exit already has one
            result.separate[n] = sub.eval()
        students = result.separate

        def separate(rows: np.ndarray) -> torch.Tensor:
            f = features(rows)
            return torch.stack([loss_of(students[n](f, [n])[n], rows) for n in exits]).sum()

        return separate, [p for sub in students.values() for p in sub.parameters()]
    path = model.add_query_path(exits, rank=config.rank if config.method == "lora" else 0, alpha=config.alpha,
                                document_exit=doc)
    path.eval()

    def head(rows: np.ndarray) -> torch.Tensor:
        return torch.stack([loss_of(path.exits[str(n)].head(vectors[n][rows].to(device)), rows)
                            for n in exits]).sum()

    def lora(rows: np.ndarray) -> torch.Tensor:
        out = model(features(rows), exits, input_type="query")
        return torch.stack([loss_of(out[n], rows) for n in exits]).sum()

    return (head if config.method == "head" else lora), list(path.parameters())


def _optimise(step: Callable[[np.ndarray], torch.Tensor], params: list[torch.nn.Parameter],
              order: list[np.ndarray], config: AlignConfig, label: str, show_progress_bar: bool) -> list[float]:
    """AdamW over ``params`` (linear warm-up, then linear decay), one ``step(rows)`` loss per batch of ``order``;
    the losses. ``params`` train only here."""
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = int(config.warmup_ratio * len(order))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (len(order) - s) / max(len(order) - warmup, 1))))
    losses: list[float] = []
    with tqdm(order, desc=label, unit="step", disable=not show_progress_bar) as bar:
        for i, rows in enumerate(bar):
            loss = step(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if i % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    for p in params:
        p.requires_grad_(False)
    return losses


def teacher_vectors(model: MatryoshkaEncoder, texts: Sequence[str], layers: Sequence[int], max_seq_length: int, *,
                    show_progress_bar: bool | None = None) -> dict[int, np.ndarray]:
    """Pooled shared-path vectors of ``texts`` at ``layers``, each text cut to ``max_seq_length`` tokens."""
    saved = model.max_seq_length
    model.max_seq_length = min(max_seq_length, saved)
    try:
        return embed_layers(model, texts, layers, batch_size=64, show_progress_bar=show_progress_bar,
                            desc="teacher vectors")
    finally:
        model.max_seq_length = saved


def _batches(token_ids: Sequence[Sequence[int]], batch_size: int, epochs: float, seed: int) -> list[np.ndarray]:
    """Shuffled batches of row indices, texts of similar length together (within buckets), for ``epochs``."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(t) for t in token_ids])
    total = max(1, int(round(epochs * len(lengths))))
    rows = np.concatenate([rng.permutation(len(lengths)) for _ in range(math.ceil(total / len(lengths)))])[:total]
    out: list[np.ndarray] = []
    bucket = batch_size * LENGTH_BUCKET
    for start in range(0, len(rows), bucket):
        chunk = rows[start:start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [out[i] for i in rng.permutation(len(out))]
