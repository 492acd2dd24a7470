"""Encode a corpus into a folder of Parquet shards: plan, resume, run an engine, write the manifest.

The output folder holds ``run.json`` (the command that owns it), ``shards/part-NNNNN.parquet`` and, once
every shard is written, ``manifest.json`` (model, exits, counts, each shard's rows, first / last id and
SHA-256). A run first reads the whole corpus once (cheap next to encoding): every record is checked, so a
bad line fails before any encoding, and the corpus is cut into shards of ``shard_size`` records. A shard
file that exists was renamed into place complete; it is checked against the plan and skipped. So a killed
run restarted with the same command finishes the remaining shards and ends with the same manifest as an
uninterrupted one; a different command against the same folder is an error.

Engines: ``local`` (this process, torch threads, a tqdm bar) and ``ray`` (:mod:`matryoshka2d.corpus.ray_engine`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from matryoshka2d.corpus.job import CorpusJob
from matryoshka2d.corpus.shards import (
    INT8_SCALE,
    SHARD_DIR,
    ShardSpec,
    encode_shard,
    list_size,
    plan_shards,
    shard_is_done,
    value_type,
)
from matryoshka2d.io.atomic import atomic_write_json
from matryoshka2d.io.manifest import file_sha256, library_versions
from matryoshka2d.vocab import CORPUS_ENGINES, CorpusEngine

logger = logging.getLogger(__name__)

RUN_NAME = "run.json"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def prepare_output(output: str | Path, job: CorpusJob, *, overwrite: bool = False, claim: bool = True) -> bool:
    """Check that ``output`` is new, empty or an output of the same ``job``; with ``claim``, take it.

    Taking it writes ``run.json`` (after removing an earlier output, with ``overwrite``). Call it once with
    ``claim=False`` before the corpus is read, so a conflict fails fast, and once with ``claim=True`` after
    the corpus passed its checks, so a bad input never claims a folder.

    Returns:
        Whether ``output`` already holds (part of) this job's output, i.e. the run resumes.

    Raises:
        FileExistsError: a non-empty folder that is not a corpus output, or a file.
        ValueError: a corpus output of a different command (the differing settings are named).
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; --output takes a folder for the shards")
    run_file = out / RUN_NAME
    resume = False
    if out.is_dir() and any(out.iterdir()):
        if not run_file.is_file():
            raise FileExistsError(f"{out} is not empty and holds no {RUN_NAME}, so it is not a corpus output; "
                                  "choose a new or empty --output folder")
        old = read_run_record(run_file)
        if overwrite:
            if claim:
                shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
                for name in (MANIFEST_NAME, RUN_NAME):
                    (out / name).unlink(missing_ok=True)
        else:
            new = _run_record(job)
            changed = job.changed_inputs(old["job"].get("inputs"))
            if changed:
                raise ValueError(f"{out} holds a run over {changed[0]} as it was before it changed (size or SHA-256 "
                                 f"differ{f'; {len(changed) - 1} more changed' if len(changed) > 1 else ''}), so "
                                 "its shards would mix old and new texts; pass --overwrite to start over on the "
                                 "new input, or pick another --output")
            if old != new:
                keys = sorted(k for k in set(old["job"]) | set(new["job"]) if old["job"].get(k) != new["job"].get(k))
                raise ValueError(f"{out} holds the output of a different command (differs in: "
                                 f"{', '.join(keys) or 'format_version'}); rerun the same command to resume it, "
                                 "pick another --output, or pass --overwrite to start over")
            resume = True
    if claim and not resume:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, _run_record(job))
    return resume


def read_run_record(run_file: Path) -> dict[str, Any]:
    """The ``run.json`` of an earlier corpus encode, after checking that this library wrote it.

    Raises:
        FileExistsError: unreadable, or not ours (another tool's ``run.json``): its folder is never cleared,
            not even with ``--overwrite``.
    """
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        old, reason = None, f"unreadable ({' '.join(str(e).split())[:80]})"
    else:
        reason = "not the run record of an m2d corpus encode"
    job = old.get("job") if isinstance(old, dict) else None
    if isinstance(job, dict) and isinstance(old.get("format_version"), int) and {"model", "inputs",
                                                                                  "exits"} <= set(job):
        return old
    raise FileExistsError(f"{run_file} is {reason}, so {run_file.parent} may be another tool's folder and is left "
                          "alone (--overwrite does not clear it); choose a new or empty --output folder, or delete "
                          "it yourself")


def _run_record(job: CorpusJob) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "job": job.to_dict()}


def encode_corpus(job: CorpusJob, output: str | Path, *, engine: CorpusEngine = "local", model: Any = None,
                  workers: int = 2, threads_per_worker: int = 1, ray_address: str | None = None,
                  ray_timeout: float = 60.0, overwrite: bool = False, progress: bool = True,
                  on_shard: Callable[[ShardSpec], None] | None = None,
                  release_memory: bool = True) -> dict[str, Any]:
    """Encode ``job``'s corpus into Parquet shards under ``output``; resume what a killed run left.

    Args:
        job: what to encode (see :func:`make_job`).
        output: the output folder.
        engine: ``local`` (this process) or ``ray``.
        model: the loaded encoder for the local engine (loaded from ``job.model`` when ``None``).
        workers: Ray actors, each loading the model once.
        threads_per_worker: torch threads (and Ray CPUs) per actor.
        ray_address: join this Ray cluster (``auto``, ``ray://host:10001``); ``None`` starts a local one.
        ray_timeout: seconds to wait for the cluster at ``ray_address``.
        overwrite: replace an earlier corpus output in ``output``.
        progress: show a progress bar.
        on_shard: called in this process with each shard's spec once the shard is written (e.g. to sample
            memory, or to report progress elsewhere); with Ray, as the driver receives each shard.
        release_memory: the local engine hands the C heap's free pages back to the OS after every shard
            (Ray's actors always do).

    Returns:
        The manifest (also written to ``output/manifest.json``), plus ``"run"`` timings that are not written.

    Raises:
        ValueError: bad records (``file:line: ...``), duplicate ids, an output of another command.
    """
    if engine not in CORPUS_ENGINES:
        raise ValueError(f"--engine {engine!r} is not one of ['local', 'ray']")
    for name, value in (("--workers", workers), ("--threads-per-worker", threads_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} {value!r} must be a positive integer")
    out = Path(output)
    prepare_output(out, job, overwrite=overwrite, claim=False)
    start = time.perf_counter()
    reader = job.reader()
    specs, stats = plan_shards(reader, job.shard_size)
    scanned = time.perf_counter()
    prepare_output(out, job, overwrite=overwrite, claim=True)
    todo = [s for s in specs if not shard_is_done(out, s, job.exits)]
    logger.info("%d texts in %d shards (read and checked in %.1fs); %d shards to encode, %d already done",
                stats.rows, len(specs), scanned - start, len(todo), len(specs) - len(todo))
    if todo:
        if engine == "local":
            run_local(job, out, todo, total=stats.rows, done=stats.rows - sum(s.rows for s in todo),
                      model=model, progress=progress, on_shard=on_shard, release_memory=release_memory)
        else:
            from matryoshka2d.corpus.ray_engine import run_ray

            run_ray(job, out, todo, workers=workers, threads_per_worker=threads_per_worker, address=ray_address,
                    timeout=ray_timeout, progress=progress, on_shard=on_shard)
    manifest = build_manifest(job, out, specs, skipped_empty=stats.skipped_empty)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    seconds = time.perf_counter() - start
    encoded = sum(s.rows for s in todo)
    return {**manifest, "run": {"seconds": seconds, "scan_seconds": scanned - start, "encoded_rows": encoded,
                                "resumed_shards": len(specs) - len(todo), "engine": engine}}


def run_local(job: CorpusJob, output: Path, specs: Sequence[ShardSpec], *, total: int, done: int = 0,
              model: Any = None, progress: bool = True, on_shard: Callable[[ShardSpec], None] | None = None,
              release_memory: bool = True) -> None:
    """Encode ``specs`` one after another in this process (torch's own threads), with a tqdm bar.

    ``on_shard(spec)`` is called after each shard is written; ``release_memory`` as in :func:`encode_shard`.
    """
    model = job.load_model() if model is None else model
    reader = job.reader()
    with tqdm(total=total, initial=done, unit="text", desc="encode", disable=not progress,
              smoothing=0.05) as bar:
        for spec in specs:
            encode_shard(model, reader, spec, job.exits, output, fmt=job.format, normalize=job.normalize,
                         batch_size=job.batch_size, progress=bar.update, release_memory=release_memory,
                         input_type=job.input_type)
            if on_shard is not None:
                on_shard(spec)


def build_manifest(job: CorpusJob, output: Path, specs: Sequence[ShardSpec], *, skipped_empty: int) -> dict:
    """The manifest of a finished output: model, exits, counts, and each shard's rows, ids and SHA-256."""
    import pyarrow

    shards = []
    for spec in specs:
        path = output / spec.file
        shards.append({"file": spec.file, "rows": spec.rows, "first_id": spec.first_id, "last_id": spec.last_id,
                       "size": path.stat().st_size, "sha256": file_sha256(path)})
    exits = [{"layer": e.layer, "dim": e.dim, "column": e.column, "values": list_size(e, job.format),
              "type": value_type(job.format)} for e in job.exits]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "matryoshka2d-corpus-embeddings",
        "model": job.model,
        "pooling": job.pooling,
        "exits": exits,
        "format": job.format,
        "formats": {"int8": f"q = round({INT8_SCALE} x) of the normalised vector",
                    "binary": "numpy.packbits(x > 0), ceil(dim / 8) bytes"}.get(job.format, "IEEE floats"),
        "normalize": job.normalize,
        "input_type": job.input_type,
        "id_column": job.id_column or "(id, _id or doc_id when present, else line numbers)",
        "text_column": job.text_column or "(title + text, text, else the first column that is not the id)",
        "inputs": job.input_records(),
        "rows": sum(s.rows for s in specs),
        "skipped_empty": skipped_empty,
        "num_shards": len(specs),
        "shard_size": job.shard_size,
        "shards": shards,
        "versions": {**library_versions(), "pyarrow": pyarrow.__version__},
    }


__all__ = ["build_manifest", "encode_corpus", "prepare_output", "run_local"]
