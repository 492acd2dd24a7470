"""What a benchmark times: its settings, and the dtypes the device can run natively."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from matryoshka2d.vocab import ATTENTIONS, BACKENDS, DTYPE_NAMES, PEERS, Attention

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


@dataclass
class BenchmarkSettings:
    """What to time. ``layers`` / ``dims`` ``None`` mean every layer / the full width; ``compile`` adds
    ``torch.compile``d copies of our models (impl ``matryoshka2d+compile``); ``attention`` is our models'
    attention kernel (``auto``: plain matmul attention for bf16/fp16 on CPU, where it beats SDPA on short
    sentences, the model's default otherwise). The peers always run their defaults. ``peer`` is a comma list
    of :data:`matryoshka2d.vocab.PEERS`; ``backends`` are ours (:data:`matryoshka2d.vocab.BACKENDS`: ``torch``
    runs every dtype, the others each exit exported to ONNX / OpenVINO).

    Raises:
        ValueError: a value out of range (named with the allowed range).
    """

    layers: list[int] | None = None
    dims: list[int] | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    peer: str | None = None
    backends: list[str] = field(default_factory=lambda: ["torch"])
    device: str = "cpu"
    allow_fallback: bool = False
    compile: bool = False
    attention: Attention = "auto"

    @property
    def peers(self) -> list[str]:
        """The peers of the comma list ``peer``, in order, each once."""
        return list(dict.fromkeys(p.strip() for p in (self.peer or "").split(",") if p.strip()))

    def __post_init__(self) -> None:
        for name, low in (("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value!r} must be an integer >= {low}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes {self.batch_sizes!r} must be positive integers, e.g. 32,128")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads {self.threads!r} must be >= 1 (or None for torch's default)")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {', '.join(ATTENTIONS)}")
        for name in self.peers:
            if name not in PEERS:
                raise ValueError(f"unknown peer {name!r}; valid peers: {', '.join(PEERS)}")
        for name in self.backends:
            if name not in BACKENDS:
                raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
        if not self.backends:
            raise ValueError("backends is empty; pass e.g. torch or torch,onnx,openvino")
        bad = [name for name in self.dtypes if name not in DTYPES] or ([] if self.dtypes else ["(none)"])
        if bad:
            raise ValueError(f"unknown dtype {bad[0]!r}; valid dtypes: {', '.join(DTYPES)}")


def cpu_info() -> dict[str, Any]:
    """CPU model name and the SIMD flags that decide fp32 / bf16 / fp16 speed."""
    model, flags = "unknown", []
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16")
    return {"model": model if model != "unknown" else platform.processor() or model,
            "flags": [f for f in wanted if f in flags], "count": os.cpu_count()}


def dtype_problem(name: str, device: str | torch.device) -> str | None:
    """Why ``device`` cannot run dtype ``name`` natively, or ``None`` if it can."""
    dev = torch.device(device)
    if name == "fp32" or dev.type not in ("cpu", "cuda"):
        return None
    if dev.type == "cuda":
        ok = name != "bf16" or torch.cuda.is_bf16_supported()
        return None if ok else f"{torch.cuda.get_device_name(dev)} has no bf16 support"
    native = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}[name]
    if set(cpu_info()["flags"]) & native:
        return None
    return (f"this CPU ({cpu_info()['model']}) has no {' or '.join(sorted(native))} instructions, so {name} "
            "would be emulated, slower than fp32")


def resolve_dtypes(settings: BenchmarkSettings) -> list[tuple[str, str]]:
    """``(requested, used)`` dtype names; one the device cannot run falls back to fp32 only if allowed.

    Raises:
        ValueError: a dtype the device cannot run, without ``allow_fallback``.
    """
    out: list[tuple[str, str]] = []
    for name in dict.fromkeys(settings.dtypes):
        problem = dtype_problem(name, settings.device)
        if problem and not settings.allow_fallback:
            raise ValueError(f"dtype {name} cannot run on {settings.device}: {problem}; pass --dtype fp32, "
                             "or --allow-fallback to measure fp32 in its place")
        if problem:
            logger.warning("dtype %s falls back to fp32: %s", name, problem)
        used = "fp32" if problem else name
        if all(used != u for _, u in out):
            out.append((name, used))
    return out
