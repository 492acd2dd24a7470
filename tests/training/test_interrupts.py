"""Interrupted training in a real ``m2d train`` subprocess: Ctrl-C saves and exits 130, SIGKILL at random
moments (checkpoint writes included) loses nothing, and ``--resume`` ends on the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matryoshka2d.io.manifest import verify_manifest
from matryoshka2d.training import checkpoint as ckpt
from matryoshka2d.training.config import load_config
from matryoshka2d.training.loop import LOG_FILE, TrainingDivergedError, train
from tests.conftest import WORDS, build_tiny_model

REPO = Path(__file__).resolve().parents[2]
STEPS = 40  # long enough that a signal sent after a few steps lands well before the end
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
M2D = [sys.executable, "-c", "from matryoshka2d.cli import run; run()", "-q", "train"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny BERT with a tokenizer that knows its words (see tests/training/test_training.py)."""
    import transformers

    real = transformers.BertTokenizerFast
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers, "BertTokenizerFast", lambda vocab_file, **kw: real(vocab_file, **kw))
        return build_tiny_model(tmp_path_factory.mktemp("tiny-interrupts") / "bert")


@pytest.fixture(scope="module")
def train_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 scored pairs: the score is the number of shared leading words."""
    rng = random.Random(0)
    rows = ["sentence1\tsentence2\tscore"]
    for _ in range(48):
        a = [rng.choice(WORDS) for _ in range(6)]
        k = rng.randint(0, 6)
        b = a[:k] + [rng.choice(WORDS) for _ in range(6 - k)]
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{k * 5 / 6:.3f}")
    path = tmp_path_factory.mktemp("interrupt-data") / "train.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_config(tiny_dir: Path, train_tsv: Path, out: Path, **overrides: object) -> Path:
    values = {"model.name": str(tiny_dir), "data.source": str(train_tsv), "run.output_dir": str(out),
              "train.batch_size": 8, "train.lr": 1e-3, "train.max_steps": STEPS, "run.save_every": 0,
              "run.progress_bar": False, **overrides}
    path = out.parent / f"{out.name}.toml"
    path.write_text(load_config(overrides=values).to_toml(), encoding="utf-8")
    return path


def start(config: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([*M2D, "--config", str(config), *flags], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / LOG_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:  # noqa: ANN001
    """Poll ``condition()`` every 5 ms; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training subprocess made no progress")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def leftovers(run_dir: Path) -> list[str]:
    root = run_dir / ckpt.CHECKPOINTS
    return sorted(p.name for p in root.glob(".step-*")) if root.is_dir() else []


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, train_tsv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final model folder of an uninterrupted run (same seed, one thread like the subprocesses)."""
    out = tmp_path_factory.mktemp("interrupt-runs") / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(write_config(tiny_dir, train_tsv, out))).final_dir
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- Ctrl-C
def test_sigint_saves_a_checkpoint_exits_130_and_resume_matches(reference: Path, tiny_dir: Path,
                                                                 train_tsv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_config(tiny_dir, train_tsv, out)  # save_every = 0: only the interrupt saves mid-run
    proc = start(config)
    assert wait_for(lambda: len(logged_steps(out)) >= 3, proc), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    stopped = logged_steps(out)[-1]
    assert 3 <= stopped < STEPS
    assert f"interrupted after step {stopped} of {STEPS}" in err
    assert f"resume with: m2d train --config {out / 'config.resolved.toml'} --resume" in err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [stopped]  # the step it was in, finished and saved
    folder = ckpt.latest_checkpoint(out)
    verify_manifest(folder)
    assert ckpt.load_checkpoint(folder).step == stopped
    assert not leftovers(out) and not (out / "final").exists()

    code, err = finish(start(out / "config.resolved.toml", "--resume"))  # the command the message suggests
    assert code == 0, err[-3000:]
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert_same_weights(reference, out / "final")


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_dir: Path, train_tsv: Path, tmp_path: Path) -> None:
    """What a scheduler sends before it kills a job: the step finishes, a checkpoint is saved, exit 143."""
    out = tmp_path / "run"
    proc = start(write_config(tiny_dir, train_tsv, out))
    assert wait_for(lambda: len(logged_steps(out)) >= 3, proc), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: finishing the current step" in err
    stopped = logged_steps(out)[-1]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [stopped] and 3 <= stopped < STEPS
    verify_manifest(ckpt.latest_checkpoint(out))


def test_signal_handlers_are_restored_after_training(tiny_dir: Path, train_tsv: Path, tmp_path: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    train(load_config(write_config(tiny_dir, train_tsv, tmp_path / "run", **{"train.max_steps": 2})))
    assert {sig: signal.getsignal(sig) for sig in before} == before


class _NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad * float("nan")


def test_nan_gradient_with_finite_loss_stops_at_its_step(tiny_dir: Path, train_tsv: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 5 for the gradient (tests/training/test_training.py covers a NaN loss part): the run stops at the step,
    names the gradient norm, keeps the last good checkpoint, restores the SIGINT handler; the CLI exits 2."""
    from matryoshka2d.cli import main
    from matryoshka2d.losses.objective import TwoDMatryoshkaLoss

    original, calls = TwoDMatryoshkaLoss.forward, {"n": 0}

    def poisoned(self, features, labels=None):  # noqa: ANN001, ANN202
        out = original(self, features, labels)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = _NanGradient.apply(out["loss"])
        return out

    monkeypatch.setattr(TwoDMatryoshkaLoss, "forward", poisoned)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    config = load_config(write_config(tiny_dir, train_tsv, out, **{"train.max_steps": 6, "run.save_every": 2}))
    with pytest.raises(TrainingDivergedError, match=r"step 3: the gradient norm is nan .*'loss': [0-9].* last "
                                                    r"checkpoint is intact"):
        train(config)
    assert signal.getsignal(signal.SIGINT) is before
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2] and logged_steps(out) == [1, 2]
    verify_manifest(ckpt.latest_checkpoint(out))
    calls["n"] = 0
    assert main(["-q", "train", "--config", str(write_config(tiny_dir, train_tsv, tmp_path / "cli",
                                                               **{"train.max_steps": 6}))]) == 2


# ----------------------------------------------------------------------------------- SIGKILL
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches(reference: Path, tiny_dir: Path, train_tsv: Path,
                                                       tmp_path: Path) -> None:
    """Five SIGKILLs at seeded random moments of a run that checkpoints every step, each followed by
    ``--resume``; every kill leaves a loadable latest checkpoint and the end equals the uninterrupted run."""
    out = tmp_path / "run"
    config = write_config(tiny_dir, train_tsv, out, **{"run.save_every": 1})
    rng = random.Random(8)
    kills, during_write, resumed_from = 0, 0, []
    while kills < 5:
        proc = start(config, *(["--resume"] if kills else []))
        before = ckpt.list_checkpoints(out)[-1][0] if ckpt.list_checkpoints(out) else 0
        progressed = wait_for(lambda: bool(ckpt.list_checkpoints(out)) and  # noqa: B023
                              ckpt.list_checkpoints(out)[-1][0] > before, proc)  # noqa: B023
        assert progressed, f"the run ended after {kills} kills; raise STEPS"
        time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None, f"the run ended after {kills} kills; raise STEPS"
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        kills += 1
        during_write += bool(leftovers(out))  # a temporary sibling left behind: killed mid-write
        latest = ckpt.latest_checkpoint(out)
        verify_manifest(latest)
        resumed_from.append(ckpt.load_checkpoint(latest).step)
    code, err = finish(start(config, "--resume"))
    assert code == 0, err[-3000:]
    assert resumed_from == sorted(resumed_from) and resumed_from[-1] < STEPS
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert not leftovers(out)
    assert_same_weights(reference, out / "final")
    print(f"\n{kills} kills survived ({during_write} during a checkpoint write), resumed from steps "
          f"{resumed_from}; final weights equal the uninterrupted run's")
