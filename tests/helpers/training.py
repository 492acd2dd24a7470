"""Training-test helpers: learnable scored pairs for the tiny model, a run config, the run log."""

from __future__ import annotations

import json
import random
from pathlib import Path

from matryoshka2d.training.config import Config, load_config
from matryoshka2d.training.loop import LOG_FILE
from tests.conftest import WORDS


def sentence(rng: random.Random, n: int = 6) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def scored_rows(seed: int, n: int) -> list[str]:
    """Pairs whose score is the number of shared leading words: learnable by the tiny model."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = sentence(rng)
        k = rng.randint(0, 6)
        rows.append(f"{' '.join(a)}\t{' '.join(a[:k] + sentence(rng, 6 - k))}\t{k * 5 / 6:.3f}")
    return rows


def make_config(tiny_dir: Path, data_dir: Path, out: Path, **overrides: object) -> Config:
    base = {"model.name": str(tiny_dir), "data.source": str(data_dir / "train.tsv"),
            "data.data_dir": str(data_dir), "run.output_dir": str(out), "train.batch_size": 16,
            "train.lr": 1e-3, "train.max_steps": 8, "run.save_every": 4, "run.progress_bar": False}
    return load_config(overrides={**base, **overrides})


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_FILE).read_text(encoding="utf-8").splitlines()]
