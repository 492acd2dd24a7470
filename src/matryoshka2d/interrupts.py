"""Ctrl-C during training: finish the step, save a checkpoint, stop on every process at the same step."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("matryoshka2d.training")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after a complete step, saved as ``checkpoint``; ``resume=True`` continues it."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class SigintFlag:
    """While installed, a first Ctrl-C only sets :attr:`raised` (the loop saves and stops after its step);
    a second one raises ``KeyboardInterrupt`` at once (an atomic checkpoint write in progress is dropped).
    Nothing is installed off the main thread or where SIGINT is ignored (e.g. ``nohup``)."""

    def __init__(self) -> None:
        self.raised, self.previous = False, None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self._handle) or signal.SIG_DFL

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        logger.warning("Ctrl-C: finishing the current step, then saving a checkpoint (Ctrl-C again stops at "
                       "once, without saving)")

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def stop_requested(accelerator: Any, local: bool) -> bool:
    """Whether any process saw Ctrl-C: all must stop at the same step, as saving a checkpoint is collective."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([float(local)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)
