"""Paired bootstrap, result matching and ``m2d compare`` (with its plots)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from matryoshka2d.cli import main
from matryoshka2d.data.datasets import STS_SETS
from matryoshka2d.evaluation.compare import PairedBootstrap, compare_results, paired_bootstrap
from matryoshka2d.evaluation.grid import GridResult
from matryoshka2d.evaluation.metrics import correlations


# ----------------------------------------------------------------------------------- bootstrap
def test_vectorised_spearman_equals_scipy_on_explicit_resamples() -> None:
    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, 200), 1)  # many ties in the gold scores
    pred = gold + rng.normal(0, 1, 200)
    pred[:30] = pred[0]  # and in the predictions
    boot = PairedBootstrap(gold, draws=40, seed=7)
    idx = np.random.default_rng(7).integers(0, 200, size=(40, 200))  # the same draws, made explicit
    want = [100 * stats.spearmanr(gold[i], pred[i])[0] for i in idx]
    np.testing.assert_allclose(boot.spearman_draws(pred), want, atol=1e-9)


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    rng = np.random.default_rng(1)
    gold = rng.uniform(size=300)
    a, b = gold + rng.normal(0, 0.5, 300), gold + rng.normal(0, 0.4, 300)
    first = paired_bootstrap(gold, a, b, draws=300, seed=3)
    assert paired_bootstrap(gold, a, b, draws=300, seed=3) == first
    assert paired_bootstrap(gold, a, b, draws=300, seed=4) != first
    assert first["low"] <= first["delta"] <= first["high"]
    assert first["delta"] == pytest.approx(100 * (stats.spearmanr(gold, b)[0] - stats.spearmanr(gold, a)[0]))


def test_ci_covers_the_true_difference() -> None:
    """Population of 200k pairs where B is truly better; samples of 400 pairs, 95% CIs from 400 draws."""
    rng = np.random.default_rng(0)
    gold = rng.uniform(size=200_000)
    a, b = gold + rng.normal(0, 0.35, gold.size), gold + rng.normal(0, 0.3, gold.size)
    truth = 100 * (stats.spearmanr(gold, b)[0] - stats.spearmanr(gold, a)[0])
    assert truth > 0
    covered = 0
    for k in range(40):
        i = rng.choice(gold.size, 400, replace=False)
        ci = paired_bootstrap(gold[i], a[i], b[i], draws=400, seed=k)
        covered += ci["low"] <= truth <= ci["high"]
    assert covered >= 34  # nominal 95%: 38 of 40 expected; 34 leaves room for sampling noise


def test_identical_models_have_a_zero_difference() -> None:
    rng = np.random.default_rng(2)
    gold, pred = rng.uniform(size=100), rng.uniform(size=100)
    ci = paired_bootstrap(gold, pred, pred, draws=100)
    assert ci["delta"] == 0 and ci["low"] == 0 and ci["high"] == 0 and ci["p_le_0"] == 1.0


def test_bootstrap_argument_errors() -> None:
    with pytest.raises(ValueError, match="draws 0 must be a positive integer"):
        PairedBootstrap(np.arange(5.0), draws=0)
    with pytest.raises(ValueError, match="bootstrap needs at least 3 pairs, got 2"):
        PairedBootstrap(np.arange(2.0))
    with pytest.raises(ValueError, match="pred has 4 values, the gold scores 5"):
        PairedBootstrap(np.arange(5.0), draws=3).spearman_draws(np.arange(4.0))
    with pytest.raises(ValueError, match=r"confidence 1.5 must be in \(0, 1\)"):
        paired_bootstrap(np.arange(5.0), np.arange(5.0), np.arange(5.0), draws=5, confidence=1.5)


# ----------------------------------------------------------------------------------- comparing results
def synthetic_result(model: str, noise: float, *, sets=STS_SETS, layers=(1, 2), dims=(8, 16), n: int = 60,
                     seed: int = 0) -> GridResult:
    """A GridResult whose predictions are gold + noise (deeper/wider exits are less noisy)."""
    rng = np.random.default_rng(seed)
    records, preds, golds = [], {}, {}
    for k, name in enumerate(sets):
        gold = np.random.default_rng(100 + k).uniform(0, 5, n)  # same gold for every model
        cube = np.empty((len(layers), len(dims), n), dtype=np.float32)
        for i, layer in enumerate(layers):
            for j, dim in enumerate(dims):
                cube[i, j] = gold + rng.normal(0, noise * 4 / (layer + dim / 8), n)
                sp, pe = correlations(gold, cube[i, j])
                records.append({"set": name, "layer": layer, "dim": dim, "spearman": sp, "pearson": pe, "n": n})
        preds[name], golds[name] = cube, gold
    return GridResult(model, records, preds, golds, {"layers": list(layers), "dims": list(dims)})


def test_compare_results_side_by_side_with_cis() -> None:
    a, b = synthetic_result("A", 2.0, seed=1), synthetic_result("B", 1.0, seed=2)
    comp = compare_results([a, b], draws=200, seed=0)
    ci = comp.cis[(0, 1)][("stsb", 2, 16)]
    assert ci["delta"] == pytest.approx(b.spearman("stsb", 2, 16) - a.spearman("stsb", 2, 16))
    assert ci["low"] <= ci["delta"] <= ci["high"]
    assert ("avg", 1, 8) in comp.cis[(0, 1)]  # all seven sets: the average gets a CI too
    assert len(comp.cis[(0, 1)]) == (7 + 1) * 2 * 2
    md = comp.to_markdown()
    assert "## stsb (n=60)" in md and "## average of the 7 STS sets" in md
    assert "| layer | dim | A | B | Δ B−A | 95% CI |" in md
    row = (f"| 2 | 16 | {a.spearman('stsb', 2, 16):.2f} | {b.spearman('stsb', 2, 16):.2f} | "
           f"{ci['delta']:+.2f}")
    assert row in md
    assert f"[{ci['low']:+.2f}, {ci['high']:+.2f}]" in md
    assert comp.to_dict()["differences"][0].keys() >= {"a", "b", "set", "layer", "dim", "delta", "low", "high"}
    again = compare_results([a, b], draws=200, seed=0)
    assert again.cis == comp.cis  # seeded: reproducible
    three = compare_results([a, b, synthetic_result("C", 1.5, seed=3)], draws=50)
    assert set(three.cis) == {(0, 1), (0, 2), (1, 2)}


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (dict(sets=STS_SETS[:6]), r"sets differ between A .* only in A: \['sickr'\], only in B: \[\]"),
        (dict(layers=(1, 3)), r"layers differ between A \(\[1, 2\]\) and B \(\[1, 3\]\)"),
        (dict(dims=(8,)), r"dims differ between A"),
        (dict(n=50), r"set 'sts12' has 60 pairs in A but 50 in B"),
    ],
)
def test_mismatched_results_say_what_differs(other: dict, message: str) -> None:
    a, b = synthetic_result("A", 1.0), synthetic_result("B", 1.0, **other)
    with pytest.raises(ValueError, match="results do not match: " + message):
        compare_results([a, b], draws=10)


def test_different_gold_scores_are_a_mismatch() -> None:
    a, b = synthetic_result("A", 1.0), synthetic_result("B", 1.0)
    b.gold["stsb"] = b.gold["stsb"][::-1].copy()
    with pytest.raises(ValueError, match="set 'stsb' has different gold scores in A and B"):
        compare_results([a, b], draws=10)


def test_missing_predictions_need_draws_zero() -> None:
    a, b = synthetic_result("A", 1.0), synthetic_result("B", 2.0)
    b_light = GridResult("B", b.records)
    with pytest.raises(ValueError, match=r"B has no per-pair predictions for .* pass --draws 0"):
        compare_results([a, b_light], draws=10)
    md = compare_results([a, b_light], draws=0).to_markdown()
    assert "no bootstrap" in md and "95% CI" not in md
    with pytest.raises(ValueError, match="compare needs at least 2 results, got 1"):
        compare_results([a])


# ----------------------------------------------------------------------------------- CLI and plots
def test_cli_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = synthetic_result("A", 2.0, seed=1), synthetic_result("B", 1.0, seed=2)
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"records": [
        {"impl": "torch", "layer": n, "dtype": "fp32", "batch_size": 32, "sentences_per_s": 900.0 / n}
        for n in (1, 2)]}))
    report, curves, pareto = tmp_path / "rep.md", tmp_path / "curves.png", tmp_path / "pareto.png"
    code = main(["-q", "compare", str(pa), str(pb), "--draws", "100", "--seed", "1", "--output", str(report),
                 "--plot", str(curves), "--benchmark", str(bench), "--pareto", str(pareto)])
    printed = capsys.readouterr().out
    assert code == 0
    text = report.read_text()
    assert text in printed and "# Comparison of A, B" in text and "(100 draws, seed 1)" in text
    for png in (curves, pareto):
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    # the same seed gives the same report
    assert main(["-q", "compare", str(pa), str(pb), "--draws", "100", "--seed", "1", "--labels", "A,B"]) == 0
    assert text in capsys.readouterr().out


def test_cli_compare_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = synthetic_result("A", 1.0), synthetic_result("B", 1.0, layers=(1, 3))
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    assert main(["compare", str(pa), str(pb)]) == 2
    assert re.search(r"m2d compare: error: results do not match: layers differ", capsys.readouterr().err)
    assert main(["compare", str(pa), str(tmp_path / "none.json")]) == 2
    assert "none.json: no such result file" in capsys.readouterr().err
    assert main(["compare", str(pa), str(pa), "--labels", "x"]) == 2
    assert "--labels has 1 names for 2 results" in capsys.readouterr().err
    assert main(["compare", str(pa), str(pa), "--pareto", str(tmp_path / "p.png")]) == 2
    assert "--benchmark and --pareto go together" in capsys.readouterr().err


def test_pareto_rejects_exits_missing_from_the_result(tmp_path: Path) -> None:
    from matryoshka2d.evaluation.plots import plot_pareto

    a = synthetic_result("A", 1.0)
    with pytest.raises(ValueError, match=r"benchmarked exit layer 5 dim 16 is not in the result"):
        plot_pareto(a, {"records": [{"layer": 5, "sentences_per_s": 10.0}]}, tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"expected \{'records'"):
        plot_pareto(a, {"rows": []}, tmp_path / "p.png")

