"""scripts/pool_seeds.py: per-seed reports pooled into seed-mean deltas, counts and verdicts; bad folders refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pool_seeds.py"
spec = importlib.util.spec_from_file_location("pool_seeds", SCRIPT)
pool_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pool_seeds)  # type: ignore[union-attr]

CMP = "dense - separate-head"


def _report(folder: Path, shift: float, lr: str = "0.0001") -> Path:
    """A seed's report: at layer k, dim d the delta is -(k - 1) + shift at d <= 128 and -2 + shift above."""
    rows = []
    for k in (1, 2):
        for d in (32, 64, 128, 256):
            delta = (-(k - 1) if d <= 128 else -2.0) + shift
            rows.append({"set": "stsb", "comparison": CMP, "layer": k, "dim": d, "delta": delta,
                         "low": delta - 0.5, "high": delta + 0.5})
    rows.append({"set": "stsb", "comparison": "dense - full (full exit)", "layer": 3, "dim": 256,
                 "delta": -0.2 + shift, "low": -1.0, "high": 1.0})
    folder.mkdir(parents=True)
    (folder / "comparisons.json").write_text(json.dumps(rows))
    (folder / "selection.json").write_text(json.dumps({"chosen": lr}))
    return folder


def test_pools_deltas_over_seeds_and_writes_the_report(tmp_path):
    a, b = _report(tmp_path / "s0", 0.0), _report(tmp_path / "s1", 0.4)
    report, out = tmp_path / "docs" / "pooled.md", tmp_path / "docs" / "research" / "pooled"
    assert pool_seeds.main([f"0={a}", f"1={b}", "--out", str(out), "--report", str(report), "--title", "T",
                            "--main", CMP]) == 0
    rows = json.loads((out / "pooled.json").read_text())
    r = next(r for r in rows if (r["layer"], r["dim"]) == (2, 64))
    assert r["deltas"] == [-1.0, -0.6] and r["mean"] == pytest.approx(-0.8) and r["seeds"] == [0, 1]
    assert r["std"] == pytest.approx(np.std([-1.0, -0.6], ddof=1)) and r["t_low"] < r["mean"] < r["t_high"]
    assert r["seeds_behind"] == 2 and r["seeds_ahead"] == 0  # CI [delta - 0.5, delta + 0.5] is below 0 in both
    text = report.read_text()
    # dims >= 64 at layers 1-2: d64/d128 means 0.2, 0.2, -0.8, -0.8 (all within 1.0); d256 -1.8 twice (not)
    assert "seed-mean Δ within 1.0 at 4/6 (dims <= 128: 4/4, dims > 128: 0/2)" in text
    assert "seed-mean Δ +0.00 (per seed -0.20, +0.20); goal within 0.5: met" in text
    assert "| L2 | -0.80 ± 0.28 **behind** |" in text  # d32 is below the goals' dims and is not tabulated
    assert "seed 0: `research/pooled/`" not in text and "seed 0: `../s0/`" in text  # links from the report


def test_refuses_seeds_of_different_studies_and_missing_folders(tmp_path):
    a, b = _report(tmp_path / "s0", 0.0), _report(tmp_path / "s1", 0.4, lr="5e-05")
    args = ["--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.md"), "--title", "T"]
    with pytest.raises(SystemExit, match=r"different learning rates .*cannot be pooled"):
        pool_seeds.main([f"0={a}", f"1={b}", *args])
    with pytest.raises(SystemExit, match=r"nowhere/comparisons.json does not exist"):
        pool_seeds.main([f"0={a}", f"1={tmp_path / 'nowhere'}", *args])
    with pytest.raises(SystemExit, match=r"'s1' is not SEED=DIR"):
        pool_seeds.main([f"0={a}", "s1", *args])
    with pytest.raises(SystemExit, match=r"1 seed folder\(s\) given; pooling needs at least 2"):
        pool_seeds.main([f"0={a}", *args])
    assert not (tmp_path / "r.md").exists()
