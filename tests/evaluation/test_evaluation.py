"""Grid evaluation: one pass per set, exits equal model.encode, results round-trip, plots, ``m2d eval``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from matryoshka2d.cli import main
from matryoshka2d.data.datasets import STS_SETS, ScoredPairs
from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.evaluation.grid import GridResult, evaluate_grid
from matryoshka2d.evaluation.metrics import exit_cosines

WORDS = ("a man woman dog cat child is playing eating running on in the park street guitar piano ball food "
         "water tree small big red blue green happy sad fast slow book house car river").split()


def random_pairs(name: str, n: int = 24, seed: int = 0) -> ScoredPairs:
    """``n`` pairs drawn from 16 sentences of 1..16 words, no two pairs with the same pair of lengths.

    Distinct length pairs keep the cosines free of ties even for a tokenizer that maps every word to
    [UNK], so rank-based comparisons are stable; sentences recur across pairs (fewer than 2n unique).
    """
    rng = np.random.default_rng(seed)
    pool = [" ".join(rng.choice(WORDS, size=k)) for k in range(1, 17)]
    combos = [(i, j) for i in range(16) for j in range(i + 1, 16)]
    chosen = [combos[k] for k in rng.choice(len(combos), size=n, replace=False)]
    flip = rng.random(n) < 0.5
    s1 = [pool[j] if f else pool[i] for (i, j), f in zip(chosen, flip, strict=True)]
    s2 = [pool[i] if f else pool[j] for (i, j), f in zip(chosen, flip, strict=True)]
    return ScoredPairs(name, s1, s2, rng.uniform(0, 5, n))


def encode_cos(model, pairs: ScoredPairs, layer: int, dim: int) -> np.ndarray:  # noqa: ANN001
    a = model.encode(pairs.sentences1, layer=layer, dim=dim)
    b = model.encode(pairs.sentences2, layer=layer, dim=dim)
    return (a * b).sum(axis=1)


# ----------------------------------------------------------------------------------- dims
def test_matryoshka_dims() -> None:
    assert matryoshka_dims(384) == [8, 16, 32, 64, 128, 256, 384]
    assert matryoshka_dims(768) == [8, 16, 32, 64, 128, 256, 512, 768]
    assert matryoshka_dims(32) == [8, 16, 32]
    assert matryoshka_dims(8) == [8]
    assert matryoshka_dims(5) == [5]
    with pytest.raises(ValueError, match="hidden_size 0 must be a positive integer"):
        matryoshka_dims(0)


def test_exit_cosines_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 16)).astype(np.float32)
    i1, i2 = rng.integers(0, 10, 7), rng.integers(0, 10, 7)
    got = exit_cosines(emb, i1, i2, [3, 16])
    for k, d in enumerate([3, 16]):
        a, b = emb[i1, :d], emb[i2, :d]
        want = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)


# ----------------------------------------------------------------------------------- the grid
def test_oracle_gets_spearman_100(tiny_model) -> None:  # noqa: ANN001
    base = random_pairs("oracle", n=30, seed=1)
    s1, s2 = base.sentences1, base.sentences2
    gold = encode_cos(tiny_model, ScoredPairs("t", s1, s2, np.zeros(len(s1))), 3, 16)
    oracle = ScoredPairs("oracle", s1, s2, gold)
    result = evaluate_grid(tiny_model, [oracle], layers=[3], dims=[16])
    assert result.spearman("oracle", 3, 16) == pytest.approx(100, abs=1e-6)
    assert result.pearson("oracle", 3, 16) == pytest.approx(100, abs=1e-3)


def test_grid_shape_and_values_equal_encode_per_exit(tiny_model) -> None:  # noqa: ANN001
    sets = {"a": random_pairs("a", 20, 2)}
    result = evaluate_grid(tiny_model, sets, batch_size=4)
    assert result.layers == [1, 2, 3, 4] and result.dims == [8, 16, 32]
    assert len(result.records) == 4 * 3
    assert result.predictions["a"].shape == (4, 3, 20)
    for name, pairs in sets.items():
        for i, n in enumerate(result.layers):
            for j, d in enumerate(result.dims):
                cos = encode_cos(tiny_model, pairs, n, d)
                np.testing.assert_allclose(result.predictions[name][i, j], cos, atol=2e-5)
                want = 100 * stats.spearmanr(pairs.scores, cos)[0]
                assert result.spearman(name, n, d) == pytest.approx(want, abs=1e-3)
                assert result.pearson(name, n, d) == pytest.approx(100 * stats.pearsonr(pairs.scores, cos)[0],
                                                                   abs=1e-3)


def test_one_backbone_pass_per_set_and_no_sentence_twice(tiny_model) -> None:  # noqa: ANN001
    pairs = random_pairs("x", 40, 4)
    unique = pairs.unique_sentences()[0]
    assert len(unique) < 80  # pairs share sentences
    calls: list[int] = []
    tiny_model.backbone.register_forward_hook(lambda *_: calls.append(1))
    seen: list[str] = []

    class Spy:  # the tokenizer, recording every text it is given
        def __init__(self, tokenizer):  # noqa: ANN001
            self.tokenizer = tokenizer

        def __call__(self, texts, **kwargs):  # noqa: ANN001, ANN003, ANN204
            seen.extend(texts)
            return self.tokenizer(texts, **kwargs)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.tokenizer, name)

    tiny_model.tokenizer = Spy(tiny_model.tokenizer)
    result = evaluate_grid(tiny_model, [pairs], layers=[1, 2, 4], dims=[8, 32], batch_size=8)
    assert len(calls) == math.ceil(len(unique) / 8)
    assert sorted(seen) == sorted(unique)  # every unique sentence exactly once
    assert len(result.records) == 3 * 2


def test_only_the_deepest_requested_block_runs(tiny_model) -> None:  # noqa: ANN001
    ran: list[int] = []
    for k, block in enumerate(tiny_model.backbone.encoder.layer, 1):
        block.register_forward_hook(lambda *_, k=k: ran.append(k))
    evaluate_grid(tiny_model, [random_pairs("x", 8)], layers=[1, 2], dims=[8], batch_size=64)
    assert sorted(set(ran)) == [1, 2]


def test_training_mode_restored_and_no_grad(tiny_model) -> None:  # noqa: ANN001
    tiny_model.train()
    result = evaluate_grid(tiny_model, random_pairs("x", 10), layers=[2], dims=[16])
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())
    assert torch.is_grad_enabled()
    assert result.sets == ["x"]


def test_evaluate_grid_errors(tiny_model) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="sets is empty"):
        evaluate_grid(tiny_model, {})
    with pytest.raises(ValueError, match=r"layer 5 is out of range: this model has layers 1..4"):
        evaluate_grid(tiny_model, random_pairs("x"), layers=[5])
    with pytest.raises(ValueError, match=r"dim 64 is out of range"):
        evaluate_grid(tiny_model, random_pairs("x"), dims=[64])
    with pytest.raises(ValueError, match="two sets are named 'x'"):
        evaluate_grid(tiny_model, [random_pairs("x"), random_pairs("x", seed=5)])
    with pytest.raises(ValueError, match="batch_size 0 must be a positive integer"):
        evaluate_grid(tiny_model, random_pairs("x"), batch_size=0)


def test_constant_predictions_give_nan_not_a_crash(tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    same = ScoredPairs("same", ["a dog", "a cat", "the man"], ["a dog", "a cat", "the man"], [1.0, 2.0, 3.0])
    result = evaluate_grid(tiny_model, same, layers=[1], dims=[8])
    assert math.isnan(result.spearman("same", 1, 8))
    assert result.to_dict()["results"][0]["spearman"] is None
    loaded = GridResult.load(result.save(tmp_path / "r.json"))
    assert math.isnan(loaded.spearman("same", 1, 8))


# ----------------------------------------------------------------------------------- result object
@pytest.fixture(scope="module")
def seven(tiny_dir: Path) -> GridResult:
    from matryoshka2d import MatryoshkaEncoder

    model = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean")
    sets = {name: random_pairs(name, 12, k) for k, name in enumerate(STS_SETS)}
    return evaluate_grid(model, sets, layers=[2, 4], dims=[8, 32], model_name="tiny")


def test_average_views_and_tables(seven: GridResult) -> None:
    assert seven.has_average()
    avg = seven.average()
    assert avg[(2, 8)] == pytest.approx(np.mean([seven.spearman(s, 2, 8) for s in STS_SETS]))
    assert seven.spearman("avg", 4, 32) == pytest.approx(avg[(4, 32)])
    md = seven.to_markdown()
    assert "### tiny — stsb (Spearman x100, n=12)" in md
    assert "### tiny — avg (Spearman x100, 7 sets)" in md
    assert "| layer \\ dim | 8 | 32 |" in md
    assert f"| 4 | {seven.spearman('sickr', 4, 8):.2f} | {seven.spearman('sickr', 4, 32):.2f} |" in md
    csv_lines = seven.to_csv().splitlines()
    assert csv_lines[0] == "set,layer,dim,spearman,pearson,n"
    assert len(csv_lines) == 1 + 8 * 4  # 7 sets + avg, 2 layers x 2 dims
    d = seven.to_dict()
    assert d["model"] == "tiny" and len(d["results"]) == 28 and len(d["average"]) == 4
    part = GridResult("tiny", [r for r in seven.records if r["set"] != "sts12"])
    assert not part.has_average() and part.average_records() == []
    with pytest.raises(ValueError, match=r"cannot average: sets \['sts12'\] are not in this result"):
        part.average()
    with pytest.raises(KeyError, match="no result for set 'stsb' layer 3 dim 8"):
        seven.spearman("stsb", 3, 8)


def test_save_load_round_trip(seven: GridResult, tmp_path: Path) -> None:
    path = seven.save(tmp_path / "out" / "res.json")
    obj = json.loads(path.read_text())
    assert set(obj) >= {"model", "results", "metadata", "format_version", "predictions"}
    assert obj["predictions"]["file"] == "res.preds.npz" and (tmp_path / "out" / "res.preds.npz").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = GridResult.load(path)
    assert loaded.records == seven.records and loaded.model == "tiny"
    for s in STS_SETS:
        np.testing.assert_array_equal(loaded.predictions[s], seven.predictions[s])
        np.testing.assert_array_equal(loaded.gold[s], seven.gold[s])


def test_load_errors(seven: GridResult, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such result file"):
        GridResult.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a JSON result file"):
        GridResult.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"records": []}')
    with pytest.raises(ValueError, match=r"other\.json: not an evaluation result \(needs keys 'model' and"):
        GridResult.load(tmp_path / "other.json")
    (tmp_path / "new.json").write_text('{"format_version": 99, "model": "m", "results": []}')
    with pytest.raises(ValueError, match="format_version 99 is newer than this library's 1; upgrade"):
        GridResult.load(tmp_path / "new.json")
    path = seven.save(tmp_path / "r.json")
    (tmp_path / "r.preds.npz").unlink()
    loaded = GridResult.load(path)  # results still load; only the bootstrap needs the sidecar
    assert loaded.predictions == {} and loaded.records == seven.records


# ----------------------------------------------------------------------------------- plots
def test_heatmap_and_curves_write_pngs(seven: GridResult, tmp_path: Path) -> None:
    from matryoshka2d.evaluation.plots import plot_dim_curves, plot_heatmaps

    for path in (plot_heatmaps(seven, tmp_path / "h.png"),
                 plot_dim_curves([seven, seven], tmp_path / "c.png", labels=["A", "B"], set_name="stsb")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_exit_gap_plot_draws_each_comparison_and_refuses_no_rows(tmp_path: Path) -> None:
    from matryoshka2d.evaluation.plots import plot_exit_gaps

    rows = [{"comparison": f"{m} - separate", "layer": k, "dim": d, "delta": k - 2.0 + d / 256,
             "low": k - 3.0, "high": k - 1.0 + d / 128} for m in ("dense", "2dmse") for k in (2, 4) for d in (64, 256)]
    path = plot_exit_gaps(rows, tmp_path / "g.png", set_name="stsb")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one comparison"):
        plot_exit_gaps([], tmp_path / "none.png", set_name="stsb")
    assert not (tmp_path / "none.png").exists()


def test_exit_gap_legend_sits_outside_the_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matryoshka2d.evaluation import plots

    figures = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    rows = [{"comparison": f"{m} - separate", "layer": k, "dim": d, "delta": -0.5, "low": -1.0, "high": 0.0}
            for m in ("dense", "2dmse") for k in (2, 4) for d in (64, 256)]
    plots.plot_exit_gaps(rows, tmp_path / "g.png", set_name="stsb")
    (fig,) = figures
    assert all(ax.get_legend() is None for ax in fig.axes)  # no panel's lines hidden under a legend box
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["within 1", "layer 2", "layer 4"]


def test_plots_without_matplotlib_say_how_to_install(seven: GridResult, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from matryoshka2d.evaluation.plots import plot_heatmaps

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"plots need matplotlib: pip install -e '\.\[plot\]' in the matryoshka2d "):
        plot_heatmaps(seven, tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()


# ----------------------------------------------------------------------------------- CLI
def write_sts_dir(root: Path) -> Path:
    """A small synthetic data folder with stsb and sickr test splits."""
    for k, name in enumerate(("stsb", "sickr")):
        pairs = random_pairs(name, 16, 10 + k)
        (root / name).mkdir(parents=True)
        rows = "".join(f"{a}\t{b}\t{s:.2f}\n" for a, b, s in zip(pairs.sentences1, pairs.sentences2, pairs.scores,
                                                                 strict=True))
        (root / name / "test.tsv").write_text("sentence1\tsentence2\tscore\n" + rows, encoding="utf-8")
    return root


def test_cli_eval(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_sts_dir(tmp_path / "data")
    out, png = tmp_path / "res.json", tmp_path / "heat.png"
    code = main(["-q", "eval", str(tiny_dir), "--sets", "stsb,sickr", "--layers", "2,4", "--data-dir", str(data),
                 "--batch-size", "8", "--output", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "— stsb (Spearman x100, n=16)" in printed and "— sickr (Spearman x100, n=16)" in printed
    assert "| layer \\ dim | 8 | 16 | 32 |" in printed
    assert "evaluated 2 layers x 3 dims on 2 set(s)" in printed
    result = GridResult.load(out)
    assert result.layers == [2, 4] and result.dims == [8, 16, 32] and result.sets == ["stsb", "sickr"]
    assert result.metadata["split"] == "test" and result.metadata["wall_s"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # refuses to overwrite without --overwrite
    assert main(["eval", str(tiny_dir), "--sets", "stsb", "--data-dir", str(data), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sets", "stsb,foo"], r"--sets 'stsb,foo': unknown set\(s\) \['foo'\]; choose from sts12"),
        (["--sets", "stsb", "--split", "validation"], "stsb has no split 'validation'; valid splits"),
        (["--sets", "stsb", "--layers", "9"], r"layer 9 is out of range 1..4"),
        (["--sets", "stsb", "--dims", "8,99"], r"dim 99 is out of range 1..32"),
        (["--sets", "sts12"], r"sts12.test\.tsv: no such file"),
    ],
)
def test_cli_eval_errors(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                         message: str) -> None:
    data = write_sts_dir(tmp_path / "data")
    assert main(["eval", str(tiny_dir), "--data-dir", str(data), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2d eval: error: ")
    assert __import__("re").search(message, err), err


@pytest.mark.slow
def test_real_minilm_stsb_full_exit(shared_data: Path) -> None:
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.data.datasets import load_sts

    model = MatryoshkaEncoder.from_pretrained("minilm")
    result = evaluate_grid(model, {"stsb": load_sts("stsb", data_dir=shared_data)}, layers=[6], dims=[384])
    assert 80 < result.spearman("stsb", 6, 384) < 86  # all-MiniLM-L6-v2 scores ~82 on STS-B test
