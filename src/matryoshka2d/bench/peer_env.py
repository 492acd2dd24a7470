"""Peers whose dependencies conflict with ours, in a venv the benchmark makes itself, driven in a worker.

sentence-transformers' ONNX and OpenVINO backends need optimum / optimum-intel, which pin a transformers older
than ours, so they cannot share our environment. :func:`ensure_peer_venv` makes a venv under a cache folder
(``$M2D_CACHE`` or ``~/.cache/matryoshka2d``, outside any repository) and installs
:data:`PEER_REQUIREMENTS` into it with pip from the package index. Torch is not downloaded again: a ``.pth``
file lets the venv see this interpreter's site-packages *after* its own, so the peer gets our CPU torch while
its own transformers, optimum and sentence-transformers shadow ours. :class:`PeerWorker` runs
:mod:`matryoshka2d.bench.peer_worker` there and times each call like an in-process one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.io.folder import cache_dir

logger = logging.getLogger(__name__)

PEER_REQUIREMENTS = ("sentence-transformers[onnx,openvino]>=5.0",)
WORKER = Path(__file__).with_name("peer_worker.py")
READY = ".m2d-ready.json"  # written last: what was installed, so a half-made venv is made again


def venv_python(venv: Path) -> Path:
    """The interpreter of ``venv``."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_peer_venv(venv: Path | None = None, *, requirements: tuple[str, ...] = PEER_REQUIREMENTS) -> Path:
    """The peer venv's interpreter, making the venv first when it is missing or half-made.

    Args:
        venv: where the venv lives (default: ``cache_dir() / "peer-venv"``).
        requirements: pip requirement strings installed into it.

    Returns:
        Its ``python``.

    Raises:
        RuntimeError: ``venv`` or ``pip install`` failed (the message holds pip's last lines).
    """
    venv = Path(venv or cache_dir() / "peer-venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv_python(venv)
    wanted = {"requirements": list(requirements), "parent": sysconfig.get_paths()["purelib"]}
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmarks never build the same venv at once
        ready = venv / READY
        if ready.is_file() and python.exists() and json.loads(ready.read_text(encoding="utf-8")) == wanted:
            return python
        logger.info("making the peer venv %s (%s); this downloads from the package index once", venv,
                    ", ".join(requirements))
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", "--clear", str(venv)], "python -m venv")
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        (site / "_m2d_parent_site.pth").write_text(wanted["parent"] + "\n", encoding="utf-8")
        _run([str(python), "-m", "pip", "install", "-q", *requirements], "pip install")
        ready.write_text(json.dumps(wanted), encoding="utf-8")
    return python


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{what} for the peer venv failed (exit {done.returncode}): {tail}")


class PeerWorker:
    """One worker process in the peer venv holding every worker peer of a benchmark run.

    Args:
        python: the peer venv's interpreter (:func:`ensure_peer_venv`).
        texts: the sentences every call embeds.
    """

    def __init__(self, python: Path, texts: list[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="m2d-peers-")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([str(python), "-I", str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        path = Path(self.tmp.name) / "texts.json"
        path.write_text(json.dumps(texts), encoding="utf-8")
        self.ask({"op": "texts", "path": str(path)})
        self.versions: dict[str, str] = {}

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request; return the answer.

        Raises:
            RuntimeError: the worker failed the request or died.
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer worker exited (code {self.proc.wait()}) during {request['op']!r}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"peer worker, {request['op']} {request.get('key', '')}: {answer.get('error')}")
        return answer

    def load(self, key: str, backend: str, folder: Path, *, width: int, threads: int, max_seq_length: int) -> None:
        """Load the sentence-transformers folder ``folder`` on ``backend`` in the worker, as ``key``."""
        answer = self.ask({"op": "load", "key": key, "backend": backend, "folder": str(folder), "width": width,
                           "threads": threads, "max_seq_length": max_seq_length})
        self.versions = answer.get("versions", self.versions)

    def runner(self, key: str, dim: int) -> WorkerRunner:
        """The runner of loaded model ``key`` at width ``dim``: embeds like an in-process peer."""
        return WorkerRunner(self, key, dim, Path(self.tmp.name) / f"{key}-{dim}.npy")

    def close(self) -> None:
        """Stop the worker and remove its files."""
        if self.proc.poll() is None:
            try:
                self.ask({"op": "quit"})
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()


class WorkerRunner:
    """``run(texts, batch_size)`` of one worker peer; ``last_cpu`` is the worker's CPU seconds of the call.

    The texts are the worker's (sent once); ``texts`` is checked to be as many.
    """

    def __init__(self, worker: PeerWorker, key: str, dim: int, out: Path) -> None:
        self.worker, self.key, self.dim, self.out = worker, key, dim, out
        self.last_cpu: float | None = None

    def __call__(self, texts: list[str], batch_size: int) -> np.ndarray:
        answer = self.worker.ask({"op": "encode", "key": self.key, "batch_size": int(batch_size), "dim": self.dim,
                                  "out": str(self.out)})
        self.last_cpu = float(answer["cpu"])
        emb = np.load(self.out)
        if len(emb) != len(texts):
            raise RuntimeError(f"peer worker returned {len(emb)} embeddings for {len(texts)} texts")
        return emb
