"""The server's limits and options, checked once at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from matryoshka2d.vocab import SERVE_BACKENDS, SERVE_DTYPES


@dataclass(frozen=True)
class ServeConfig:
    """Limits of one server.

    Args:
        model_name: the id clients pass as ``model`` (and ``GET /v1/models`` lists).
        max_batch_tokens: padded tokens (rows x longest row) in one forward batch.
        max_batch_requests: inputs (rows) in one forward batch.
        batch_wait_ms: how long the batcher waits for more requests before running a batch that is not full.
        max_queue: inputs waiting in the queue; a request that would exceed it gets 429 at once.
        max_client_batch: inputs in one request (OpenAI allows 2048).
        max_body_bytes: the size limit of a request body (413 above it).
        truncate: cut texts longer than the model's token limit (else 400).
        api_key: when set, ``/v1/*`` and ``/info`` need ``Authorization: Bearer <api_key>``.
        dtype: ``fp32`` or ``bf16`` (what ``/info`` reports).
        backend: ``torch`` or ``onnx`` (one exported graph per exit; fp32 only); what ``/info`` reports.
        trim_interval_s: the fewest seconds between two hand-backs of the free C heap to the OS after a
            batch, which keeps resident memory flat over a long run; ``0`` turns it off.
    """

    model_name: str = "minilm"
    max_batch_tokens: int = 16384
    max_batch_requests: int = 256
    batch_wait_ms: float = 2.0
    max_queue: int = 4096
    max_client_batch: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    truncate: bool = True
    api_key: str | None = None
    dtype: str = "fp32"
    backend: str = "torch"
    trim_interval_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_requests", "max_queue", "max_client_batch", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive integer; pass e.g. "
                                 f"{getattr(ServeConfig, name)}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms {self.batch_wait_ms!r} is out of range 0..1000; pass e.g. 2")
        if isinstance(self.trim_interval_s, bool) or not 0 <= self.trim_interval_s <= 3600:
            raise ValueError(f"trim_interval_s {self.trim_interval_s!r} is out of range 0..3600 seconds; pass e.g. "
                             "2, or 0 to never trim")
        if self.dtype not in SERVE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; pass fp32 or bf16")
        if self.backend not in SERVE_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not supported; pass torch or onnx")
        if self.backend == "onnx" and self.dtype != "fp32":
            raise ValueError(f"dtype {self.dtype!r} is torch only: the onnx backend runs the fp32 graphs; pass "
                             "--dtype fp32 or --backend torch")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; pass a non-empty key or none")
        if not self.model_name:
            raise ValueError("model_name is empty; pass e.g. --served-model-name minilm")

    def limits(self) -> dict[str, Any]:
        """The limits as a JSON-ready dict (for ``/info``; the API key is never included)."""
        out = asdict(self)
        out.pop("api_key")
        out["api_key_required"] = self.api_key is not None
        for key in ("model_name", "dtype", "backend"):
            out.pop(key)
        return out
