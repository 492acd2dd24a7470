"""The ``ray`` engine: Ray Data runs the shards of a corpus encode over a pool of model-holding actors.

The driver has planned the shards (:func:`~matryoshka2d.corpus.shards.plan_shards`). Each shard's spec
(where it starts in the input, how many rows, the digest of its ids) becomes one row of a Ray dataset;
``map_batches`` sends the rows to an actor pool of ``workers`` :class:`ShardEncoder` actors with
``threads_per_worker`` CPUs each. An actor loads the model once, then reads its shard straight from the
input files, embeds it and writes the shard file atomically into the output folder. So on a cluster the
inputs and the output folder must be paths every node sees (a shared file system), and every node needs
matryoshka2d and the model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.corpus.job import CorpusJob
from matryoshka2d.corpus.shards import ShardSpec, encode_shard
from matryoshka2d.vocab import install_hint

logger = logging.getLogger(__name__)


class ShardEncoder:
    """A Ray Data actor: loads the model once, then encodes and writes the shards it is given.

    Args:
        job: :meth:`CorpusJob.to_dict` of the run.
        output: the output folder (seen by every node).
        threads: torch threads of this actor.
    """

    def __init__(self, job: dict[str, Any], output: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.job = CorpusJob.from_dict(job)
        self.output = Path(output)
        self.model = self.job.load_model()
        self.reader = self.job.reader()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode every shard in ``batch["spec"]``; return their indices and row counts."""
        indices, rows = [], []
        for text in batch["spec"]:
            spec = ShardSpec.from_dict(json.loads(str(text)))
            encode_shard(self.model, self.reader, spec, self.job.exits, self.output, fmt=self.job.format,
                         normalize=self.job.normalize, batch_size=self.job.batch_size,
                         input_type=self.job.input_type)
            indices.append(spec.index)
            rows.append(spec.rows)
        return {"shard": np.asarray(indices, dtype=np.int64), "rows": np.asarray(rows, dtype=np.int64)}


def connect(ray: Any, address: str, timeout: float) -> None:
    """``ray.init(address=...)`` that gives up after ``timeout`` seconds and yields to SIGTERM / Ctrl-C.

    Ray retries an address without a cluster forever, inside C++ code where Python's signal handlers never
    run; so the call runs in a daemon thread while this (main) thread waits, turning SIGTERM into an
    interrupt (exit 143) that unwinds the caller's locks.

    Raises:
        ValueError: no cluster answered in time (or Ray refused the address).
        KeyboardInterrupt: SIGTERM or Ctrl-C while waiting.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"--ray-timeout {timeout!r} must be a positive number of seconds; pass e.g. 60")
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    def on_sigterm(signum: int, frame: Any) -> None:
        interrupt = KeyboardInterrupt(f"signal {signum}")
        interrupt.exit_code = 128 + signum  # type: ignore[attr-defined]
        raise interrupt

    logger.info("connecting to the Ray cluster at %s (up to %g s, --ray-timeout)", address, timeout)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        thread = threading.Thread(target=init, name="ray-connect", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if "error" not in outcome:
        raise ValueError(f"--ray-address {address}: no Ray cluster answered within {timeout:g} s (--ray-timeout); "
                         "check the address (`ray status` on the head node), or drop --ray-address to start a "
                         "local cluster")
    error = outcome["error"]
    if error is not None:
        raise ValueError(f"--ray-address {address}: Ray could not connect ({' '.join(str(error).split())[:200]}); "
                         "check the address, or drop --ray-address to start a local cluster") from error


def run_ray(job: CorpusJob, output: Path, specs: Sequence[ShardSpec], *, workers: int = 2,
            threads_per_worker: int = 1, address: str | None = None, timeout: float = 60.0,
            progress: bool = True, on_shard: Callable[[ShardSpec], None] | None = None) -> None:
    """Encode ``specs`` on Ray: a local cluster by default (``ray.init()``), or the one at ``address``.

    ``on_shard(spec)`` is called in this process as each written shard comes back.

    Raises:
        ImportError: Ray Data is not installed.
        ValueError: no cluster at ``address`` within ``timeout`` seconds.
        RuntimeError: a shard did not come back.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(f"--engine ray needs Ray Data: {install_hint('ray')}") from None
    started = not ray.is_initialized()
    if started:
        if address is None:  # a local cluster big enough for the pool (Ray counts this machine's cores)
            ray.init(num_cpus=max(os.cpu_count() or 1, workers * threads_per_worker), include_dashboard=False,
                     logging_level=logging.WARNING)
        else:
            connect(ray, address, timeout)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        items = [{"spec": json.dumps(s.to_dict())} for s in specs]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        kwargs = {"job": job.to_dict(), "output": str(Path(output).resolve()), "threads": threads_per_worker}
        ds = ds.map_batches(ShardEncoder, fn_constructor_kwargs=kwargs,
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=threads_per_worker)
        by_index = {s.index: s for s in specs}
        done = set()
        for row in ds.iter_rows():
            done.add(int(row["shard"]))
            if on_shard is not None:
                on_shard(by_index[int(row["shard"])])
    finally:
        if started:
            ray.shutdown()
    missing = sorted({s.index for s in specs} - done)
    if missing:
        raise RuntimeError(f"Ray returned no result for shards {missing[:10]}; rerun the same command to resume")
