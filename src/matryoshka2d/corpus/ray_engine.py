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
from collections.abc import Sequence
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
                         normalize=self.job.normalize, batch_size=self.job.batch_size)
            indices.append(spec.index)
            rows.append(spec.rows)
        return {"shard": np.asarray(indices, dtype=np.int64), "rows": np.asarray(rows, dtype=np.int64)}


def run_ray(job: CorpusJob, output: Path, specs: Sequence[ShardSpec], *, workers: int = 2,
            threads_per_worker: int = 1, address: str | None = None) -> None:
    """Encode ``specs`` on Ray: a local cluster by default (``ray.init()``), or the one at ``address``.

    Raises:
        ImportError: Ray Data is not installed.
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
            ray.init(address=address, logging_level=logging.WARNING)
    try:
        items = [{"spec": json.dumps(s.to_dict())} for s in specs]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        kwargs = {"job": job.to_dict(), "output": str(Path(output).resolve()), "threads": threads_per_worker}
        ds = ds.map_batches(ShardEncoder, fn_constructor_kwargs=kwargs,
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=threads_per_worker)
        done = {int(row["shard"]) for row in ds.iter_rows()}
    finally:
        if started:
            ray.shutdown()
    missing = sorted({s.index for s in specs} - done)
    if missing:
        raise RuntimeError(f"Ray returned no result for shards {missing[:10]}; rerun the same command to resume")
