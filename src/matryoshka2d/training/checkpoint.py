"""Training checkpoints: atomic folders with a manifest, loaded without unpickling arbitrary objects.

A checkpoint folder ``RUN/checkpoints/step-00000100/`` holds

- ``model.safetensors``: the encoder's weights (safetensors, no pickle);
- ``optimizer.pt`` and ``scheduler.pt``: their ``state_dict()``s (tensors and plain numbers only);
- ``rng-rank{r}.pt``: each process's RNG states (torch, CUDA, numpy, python, the objective's sampler);
- ``trainer_state.json``: step, data position (see :class:`DataOrder`), best dev score, world size;
- ``manifest.json``: size and SHA-256 of every file (see :func:`matryoshka2d.io.atomic.write_manifest`).

It is written into a temporary sibling that is renamed into place, so a crash leaves only complete
checkpoints. Loading verifies the manifest first and reads ``.pt`` files with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from matryoshka2d.io.atomic import atomic_dir
from matryoshka2d.io.manifest import verify_manifest, write_manifest

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, loaded for one process."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


class DataOrder:
    """Seeded epoch-wise shuffling of row indices, resumable at any batch.

    Args:
        num_rows: examples in the data.
        batch_size: rows per (global) micro-batch; the last incomplete batch of an epoch is dropped.
        seed: seed of the order's own ``torch.Generator``.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        self.num_rows, self.batch_size = num_rows, batch_size
        self.batches_per_epoch = num_rows // batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = -1, self.batches_per_epoch
        self._epoch_state = self.generator.get_state()
        self._perm = torch.arange(0)

    @property
    def epochs_done(self) -> float:
        return max(self.epoch, 0) + self.position / self.batches_per_epoch

    def next_batch(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._epoch_state = self.generator.get_state()
            self._perm = torch.randperm(self.num_rows, generator=self.generator)
        start = self.position * self.batch_size
        self.position += 1
        return self._perm[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self._epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_state = state["generator"]
        if state["epoch"] >= 0:
            self._perm = torch.randperm(self.num_rows, generator=self.generator)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first (temporary folders are skipped)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint folder of ``run_dir``.

    Raises:
        FileNotFoundError: the run folder or its checkpoints are missing.
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run folder {run_dir} does not exist; start the run without "
                                f"--resume")
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"cannot resume: {run_dir / CHECKPOINTS} holds no checkpoint (none was saved "
                                f"yet; lower run.save_every); start again with --overwrite")
    return found[-1][1]


# ----------------------------------------------------------------------------------- RNG states
def capture_rng(**extra: Any) -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python) plus ``extra`` tensors/plain values."""
    np_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]  # the legacy tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        **extra,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the torch, CUDA, numpy and python RNGs from :func:`capture_rng` output."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; not restored",
                           len(cuda), torch.cuda.device_count())


# ----------------------------------------------------------------------------------- save / load
def save_checkpoint(run_dir: Path, step: int, *, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    scheduler: dict[str, Any], rng: list[dict[str, Any]], state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (main process only), then delete all but the last ``keep_last``.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        model: the encoder's ``state_dict()``.
        optimizer: the optimizer's ``state_dict()``.
        scheduler: the lr scheduler's ``state_dict()``.
        rng: :func:`capture_rng` of every process, indexed by rank.
        state: JSON-serialisable trainer state (must hold ``"step"``).
        keep_last: checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final, overwrite=True) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        for rank, rng_state in enumerate(rng):
            torch.save(rng_state, tmp / f"rng-rank{rank}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        write_manifest(tmp)
    logger.info("saved checkpoint %s", final)
    prune_checkpoints(run_dir, keep_last)
    return final


def load_checkpoint(folder: Path, *, rank: int = 0, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and read a checkpoint for process ``rank``.

    Raises:
        ValueError: a damaged folder (manifest mismatch) or one missing this rank's RNG state.
    """
    verify_manifest(folder)
    rng_file = folder / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        available = sorted(p.name for p in folder.glob("rng-rank*.pt"))
        logger.warning("%s has no RNG state for rank %d (saved ranks: %s); using rank 0's: the run continues "
                       "but is not bitwise identical to an uninterrupted one", folder, rank, available)
        rng_file = folder / "rng-rank0.pt"

    def read(path: Path) -> Any:
        return torch.load(path, map_location=map_location, weights_only=True)

    return Checkpoint(
        path=folder,
        model=load_file(str(folder / "model.safetensors"), device=str(map_location)),
        optimizer=read(folder / "optimizer.pt"),
        scheduler=read(folder / "scheduler.pt"),
        rng=read(rng_file),
        state=json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")),
    )


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and leftovers of interrupted writes."""
    root = run_dir / CHECKPOINTS
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        logger.debug("deleted old checkpoint %s", path)
    if root.is_dir():
        for leftover in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


def rewind_log(path: Path, step: int) -> None:
    """Drop ``log.jsonl`` lines written after ``step`` (a resumed run restarts from its checkpoint)."""
    from matryoshka2d.io.atomic import atomic_write_text

    if path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
