"""Other libraries' chatter on a successful run (issue 37): ``m2d encode``, ``index``, ``search`` and ``export``
print no faiss CPU-build notice, numba warning, transformers shard bar, Ray Data progress line or truncation
notice; ``-v`` shows what the libraries say. One function silences them: ``matryoshka2d.logs.setup_logging``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from matryoshka2d.logs import setup_logging

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "RAY_DATA_LOG_LEVEL"):
    ENV.pop(name, None)  # as a user's shell has them: unset

# several m2d commands in one fresh process, each one's stderr after a "@@ name" line
DRIVER = r"""
import json, sys
from matryoshka2d.cli import main
for argv in json.loads(sys.argv[1]):
    print("@@ " + next(a for a in argv if not a.startswith("-")), file=sys.stderr, flush=True)
    code = main(argv)
    print("@@ rc=%d" % code, file=sys.stderr, flush=True)
"""
NOISE = ("AVX2", "AVX512", "faiss.loader", "numba", "TBB", "Writing model shards", "Loading weights",
         "were truncated", "truncated to")
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+):")


def run_m2d(commands: list[list[str]], timeout: int = 600) -> dict[str, str]:
    """Run the commands in one fresh process; return each command's stderr (all must exit 0)."""
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    sections: dict[str, str] = {}
    for part in proc.stderr.split("@@ ")[1:]:
        head, _, body = part.partition("\n")
        if head.startswith("rc="):
            assert head == "rc=0", proc.stderr
        else:
            sections[head] = sections.get(head, "") + body
    return sections


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("noise")
    words = "a man dog cat plays the guitar in park red blue".split()
    (root / "docs.tsv").write_text("id\ttext\n" + "".join(f"d{i}\t{' '.join(words[i % 5:])} {i}\n" for i in range(12)),
                                   encoding="utf-8")
    (root / "q.tsv").write_text("query_id\ttext\nq1\ta man plays the guitar\n", encoding="utf-8")
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    return root


def commands(model: Path, files: Path, *flags: str) -> list[list[str]]:
    m, out = str(model), files / "out"
    docs = str(files / "docs.tsv")
    steps = [
        ["encode", m, "--pooling", "mean", "--input", docs, "--output", f"{out}-vectors.npy"],
        ["encode", m, "--pooling", "mean", "--input", docs, "--exits", "2:16,4:32", "--output", f"{out}-corpus"],
        ["index", m, "--pooling", "mean", "--corpus", docs, "--dims", "8,32", "--output", f"{out}-index"],
        # --qrels: scored with ranx, which imports numba
        ["search", f"{out}-index", "--queries", str(files / "q.tsv"), "--qrels", str(files / "qrels.tsv"),
         "--output", f"{out}-run.jsonl"],
        ["export", m, "--pooling", "mean", "--layer", "2", "--dim", "16", "--output", f"{out}-hf"],
    ]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    else:
        steps.append(["export", m, "--pooling", "mean", "--layer", "2", "--dim", "16", "--format", "onnx",
                      "--output", f"{out}-onnx"])
    return [[*flags, *step, "--overwrite"] for step in steps]


def test_success_prints_no_library_chatter(tiny_dir: Path, files: Path) -> None:
    pytest.importorskip("faiss")
    pytest.importorskip("pyarrow")
    sections = run_m2d(commands(tiny_dir, files))
    assert set(sections) == {"encode", "index", "search", "export"}
    for name, err in sections.items():
        for needle in NOISE:
            assert needle not in err, (name, needle, err)
        for line in err.splitlines():  # every log line is ours (progress bars of our own work may be shown)
            match = LOG_LINE.match(line)
            assert match is None or match.group(2).startswith("matryoshka2d"), (name, line)


def test_verbose_shows_what_the_libraries_say(tiny_dir: Path, files: Path) -> None:
    pytest.importorskip("faiss")
    index = [c for c in commands(tiny_dir, files, "-v") if c[1] == "index"]
    err = run_m2d(index)["index"]
    assert "faiss.loader" in err, err  # "Loading faiss with AVX2 support." and friends


def test_ray_engine_prints_no_ray_data_progress_lines(tiny_dir: Path, files: Path) -> None:
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    err = run_m2d([["encode", str(tiny_dir), "--pooling", "mean", "--input", str(files / "docs.tsv"), "--exits",
                    "2:16", "--engine", "ray", "--workers", "1", "--output", str(files / "ray")]])["encode"]
    # Ray Data's plan and progress at INFO (a dozen lines a run); its one core_worker note is explained in
    # docs/encoding.md, not hidden
    assert "streaming_executor" not in err and "logging_progress" not in err, err


def numba_warning() -> None:  # as numba raises them (ranx compiles its metrics with numba)
    warnings.warn_explicit("The TBB threading layer requires TBB version 2021 update 6 or later", UserWarning,
                           "numba/np/ufunc/parallel.py", 1, module="numba.np.ufunc.parallel")


def test_setup_logging_silences_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "RAY_DATA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    faiss_logger = logging.getLogger("faiss.loader")
    monkeypatch.setattr(faiss_logger, "level", logging.NOTSET)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with setup_logging(logging.INFO, verbose=True):  # -v: nothing silenced
            numba_warning()
            assert faiss_logger.level == logging.NOTSET and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        assert len(seen) == 1
        with setup_logging(logging.INFO):
            numba_warning()
            assert faiss_logger.getEffectiveLevel() == logging.WARNING
            assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["RAY_DATA_LOG_LEVEL"]
            assert "TQDM_DISABLE" not in os.environ  # our own bars of long work stay
        assert len(seen) == 1
        with setup_logging(logging.WARNING, quiet=True):  # -q: every bar too
            assert os.environ["TQDM_DISABLE"] == "1"
        numba_warning()
        assert len(seen) == 2  # the filters went with the stack
    assert faiss_logger.level == logging.NOTSET
    assert not {"HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "RAY_DATA_LOG_LEVEL"} & set(os.environ)


def test_a_value_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    with setup_logging(logging.INFO):
        assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"
