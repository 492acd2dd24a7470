"""The one result type of every evaluation grid (STS and retrieval) and the one compare over its units."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d.cli import main
from matryoshka2d.evaluation.compare import compare_results
from matryoshka2d.evaluation.metrics import correlations
from matryoshka2d.evaluation.result import GridResult, RetrievalResult, load_result

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval-results-v1"  # written by the code before this type
METRICS = ["ndcg@10", "recall@100", "mrr@10", "map@100"]


def sts_result(model: str, noise: float, *, seed: int, n: int = 40) -> GridResult:
    """Two STS sets at layers 1-2 x dims 8, 16: predictions are gold + noise (shared gold)."""
    rng = np.random.default_rng(seed)
    records, preds, golds = [], {}, {}
    for k, name in enumerate(("stsb", "sickr")):
        gold = np.random.default_rng(100 + k).uniform(0, 5, n)
        cube = (gold + rng.normal(0, noise, (2, 2, n))).astype(np.float32)
        for i, layer in enumerate((1, 2)):
            for j, dim in enumerate((8, 16)):
                sp, pe = correlations(gold, cube[i, j])
                records.append({"set": name, "layer": layer, "dim": dim, "spearman": sp, "pearson": pe, "n": n})
        preds[name], golds[name] = cube, gold
    return GridResult(model, records, preds, golds, {"layers": [1, 2], "dims": [8, 16]})


def retrieval_result(model: str, shift: float, *, seed: int, n: int = 30) -> RetrievalResult:
    """One retrieval set at layers 1-2 x dims 8, 16: per-query values around 50 + ``shift``."""
    rng = np.random.default_rng(seed)
    table = np.clip(50 + shift + rng.normal(0, 15, (len(METRICS), 2, 2, n)), 0, 100).astype(np.float32)
    records = [{"set": "scifact", "layer": layer, "dim": dim,
                **{m: float(table[k, i, j].astype(np.float64).mean()) for k, m in enumerate(METRICS)}, "n": n}
               for i, layer in enumerate((1, 2)) for j, dim in enumerate((8, 16))]
    asym = [{"set": "scifact", "query_layer": q, "doc_layer": d, "dim": 16, **{m: 40.0 + q + d for m in METRICS},
             "n": n} for q in (1, 2) for d in (1, 2)]
    return RetrievalResult(model, records, METRICS, {"scifact": table}, {"scifact": [f"q{i}" for i in range(n)]},
                           {"layers": [1, 2], "dims": [8, 16]}, asym)


def same_result(a: GridResult, b: GridResult) -> None:
    assert type(a) is type(b) and a.task == b.task and a.model == b.model and a.metrics == b.metrics
    assert a.records == b.records and a.metadata == b.metadata and a.asymmetric == b.asymmetric
    assert a.predictions.keys() == b.predictions.keys() and a.units.keys() == b.units.keys()
    for s in a.predictions:
        np.testing.assert_array_equal(a.predictions[s], b.predictions[s])
        np.testing.assert_array_equal(a.units[s], b.units[s])
    assert a.to_markdown() == b.to_markdown() and a.to_csv() == b.to_csv()


# ----------------------------------------------------------------------------------- files written before
@pytest.mark.parametrize("stem", ["sts-a", "sts-b", "sts-light", "retrieval-a", "retrieval-b"])
def test_results_written_before_load_and_render_the_same(stem: str) -> None:
    result = load_result(FIXTURES / f"{stem}.json")
    task = stem.split("-")[0]
    assert result.task == task and isinstance(result, RetrievalResult) == (task == "retrieval")
    assert result.to_markdown() == (FIXTURES / f"{stem}.md").read_text()
    assert result.to_csv() == (FIXTURES / f"{stem}.csv").read_text()
    if stem == "sts-light":
        assert result.predictions == {} and result.units == {}
        return
    assert result.sets == list(result.predictions) == list(result.units)
    for s in result.sets:
        cells = (len(result.metrics),) * (task == "retrieval") + (len(result.layers), len(result.dims))
        assert result.predictions[s].shape == (*cells, result.n_units(s))
    if task == "retrieval":  # the old names read the same arrays
        assert isinstance(result.query_ids["nfcorpus"], list) and result.query_ids["nfcorpus"][0] == "q1-0"
        assert result.query_scores("nfcorpus", 2, 8).mean() == pytest.approx(result.score("nfcorpus", 2, 8))
        assert RetrievalResult.load(FIXTURES / f"{stem}.json").per_query.keys() == result.predictions.keys()
    else:
        assert GridResult.load(FIXTURES / f"{stem}.json").gold["stsb"].dtype == np.float64


@pytest.mark.parametrize("task", ["sts", "retrieval"])
def test_results_written_before_compare_as_they_did(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = load_result(FIXTURES / f"{task}-a.json"), load_result(FIXTURES / f"{task}-b.json")
    comp = compare_results([a, b], ["A", "B"], draws=50, seed=0)
    assert comp.to_markdown() == (FIXTURES / f"compare-{task}.md").read_text()
    before = json.loads((FIXTURES / f"compare-{task}.json").read_text())
    rows = comp.to_dict()["differences"]
    assert len(rows) == len(before["differences"])
    for now, then in zip(rows, before["differences"], strict=True):
        for key, value in then.items():  # the retrieval delta is now the difference of the scores shown
            assert now[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), key
    assert main(["-q", "compare", str(FIXTURES / f"{task}-a.json"), str(FIXTURES / f"{task}-b.json"), "--labels",
                 "A,B", "--draws", "50", "--seed", "0"]) == 0
    assert capsys.readouterr().out == (FIXTURES / f"cli-compare-{task}.txt").read_text()


def test_results_written_before_save_again_in_the_new_file(tmp_path: Path) -> None:
    for stem in ("sts-a", "retrieval-a"):
        old = load_result(FIXTURES / f"{stem}.json")
        again = load_result(old.save(tmp_path / f"{stem}.json"))
        same_result(old, again)
        assert json.loads((tmp_path / f"{stem}.json").read_text())["kind"] == old.task


# ----------------------------------------------------------------------------------- the type
@pytest.mark.parametrize("make", [sts_result, retrieval_result])
def test_save_load_round_trip_of_each_task(make, tmp_path: Path) -> None:  # noqa: ANN001
    result = make("m", 1.0, seed=1)
    path = result.save(tmp_path / "r.json")
    obj = json.loads(path.read_text())
    assert obj["kind"] == result.task and obj["metrics"] == result.metrics and obj["predictions"]["sets"] == result.sets
    assert (tmp_path / "r.preds.npz").is_file()
    loaded = GridResult.load(path)
    same_result(result, loaded)
    # both views of one type: the generic names and the task's own
    assert loaded.n_units(loaded.sets[0]) == loaded.n_pairs(loaded.sets[0])
    if result.task == "retrieval":
        assert loaded.per_query is loaded.predictions and loaded.query_ids is loaded.units
        assert "asymmetric exits at dim 16" in loaded.to_markdown()
        assert loaded.asymmetric_table("scifact", 16)[2][1, 0] == 43.0
    else:
        assert loaded.gold is loaded.units and loaded.metric == "spearman"


def test_a_retrieval_loader_refuses_an_sts_file(tmp_path: Path) -> None:
    path = sts_result("m", 1.0, seed=1).save(tmp_path / "sts.json")
    with pytest.raises(ValueError, match=r"sts\.json: not a retrieval result \(it holds a sts grid\)"):
        RetrievalResult.load(path)
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({**obj, "kind": "ranking"}))
    with pytest.raises(ValueError, match=r"result kind 'ranking' is not one of \['sts', 'retrieval'\]"):
        GridResult.load(path)


def test_a_sidecar_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    path = retrieval_result("m", 0.0, seed=1).save(tmp_path / "r.json")
    with np.load(tmp_path / "r.preds.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["scores_0"] = arrays["scores_0"][:, :, :, :5]
    np.savez(tmp_path / "other.preds.npz", **arrays)
    obj = json.loads(path.read_text())
    obj["predictions"].update(file="other.preds.npz", sha256=None)
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"other\.preds\.npz: scores_0 / queries_0 \(scifact\) have shapes "
                                         r"\(4, 2, 2, 5\) / \(30,\), expected \(4, 2, 2, 30\)"):
        load_result(path)


def test_merging_needs_one_task() -> None:
    sts, ret = sts_result("m", 1.0, seed=1), retrieval_result("m", 0.0, seed=1)
    with pytest.raises(ValueError, match=r"cannot merge grids with .* \(sts\) and .* \(retrieval\)"):
        sts.merged(ret)
    more = retrieval_result("m", 0.0, seed=2)
    more.records = [{**r, "set": "nfcorpus"} for r in more.records]
    more.predictions, more.units = {"nfcorpus": more.predictions["scifact"]}, {"nfcorpus": more.units["scifact"]}
    merged = ret.merged(RetrievalResult("m", more.records, METRICS, more.predictions, more.units))
    assert isinstance(merged, RetrievalResult) and merged.sets == ["scifact", "nfcorpus"]


# ----------------------------------------------------------------------------------- one compare
def test_compare_of_two_sts_results_bootstraps_the_pairs() -> None:
    a, b = sts_result("A", 2.0, seed=1), sts_result("B", 0.5, seed=2)
    comp = compare_results([a, b], draws=200, seed=0)
    ci = comp.cis[(0, 1)][("stsb", 2, 16)]
    assert ci["delta"] == pytest.approx(b.spearman("stsb", 2, 16) - a.spearman("stsb", 2, 16))
    assert 0 < ci["low"] <= ci["delta"] <= ci["high"]  # far less noise: B is better, and the CI says so
    assert "paired bootstrap over pairs" in comp.to_markdown() and "## stsb (n=40)" in comp.to_markdown()
    assert comp.to_dict()["kind"] == "sts" and comp.to_dict()["differences"][0]["b_spearman"] > 0
    same = compare_results([a, a], ["x", "y"], draws=50)
    assert all(c["low"] == c["high"] == c["delta"] == 0 for c in same.cis[(0, 1)].values())
    with pytest.raises(ValueError, match="the bootstrap of STS results is over Spearman; metric 'pearson'"):
        compare_results([a, b], metric="pearson", draws=10)
    table = compare_results([a, b], metric="pearson", draws=0).to_markdown()
    assert f"| 1 | 8 | {a.pearson('stsb', 1, 8):.2f} | {b.pearson('stsb', 1, 8):.2f} |" in table


def test_compare_of_two_retrieval_results_bootstraps_the_queries() -> None:
    a, b = retrieval_result("A", 0.0, seed=1), retrieval_result("B", 12.0, seed=2)
    comp = compare_results([a, b], draws=300, seed=0, metric="mrr@10")
    ci = comp.cis[(0, 1)][("scifact", 1, 8)]
    assert ci["delta"] == pytest.approx(b.score("scifact", 1, 8, "mrr@10") - a.score("scifact", 1, 8, "mrr@10"))
    assert 0 < ci["low"] <= ci["delta"] <= ci["high"]
    text = comp.to_markdown()
    assert "MRR@10 x100" in text and "paired bootstrap over queries" in text and "## scifact (n=30 queries)" in text
    other = retrieval_result("C", 0.0, seed=3)
    other.units["scifact"] = [f"x{i}" for i in range(30)]
    with pytest.raises(ValueError, match="set 'scifact' has different queries in A and C"):
        compare_results([a, other], ["A", "C"], draws=10)


def test_results_of_different_tasks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sts, ret = sts_result("s", 1.0, seed=1), retrieval_result("r", 0.0, seed=1)
    with pytest.raises(ValueError, match=r"cannot compare results of different tasks \(s: sts, r: retrieval\); "
                                         "compare each task separately"):
        compare_results([sts, ret], draws=0)
    shutil.copy(FIXTURES / "sts-light.json", tmp_path / "light.json")
    code = main(["-q", "compare", str(tmp_path / "light.json"), str(ret.save(tmp_path / "r.json"))])
    err = capsys.readouterr().err
    assert code == 2 and "cannot compare results of different tasks (model-light: sts, r: retrieval)" in err
    assert "Traceback" not in err
