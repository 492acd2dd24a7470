"""Start a real ``m2d serve`` subprocess on 127.0.0.1 (a free port) for the server tests."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[2] / "src"
LAUNCH = "import sys; from matryoshka2d.cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def file_limit(n: int) -> Callable[[], None]:
    """A ``preexec_fn`` that lowers the child's soft file limit (``RLIMIT_NOFILE``) to ``n``."""

    def lower() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))

    return lower


@contextlib.contextmanager
def running_server(model: Path | str, log: Path, *args: str, timeout: float = 90.0, quiet: bool = False,
                   files: int | None = None, new_session: bool = False) -> Iterator[Server]:
    """``m2d [-q] serve model --backend torch args`` until the context ends (then SIGTERM, then kill if it hangs).

    Args:
        args: more flags (``--backend`` among them picks another backend).
        quiet: pass ``-q``.
        files: the server's soft file limit (``RLIMIT_NOFILE``); ``None``: inherited.
        new_session: the server leads its own process group (only the signals a test sends reach it), killed
            whole if it hangs (``--replicas``: the local Ray cluster's processes with it).
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, *(["-q"] if quiet else []), "serve", str(model),
                                    "--port", str(port), "--threads", "1", "--backend", "torch", *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=new_session,
                                   preexec_fn=None if files is None else file_limit(files))
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_text()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout}s:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120 if new_session else 30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL) if new_session else process.kill()
                process.wait()
