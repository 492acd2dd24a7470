"""The dynamic batcher: requests queue, one thread forms token-budgeted, mixed-depth batches and runs them.

Every input of a request is a row (its token ids and its exit layer). The batcher thread takes rows first in,
first out, until the next row would push ``rows x longest row`` over ``max_batch_tokens`` or the batch holds
``max_batch_requests`` rows. When the queue holds less than a full batch it waits for more while rows keep
coming: until ``batch_wait_ms`` pass without a new request, and at most :data:`WAIT_CAP` times ``batch_wait_ms``
after the oldest row arrived. A burst (clients re-sending as a batch's answers go out) is thus gathered into one
batch instead of being split into small ones. When no request has met another in the server for
:data:`ALONE_SECONDS` (one client sending one request at a time), the batcher does not wait at all.

Rows of different layers share one batch and run through the runner (:mod:`~matryoshka2d.serve.runners`): on
torch, :func:`~matryoshka2d.encoder.mixed_depth.forward_mixed_depth`, where the shared blocks run once and each
row leaves after its exit block; on ONNX, one graph per exit. A request's rows may be spread over several
batches; its future resolves when the last one is done.

Rows of very different lengths are split into length-sorted sub-batches when that saves at least
:data:`SPLIT_SAVING` of the padded tokens (:func:`split_by_length`).

A batch that fails is re-run one request at a time, so only the request that fails gets the error.

On shutdown, when the graceful timeout is nearly spent, the server aborts the batcher (:meth:`Batcher.abort`):
every request not yet answered gets the error (a 503), its rows leave the queue and are never computed, and
the worker stops after the batch it is running.

After a batch, at most once per ``trim_interval`` seconds, the C heap's free pages go back to the OS
(:func:`~matryoshka2d.encoder.memory.release_free_memory`), so the server's resident memory does not creep up
as batches of every shape come and go (docs/serving.md, soak).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka2d.encoder.memory import release_free_memory
from matryoshka2d.encoder.tokenization import Tokenized
from matryoshka2d.serve.runners import TorchRunner

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder

logger = logging.getLogger(__name__)

WAIT_CAP = 8  # the longest wait for more rows, in multiples of batch_wait_ms
SPLIT_SAVING = 0.2  # split a batch by length when that cuts its padded tokens by at least this share
SPLIT_MIN_ROWS = 4  # ... and each part keeps at least this many rows
ALONE_SECONDS = 1.0  # no request met another for this long: run at once, waiting for company is pointless
TRIM_INTERVAL = 2.0  # seconds between two hand-backs of the free heap (m2d_heap_trim_seconds times them)


def split_by_length(lengths: list[int], *, saving: float = SPLIT_SAVING, min_rows: int = SPLIT_MIN_ROWS
                    ) -> list[np.ndarray]:
    """Row positions of the sub-batches to run: longest first, split where padding shrinks the most.

    A part is split in two (recursively) when ``rows x longest`` summed over the two parts is at most
    ``1 - saving`` of the part's own, and both keep ``min_rows`` rows.
    """
    order = np.argsort([-n for n in lengths], kind="stable")
    sizes = np.asarray(lengths)[order]

    def parts(lo: int, hi: int) -> list[np.ndarray]:
        whole = (hi - lo) * int(sizes[lo])
        best, cut = whole, None
        for k in range(lo + min_rows, hi - min_rows + 1):
            cost = (k - lo) * int(sizes[lo]) + (hi - k) * int(sizes[k])
            if cost < best:
                best, cut = cost, k
        if cut is None or best > (1 - saving) * whole:
            return [order[lo:hi]]
        return parts(lo, cut) + parts(cut, hi)

    return parts(0, len(lengths))


class QueueFullError(RuntimeError):
    """The queue cannot take the request's inputs now (the server answers 429)."""


class StoppedError(RuntimeError):
    """The batcher is shutting down and takes no new requests (the server answers 503)."""


@dataclass
class Job:
    """One request: its rows (token ids, special tokens included), its route, and where results go."""

    rows: list[list[int]]
    route: int  # the exit layer n (the shared path), or -n (exit n's own query path; see serve.runners)
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    out: np.ndarray | None = None
    taken: int = 0  # rows handed to a batch
    done: int = 0  # rows computed
    failed: bool = False

    def resolve(self, value: np.ndarray | BaseException) -> None:
        """Complete the future from any thread (ignored if the client has gone)."""

        def _set() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(_set)


@dataclass
class BatchStats:
    """What one batch was (passed to the ``on_batch`` callback, e.g. for metrics)."""

    rows: int
    tokens: int  # padded: rows x longest row
    real_tokens: int
    layers: dict[int, int]
    queue_seconds: list[float]
    inference_seconds: float


class Batcher:
    """Queue + one worker thread that owns the model.

    Args:
        model: the encoder, in eval mode; only the worker thread uses it.
        max_batch_tokens: padded tokens per batch.
        max_batch_requests: rows per batch.
        batch_wait_ms: the longest wait for more rows before running a batch that is not full.
        max_queue: rows that may wait; :meth:`submit` raises :class:`QueueFullError` beyond.
        on_batch: called (in the worker thread) with the :class:`BatchStats` of each batch.
        threads: torch intra-op threads of the worker (``None``: leave torch's setting).
        trim_interval: the fewest seconds between two hand-backs of the free C heap after a batch
            (``None``: never).
        on_trim: called (in the worker thread) with the seconds each hand-back took.
        runner: what runs a batch (:mod:`~matryoshka2d.serve.runners`; ``None``: ``TorchRunner(model, threads)``).
    """

    def __init__(self, model: MatryoshkaEncoder, *, max_batch_tokens: int, max_batch_requests: int,
                 batch_wait_ms: float, max_queue: int, on_batch: Callable[[BatchStats], None] | None = None,
                 threads: int | None = None, trim_interval: float | None = TRIM_INTERVAL,
                 on_trim: Callable[[float], None] | None = None, runner: Any = None) -> None:
        self.model = model
        self.runner = runner if runner is not None else TorchRunner(model, threads=threads)
        self.max_batch_tokens, self.max_batch_requests = max_batch_tokens, max_batch_requests
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.trim_interval, self.on_trim = trim_interval, on_trim
        self.trims = 0
        self._last_trim = time.perf_counter()
        tokenizer = model.tokenizer
        self._pad = (tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right") == "left")
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued_rows = 0
        self._last_arrival = 0.0
        self._last_company = 0.0  # when a request last arrived while others were queued or running
        self._busy = False
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []  # the jobs of the batch being run
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ public
    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch."""
        return self._queued_rows

    @property
    def running(self) -> bool:
        """Whether the worker runs and new requests are taken."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="m2d-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued row, then stop the worker (new submissions are refused meanwhile)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def abort(self, error: BaseException) -> int:
        """Answer every request not yet answered with ``error``, drop its queued rows, and stop the worker after
        the batch it is running (whose results are dropped).

        Returns:
            How many requests got ``error``.
        """
        with self._cond:
            self._stopping = True
            jobs = [*self._running, *self._jobs]
            self._jobs.clear()
            self._queued_rows = 0
            self._cond.notify_all()
        answered = 0
        for job in jobs:
            if not job.failed and job.done < len(job.rows):
                job.failed = True
                job.resolve(error)
                answered += 1
        return answered

    def submit(self, rows: list[list[int]], route: int) -> asyncio.Future[np.ndarray]:
        """Queue a request's rows (call from the event loop); the future gets the ``(rows, D)`` float32 vectors.

        ``route`` is the exit layer ``n`` (the shared path) or ``-n`` (exit ``n``'s own query path,
        :func:`~matryoshka2d.serve.request.query_route`).

        Raises:
            QueueFullError: the queue would hold more than ``max_queue`` rows.
            StoppedError: the batcher is stopping.
        """
        loop = asyncio.get_running_loop()
        job = Job(rows=rows, route=route, future=loop.create_future(), loop=loop)
        with self._cond:
            if self._stopping:
                raise StoppedError("the server is shutting down and takes no new requests; retry on another replica")
            if self._queued_rows + len(rows) > self.max_queue:
                raise QueueFullError(
                    f"the queue holds {self._queued_rows} inputs and this request adds {len(rows)}, over the "
                    f"limit of {self.max_queue}; retry later or send fewer inputs per request")
            if self._jobs or self._busy:
                self._last_company = job.enqueued
            self._jobs.append(job)
            self._last_arrival = job.enqueued
            self._queued_rows += len(rows)
            self._cond.notify()
        return job.future

    # ------------------------------------------------------------------------------------ worker
    def _take(self) -> list[tuple[Job, int, int]] | None:
        """Wait for rows and take one batch: ``[(job, first row, end row), ...]``; ``None`` to stop."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            cap = self._jobs[0].enqueued + WAIT_CAP * self.batch_wait
            alone = time.perf_counter() - self._last_company > ALONE_SECONDS
            while not alone and not self._stopping and not self._full():
                left = min(self._last_arrival + self.batch_wait, cap) - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            parts: list[tuple[Job, int, int]] = []
            count, longest = 0, 0
            while self._jobs and count < self.max_batch_requests:
                job = self._jobs[0]
                start = end = job.taken
                while end < len(job.rows) and count < self.max_batch_requests:
                    width = max(longest, len(job.rows[end]))
                    if count and (count + 1) * width > self.max_batch_tokens:
                        break
                    longest, count, end = width, count + 1, end + 1
                if end > start:
                    parts.append((job, start, end))
                    job.taken = end
                    self._queued_rows -= end - start
                if job.taken == len(job.rows):
                    self._jobs.popleft()
                if end < len(job.rows):
                    break  # budget reached inside this job
            self._busy = True
            self._running = [job for job, _, _ in parts]
            return parts

    def _full(self) -> bool:
        """Whether the queue already holds a full batch (then there is no point in waiting)."""
        rows, longest = 0, 0
        for job in self._jobs:
            for ids in job.rows[job.taken:]:
                longest = max(longest, len(ids))
                rows += 1
                if rows >= self.max_batch_requests or rows * longest >= self.max_batch_tokens:
                    return True
        return False

    def _forward(self, parts: list[tuple[Job, int, int]]) -> int:
        """Run ``parts`` (split by length when that saves padding); each request is answered as soon as its last
        row leaves the batch.

        Returns:
            The padded tokens run.
        """
        rows = [ids for job, start, end in parts for ids in job.rows[start:end]]
        exits = [job.route for job, start, end in parts for _ in range(end - start)]
        owners = [(job, i) for job, start, end in parts for i in range(start, end)]
        pad_id, left = self._pad
        tokens = Tokenized(input_ids=rows, token_type_ids=None, num_truncated=0, pad_id=pad_id, pad_type_id=0,
                           left=left)
        padded = 0
        for group in split_by_length([len(r) for r in rows]):
            arrays = tokens.collate(group)
            padded += int(arrays["input_ids"].size)

            def leave(positions: np.ndarray, vectors: np.ndarray, group: np.ndarray = group) -> None:
                for r, vector in zip(group[positions].tolist(), vectors, strict=True):
                    job, i = owners[r]
                    if job.out is None:
                        job.out = np.empty((len(job.rows), vectors.shape[1]), dtype=np.float32)
                    job.out[i] = vector
                    job.done += 1
                    if job.done == len(job.rows) and not job.failed:
                        job.resolve(job.out)

            self.runner(arrays, [exits[r] for r in group], leave)
        return padded

    def _fail(self, job: Job, error: BaseException) -> None:
        if not job.failed:
            job.failed = True
            job.resolve(error)
        with self._cond:  # drop its rows that are still queued
            if job in self._jobs:
                self._queued_rows -= len(job.rows) - job.taken
                job.taken = len(job.rows)
                self._jobs.remove(job)

    def _run(self) -> None:
        self.runner.start_thread()
        while True:
            parts = self._take()
            if parts is None:
                return
            try:
                self._run_batch(parts)
            finally:
                with self._cond:
                    self._busy = False
                    self._running = []
            self._maybe_trim()

    def _maybe_trim(self) -> None:
        """Hand the free C heap back if ``trim_interval`` has passed since the last time."""
        if self.trim_interval is None or time.perf_counter() - self._last_trim < self.trim_interval:
            return
        began = time.perf_counter()
        if release_free_memory():
            self.trims += 1
            if self.on_trim is not None:
                self.on_trim(time.perf_counter() - began)
        self._last_trim = time.perf_counter()

    def _run_batch(self, parts: list[tuple[Job, int, int]]) -> None:
        """Run one batch (re-running its requests one by one if it fails) and report its stats."""
        parts = [p for p in parts if not p[0].failed]
        if not parts:
            return
        began = time.perf_counter()
        done_before = [job.done for job, _, _ in parts]
        try:
            tokens = self._forward(parts)
        except Exception as error:  # re-run request by request: only the failing one gets the error
            logger.warning("a batch of %d requests failed (%s); re-running them one by one", len(parts), error)
            for (job, start, end), done in zip(parts, done_before, strict=True):
                if job.done - done == end - start:
                    continue  # this part left the batch before the failure
                job.done = done
                try:
                    self._forward([(job, start, end)])
                except Exception as single:
                    logger.exception("a request failed in the model")
                    self._fail(job, single)
            return
        took = time.perf_counter() - began
        if self.on_batch is not None:
            layers: dict[int, int] = {}
            for job, start, end in parts:
                layers[abs(job.route)] = layers.get(abs(job.route), 0) + end - start
            try:
                self.on_batch(BatchStats(
                    rows=sum(e - s for _, s, e in parts), tokens=tokens,
                    real_tokens=sum(len(ids) for job, s, e in parts for ids in job.rows[s:e]),
                    layers=layers, queue_seconds=[began - job.enqueued for job, s, e in parts if s == 0],
                    inference_seconds=took))
            except Exception:  # metrics must never stop the batcher
                logger.exception("on_batch callback failed")

    def describe(self) -> dict[str, Any]:
        """The batcher's limits (for ``/info``)."""
        return {"max_batch_tokens": self.max_batch_tokens, "max_batch_requests": self.max_batch_requests,
                "batch_wait_ms": self.batch_wait * 1000.0, "max_queue": self.max_queue,
                "trim_interval_s": self.trim_interval}
