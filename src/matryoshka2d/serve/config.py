"""The server's limits and options, checked once at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
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
        dtype: torch's ``fp32``, ``bf16`` or ``fp16`` (fp16: on a GPU); what ``/info`` reports.
        backend: ``torch``, ``onnx`` or ``openvino`` (one exported graph per exit; torch's dtype fp32 only, the
            OpenVINO precision is its own option); what ``/info`` reports.
        trim_interval_s: the fewest seconds between two hand-backs of the free C heap to the OS after a
            batch, which keeps resident memory flat over a long run; ``0`` turns it off.
        header_timeout_s: a connection must send a request's headers within this many seconds of opening (or
            of its previous response), else it is closed (408 if it sent part of them).
        body_timeout_s: a request's body must arrive within this many seconds of its headers (else 408).
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        max_connections: open connections; beyond it the oldest connection that has no request in progress is
            closed (a half-open or idle one), or the new one gets 503 when every connection is busy. ``None``:
            what the process's file limit allows (:func:`~matryoshka2d.serve.http.connection_budget`).
        graceful_timeout_s: on SIGTERM, requests not answered within this many seconds get 503 and the
            process exits.
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
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int | None = None
    graceful_timeout_s: float = 30.0

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
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ValueError(f"{name} {value!r} is out of range (0, 3600] seconds; pass e.g. "
                                 f"{getattr(ServeConfig, name)}")
        if isinstance(self.graceful_timeout_s, bool) or not 0 <= self.graceful_timeout_s <= 3600:
            raise ValueError(f"graceful_timeout_s {self.graceful_timeout_s!r} is out of range 0..3600 seconds; pass "
                             "e.g. 30")
        if self.max_connections is not None and (isinstance(self.max_connections, bool)
                                                 or not isinstance(self.max_connections, int)
                                                 or self.max_connections < 1):
            raise ValueError(f"max_connections {self.max_connections!r} must be a positive integer; pass e.g. 256, "
                             "or leave it unset to follow the file limit")
        if self.dtype not in SERVE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; pass fp32, bf16 or fp16")
        if self.backend not in SERVE_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not supported; pass torch, onnx or openvino")
        if self.backend != "torch" and self.dtype != "fp32":
            raise ValueError(f"dtype {self.dtype!r} is torch only: the {self.backend} backend runs the exported "
                             "graphs (OpenVINO's precision is --precision); pass --dtype fp32 or --backend torch")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; pass a non-empty key or none")
        if not self.model_name:
            raise ValueError("model_name is empty; pass e.g. --served-model-name minilm")

    @property
    def abort_after_s(self) -> float:
        """Seconds after SIGTERM when requests not yet answered get 503: the graceful timeout less a margin
        (at most 1 s, at most half) for the answers, the batcher's stop and the exit, so the process ends within
        ``graceful_timeout_s``."""
        return self.graceful_timeout_s - min(1.0, self.graceful_timeout_s / 2)

    def limits(self) -> dict[str, Any]:
        """The limits as a JSON-ready dict (for ``/info``; the API key is never included)."""
        out = asdict(self)
        out.pop("api_key")
        out["api_key_required"] = self.api_key is not None
        for key in ("model_name", "dtype", "backend"):
            out.pop(key)
        return out


def default_model_name(metadata: dict[str, Any], argument: str) -> str:
    """The id a model is served under when none is given: the model's own name from its metadata (a trained
    run's or an export's source model, e.g. ``minilm``), else the last part of the folder it was loaded from.

    Args:
        metadata: the model's ``matryoshka2d.json`` facts (``MatryoshkaEncoder.metadata``).
        argument: the MODEL argument it was loaded from.
    """
    for value in (metadata.get("name"), metadata.get("source"), argument):
        if isinstance(value, str) and value.strip() and value != "unknown":
            name = Path(value.rstrip("/\\")).name or value
            if name:
                return name
    return "model"
