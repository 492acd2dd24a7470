"""Ctrl-C or SIGTERM during training: finish the step, save a checkpoint, stop on every process at the same step.

SIGTERM is what a scheduler (SLURM, Kubernetes, `timeout`) sends before it kills a job, so it gets the same
treatment as Ctrl-C; the CLI then exits 143 (128 + 15) instead of 130."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("matryoshka2d.training.loop")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, ``signum``) stopped the run after a complete step, saved as ``checkpoint``;
    ``resume=True`` continues it."""

    def __init__(self, step: int, checkpoint: Path, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum


class SigintFlag:
    """While installed, a first Ctrl-C or SIGTERM only sets :attr:`raised` (the loop saves and stops after its
    step; :attr:`signum` says which); a second one raises ``KeyboardInterrupt`` at once (an atomic checkpoint
    write in progress is dropped). Nothing is installed off the main thread, nor for a signal that is ignored
    (e.g. SIGINT under ``nohup``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.raised, self.signum = False, int(signal.SIGINT)
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self.previous[sig] = signal.signal(sig, self._handle) or signal.SIG_DFL

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised, self.signum = True, int(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        logger.warning("%s: finishing the current step, then saving a checkpoint (a second signal stops at "
                       "once, without saving)", name)

    def restore(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


def stop_requested(accelerator: Any, local: bool) -> bool:
    """Whether any process saw Ctrl-C: all must stop at the same step, as saving a checkpoint is collective."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([float(local)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)
