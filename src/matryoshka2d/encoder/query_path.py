"""Query exits with parameters of their own: the post-hoc path from a shallow exit into the full exit's space.

A search index holds documents encoded once, at the document exit (usually the full depth N). A query encoded
at a shallow exit ``n`` only retrieves well from that index if exit ``n`` lives in the same space. When the
shared exits cannot be changed (an index already exists), each query exit gets parameters that the document
exit never uses (method.md section 8):

* a **query head**: a square ``D x D`` map (identity-initialised) applied after the exit's own output;
* optionally **low-rank adapters** (LoRA) on the linear layers of blocks ``1..n``, specific to exit ``n``:
  ``W + (alpha / r) * B @ A``, ``B`` zero-initialised. They are applied by passing merged weights to
  :func:`torch.func.functional_call`, so the backbone's own modules and weights are never changed and the
  document path (and the full exit) stays bit-identical.

A query at exit ``n`` is then ``head_n(exit_n(x; W + delta_n))``. The model runs this path only when asked
for ``input_type="query"`` at an exit the path covers; documents (and the default) take the shared path.

A folder stores the path in ``query_exits.safetensors`` (tensors ``"{n}.head.weight"``, ``"{n}.head.bias"``,
``"{n}.lora.{param}.A"``, ``"{n}.lora.{param}.B"``) and describes it in ``matryoshka2d.json`` under
``"query_exits"`` (see :meth:`QueryPath.entry`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from matryoshka2d.encoder import architectures, heads

DEFAULT_RANK = 16


def _key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (dots are not allowed there)."""
    return name.replace(".", "__")


def lora_targets(backbone: nn.Module, layer: int) -> list[str]:
    """Names of the weight matrices of every ``nn.Linear`` in blocks ``1..layer`` (what LoRA adapts)."""
    path = architectures.layout_for(backbone.config.model_type).blocks_path
    names = []
    for i, block in enumerate(list(architectures.get_blocks(backbone))[:layer]):
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear):
                names.append(f"{path}.{i}.{sub}.weight")
    return names


class QueryExit(nn.Module):
    """The own parameters of one query exit: a head and, with ``rank > 0``, LoRA factors per target weight."""

    def __init__(self, backbone: nn.Module, layer: int, hidden_size: int, *, rank: int, alpha: float) -> None:
        super().__init__()
        self.layer, self.rank, self.alpha = int(layer), int(rank), float(alpha)
        self.head = heads.build_head("linear", hidden_size)
        self.targets = lora_targets(backbone, layer) if rank > 0 else []
        params = dict(backbone.named_parameters())
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for name in self.targets:
            out_f, in_f = params[name].shape
            a = torch.empty(rank, in_f, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_a[_key(name)] = nn.Parameter(a)
            self.lora_b[_key(name)] = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def merged_weights(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """``{name: W + scale * B @ A}`` for every adapted weight (empty without LoRA)."""
        params = dict(backbone.named_parameters())
        out = {}
        for name in self.targets:
            base = params[name]
            delta = self.lora_b[_key(name)] @ self.lora_a[_key(name)]
            out[name] = base + (self.scale * delta).to(base.dtype)
        return out

    def num_parameters(self) -> dict[str, int]:
        """Parameters of the head and of the adapters."""
        return {"head": sum(p.numel() for p in self.head.parameters()),
                "lora": sum(p.numel() for p in [*self.lora_a.values(), *self.lora_b.values()])}


class QueryPath(nn.Module):
    """Every query exit of a model, aligned to its document exit.

    Args:
        backbone: the model's backbone (read for LoRA target names and shapes; never modified).
        layers: the query exits, each below ``document_exit``.
        document_exit: the exit whose space the query exits are aligned to (the index's exit).
        hidden_size: D.
        rank: LoRA rank (0: heads only).
        alpha: LoRA scale numerator (the delta is ``alpha / rank * B @ A``).
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[int], *, document_exit: int, hidden_size: int,
                 rank: int = 0, alpha: float | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank {rank!r} must be an integer >= 0 (0: query heads only); pass e.g. 16")
        self.document_exit, self.rank = int(document_exit), int(rank)
        self.alpha = float(alpha if alpha is not None else rank or 1)
        self.exits = nn.ModuleDict({str(n): QueryExit(backbone, n, hidden_size, rank=rank, alpha=self.alpha)
                                    for n in sorted(set(layers))})

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.exits)

    def entry(self) -> dict[str, Any]:
        """The ``query_exits`` entry of ``matryoshka2d.json``."""
        return {"layers": self.layers, "document_exit": self.document_exit, "rank": self.rank,
                "alpha": self.alpha, "head": "linear"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as a folder stores them (CPU, contiguous)."""
        out: dict[str, torch.Tensor] = {}
        for key, ex in self.exits.items():
            out[f"{key}.head.weight"] = ex.head.weight.detach().cpu().contiguous()
            out[f"{key}.head.bias"] = ex.head.bias.detach().cpu().contiguous()
            for name in ex.targets:
                out[f"{key}.lora.{name}.A"] = ex.lora_a[_key(name)].detach().cpu().contiguous()
                out[f"{key}.lora.{name}.B"] = ex.lora_b[_key(name)].detach().cpu().contiguous()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str = "query_exits") -> None:
        """Load :meth:`state_tensors` output back (names and shapes must match exactly).

        Raises:
            ValueError: missing, extra or misshapen tensors.
        """
        expected = {k: tuple(v.shape) for k, v in self.state_tensors().items()}
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"{where}: the query exits' tensors do not match matryoshka2d.json "
                             f"(missing {missing[:3]}, unexpected {extra[:3]}); re-save the model")
        for k, shape in expected.items():
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}; "
                                 "the query exits belong to another model, re-save it")
        with torch.no_grad():
            for key, ex in self.exits.items():
                ex.head.weight.copy_(tensors[f"{key}.head.weight"])
                ex.head.bias.copy_(tensors[f"{key}.head.bias"])
                for name in ex.targets:
                    ex.lora_a[_key(name)].copy_(tensors[f"{key}.lora.{name}.A"])
                    ex.lora_b[_key(name)].copy_(tensors[f"{key}.lora.{name}.B"])

    def num_parameters(self) -> dict[int, dict[str, int]]:
        """Own parameters per query exit (head, lora)."""
        return {int(k): ex.num_parameters() for k, ex in self.exits.items()}

    def groups(self, layers: Iterable[int]) -> list[list[int]]:
        """The passes a set of query exits needs: heads-only exits share one pass, each LoRA exit has its own."""
        wanted = sorted(set(layers))
        if self.rank == 0:
            return [wanted] if wanted else []
        return [[n] for n in wanted]
