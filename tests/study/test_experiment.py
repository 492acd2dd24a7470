"""The reproduction study on the tiny model: plan, train, evaluate, resume, report."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d.study.config import StudyConfig, Unit, load_study, plan_units
from matryoshka2d.study.runner import run_study
from tests.conftest import WORDS


def _rows(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = [rng.choice(WORDS) for _ in range(6)]
        k = rng.randint(0, 6)
        b = a[:k] + [rng.choice(WORDS) for _ in range(6 - k)]
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{k * 5 / 6:.3f}")
    return rows


@pytest.fixture()
def study_files(tmp_path: Path, tiny_dir: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    header = "sentence1\tsentence2\tscore"
    for name, splits in (("stsb", ("train", "dev", "test")), ("sickr", ("test",))):
        (data / name).mkdir(parents=True)
        for i, split in enumerate(splits):
            (data / name / f"{split}.tsv").write_text("\n".join([header, *_rows(i + len(name), 40)]) + "\n")
    train_cfg = tmp_path / "train.toml"
    train_cfg.write_text(
        f'[model]\nname = "{tiny_dir}"\n[data]\nsource = "stsb"\ndata_dir = "{data}"\n'
        '[train]\nbatch_size = 8\nmax_steps = 3\nlr = 1e-3\n[run]\nsave_every = 2\nprogress_bar = false\n'
    )
    study = tmp_path / "study.toml"
    study.write_text(
        f'[study]\nname = "tiny"\ntrain_config = "{train_cfg}"\nstrategies = ["original", "full", "2dmse", '
        f'"separate"]\nseeds = [0, 1]\nseparate_layers = [2]\nlr_grid = [1e-3, 1e-4]\n'
        f'eval_sets = ["stsb", "sickr"]\ndims = [8, 32]\nruns_dir = "{tmp_path / "runs"}"\n'
        f'output_dir = "{tmp_path / "docs" / "results"}"\ndraws = 50\n'
    )
    return study, data


def test_plan_covers_every_strategy_and_seed():
    study = StudyConfig(strategies=["original", "2dmse", "separate"], seeds=[0, 1], separate_layers=[1, 3])
    units = plan_units(study, num_layers=4, lr=None)
    assert Unit("original", None) in units
    labels = [(u.label, u.seed) for u in units]
    assert labels.count(("2dmse", 0)) == 1 and ("separate-3", 1) in labels and len(units) == 1 + 2 + 4


def test_study_runs_resumes_and_reports(study_files, monkeypatch):
    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    study = load_study(study_path)
    report = run_study(study)
    text = report.read_text()
    assert "## stsb test" in text and "## Paired bootstrap 95% CIs" in text and "separate (model of that depth)" in text
    selection = json.loads((Path(study.output_dir) / "selection.json").read_text())
    assert selection["chosen"] in ("0.001", "0.0001") and set(selection["scores"]) == {"0.001", "0.0001"}
    comparisons = json.loads((Path(study.output_dir) / "comparisons.json").read_text())
    assert any(r["comparison"] == "2dmse - full" and r["low"] <= r["delta"] <= r["high"] for r in comparisons)
    if importlib.util.find_spec("matplotlib"):  # the gap figure: 2dmse's layer-2 exit minus separate-2
        gaps = Path(study.output_dir) / "gaps_stsb.png"
        assert gaps.read_bytes()[:4] == b"\x89PNG" and f"({gaps.parent.name}/gaps_stsb.png)" in text
    # a second run trains nothing: every unit's final/ and eval.json is reused
    finals = sorted(Path(study.runs_dir).rglob("final"))
    mtimes = [p.stat().st_mtime for p in finals]
    run_study(study)
    assert [p.stat().st_mtime for p in finals] == mtimes and len(finals) == 2 * 2 + 2 + 2  # sweep + runs


def test_a_finished_unit_trained_with_other_settings_is_refused_not_reused(study_files, monkeypatch):
    from dataclasses import replace

    from matryoshka2d.study.runner import train_unit

    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    study = load_study(study_path)
    unit = Unit("full", 0, (("objective.strategy", "full"),), 1e-3)
    final = train_unit(study, unit)
    mtime = (final / "model.safetensors").stat().st_mtime
    # where and how often it saved or logged does not change the model: reused as it is
    assert train_unit(replace(study, overrides={"run.save_every": 1, "run.log_every": 2}), unit) == final
    for change, key in (({"train.weight_decay": 0.5}, "train.weight_decay"),
                        ({"train.max_steps": 6}, "train.max_steps"), ({"loss.name": "cosine"}, "loss.name")):
        with pytest.raises(ValueError, match=rf"trained with other settings .*{key} \(run: .*delete .* to retrain"):
            train_unit(replace(study, overrides=change), unit)
    assert (final / "model.safetensors").stat().st_mtime == mtime  # nothing was retrained or deleted


def test_a_study_that_swaps_the_model_reports_the_swapped_models_layers(study_files, monkeypatch, tmp_path):
    """``"model.name"`` in a study's overrides (the mpnet study on a MiniLM training config) is the base model:
    the original is that model, and the report's layers are its layers, not the training config's model's."""
    from tests.conftest import build_tiny_model

    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    deeper = build_tiny_model(tmp_path / "six", layers=6)  # the training config names a 4-layer model
    text = study_path.read_text().replace('"original", "full", "2dmse", "separate"', '"original", "full"')
    text = text.replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [1e-3, 1e-4]\n", "")
    study_path.write_text(text + f'[study.overrides]\n"model.name" = "{deeper}"\n')
    study = load_study(study_path)
    md = run_study(study).read_text()
    assert "every strategy at layers 1..6" in md and "| L6 d32 |" in md
    original = json.loads((Path(study.runs_dir) / "original" / "base" / "eval.json").read_text())
    assert max(r["layer"] for r in original["results"]) == 6  # the swapped model was evaluated, not the config's


def test_bad_study_files(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('[study]\nstrategies = ["2dmse", "magic"]\n')
    with pytest.raises(ValueError, match="unknown strategy 'magic'"):
        load_study(bad)
    bad.write_text('[study]\nseedz = [1]\n')
    with pytest.raises(ValueError, match=r"unknown field\(s\) study.seedz"):
        load_study(bad)
    with pytest.raises(FileNotFoundError, match="study file .* does not exist"):
        load_study(tmp_path / "missing.toml")


def test_results_merge_missing_sets_only(study_files, monkeypatch, tiny_dir):
    from matryoshka2d.data.datasets import load_sts
    from matryoshka2d.evaluation.grid import GridResult
    from matryoshka2d.study.runner import evaluate_unit

    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    study = load_study(study_path)
    unit = Unit("original", None)
    model_dir = tiny_dir
    stsb, sickr = load_sts("stsb", "test"), load_sts("sickr", "test")
    path = evaluate_unit(study, unit, model_dir, {"stsb": stsb})
    first = GridResult.load(path)
    assert first.sets == ["stsb"]
    mtime = path.stat().st_mtime_ns
    assert evaluate_unit(study, unit, model_dir, {"stsb": stsb}) == path and path.stat().st_mtime_ns == mtime
    both = GridResult.load(evaluate_unit(study, unit, model_dir, {"stsb": stsb, "sickr": sickr}))
    assert both.sets == ["stsb", "sickr"] and set(both.predictions) == {"stsb", "sickr"}
    assert both.table("stsb").tolist() == first.table("stsb").tolist()  # the stsb rows were kept, not redone
    alone = GridResult.load(evaluate_unit(study, Unit("other", 0), model_dir, {"sickr": sickr}))
    np.testing.assert_allclose(both.table("sickr"), alone.table("sickr"), rtol=1e-5)
    narrow = GridResult(alone.model, [r for r in alone.records if r["dim"] == 8])
    with pytest.raises(ValueError, match="cannot merge grids with layers/dims"):
        first.merged(narrow)


def test_units_are_evaluated_on_the_gpu_when_torch_sees_one(monkeypatch):
    import torch

    from matryoshka2d.study.runner import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device() == "cuda"


def test_priority_sets_first_dev_eval_and_variants(study_files, monkeypatch):
    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    text = study_path.read_text().replace('"original", "full", "2dmse", "separate"', '"full", "separate"')
    text = text.replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [1e-3, 1e-4]\n", "")
    report = study_path.parent / "research.md"
    text += (f'priority_sets = ["stsb"]\ndev_eval = true\nreport = "{report}"\ncommand = "make research"\n'
             '[study.variants.all-sum]\n"objective.n_layers_per_step" = "all"\n"objective.prior_weight" = 3.0\n'
             '"objective.kl_space" = "batch"\n"objective.kl_temperature" = 0.05\n')
    study_path.write_text(text)
    study = load_study(study_path)
    order = []
    import matryoshka2d.study.runner as experiment

    real = experiment.evaluate_unit
    monkeypatch.setattr(experiment, "evaluate_unit", lambda s, u, m, sets, **kw: order.append(
        (u.label, tuple(sets), kw.get("tag", "eval"))) or real(s, u, m, sets, **kw))
    assert run_study(study) == report
    tests = [o for o in order if o[2] == "eval"]
    assert tests[:3] == [("full", ("stsb",), "eval"), ("separate-2", ("stsb",), "eval"), ("all-sum", ("stsb",), "eval")]
    assert tests[3:] == [(lab, ("stsb", "sickr"), "eval") for lab in ("full", "separate-2", "all-sum")]
    assert {o[0] for o in order if o[2] == "dev"} == {"full", "separate-2", "all-sum"}
    md = report.read_text()
    assert md.startswith("# tiny") and "Generated by `make research`" in md
    assert "## stsb dev (for choosing) and training cost" in md and "| all-sum |" in md
    assert "| sickr | all-sum - separate | 2 |" in md  # variants are compared with the separate models
    if importlib.util.find_spec("matplotlib"):  # the report is not beside output_dir: its image links still resolve
        links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
        assert links and all((report.parent / link).is_file() for link in links), links
    cfg = json.loads(next(Path(study.runs_dir).glob("all-sum*/seed0/final/matryoshka2d.json")).read_text())
    objective = cfg["training"]["objective"]  # the variant's overrides reached its training run
    assert (objective["kl_space"], objective["kl_temperature"], objective["prior_weight"]) == ("batch", 0.05, 3.0)
    assert objective["n_layers_per_step"] == len(objective["layer_pool"])  # "all"


def test_plan_expands_a_separate_family_per_depth():
    heads = {"objective.strategy": "separate", "model.exit_heads": "linear", "model.head_on_last": True}
    study = StudyConfig(strategies=["full"], seeds=[0], separate_layers=[1, 3],
                        variants={"separate-head": heads, "sep-2": {**heads, "objective.separate_layers": 2}})
    units = {u.label: dict(u.overrides) for u in plan_units(study, num_layers=4, lr=None)}
    assert list(units) == ["full", "separate-head-1", "separate-head-3", "sep-2"]
    assert units["separate-head-3"] == {**heads, "objective.separate_layers": 3}
    assert units["sep-2"]["objective.separate_layers"] == 2  # a variant that fixes its depth stays one unit


def test_controls_separate_and_full_with_a_head_and_ese(study_files, monkeypatch):
    """Issue 19's controls: separate + head is a family of its own, compared with separate and compared
    against; full + head is compared with full on the full exit; ese is a strategy like any other."""
    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    text = study_path.read_text().replace('"original", "full", "2dmse", "separate"', '"full", "separate", "ese"')
    text = text.replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [1e-3, 1e-4]\n", "")
    text += ('[study.variants.sephead]\n"objective.strategy" = "separate"\n"model.exit_heads" = "linear"\n'
             '"model.head_on_last" = true\n[study.variants.full-head]\n"objective.strategy" = "full"\n'
             '"model.exit_heads" = "linear"\n"model.head_on_last" = true\n')
    study_path.write_text(text)
    study = load_study(study_path)
    md = run_study(study).read_text()
    assert "| sephead (model of that depth) |" in md and "| ese |" in md and "| full-head |" in md
    rows = json.loads((Path(study.output_dir) / "comparisons.json").read_text())
    comparisons = {(r["comparison"], r["layer"]) for r in rows if r["set"] == "stsb"}
    assert {("sephead - separate", 2), ("ese - separate", 2), ("ese - sephead", 2),
            ("full-head - full (full exit)", 4), ("ese - full (full exit)", 4)} <= comparisons
    assert not any(c.startswith("sephead-") for c, _ in comparisons)  # truncated models have no full exit
    assert "- **ese vs sephead models of the same depth** (STS-B test)" in md
    cfg = json.loads(next(Path(study.runs_dir).glob("sephead-2*/seed0/final/matryoshka2d.json")).read_text())
    assert cfg["exit_heads"]["layers"] == [2]  # the separate model of depth 2 got its head on its last exit


def test_unit_lock_lets_two_workers_share_a_study(tmp_path):
    from matryoshka2d.study.runner import for_each_unit, unit_lock

    study = StudyConfig(runs_dir=str(tmp_path / "runs"), seeds=[0])
    units = [Unit("full", 0), Unit("2dmse", 0), Unit("mrl", 0)]
    done = []
    with unit_lock(study, units[1], wait=False) as held:  # another worker is on 2dmse
        assert held
        with unit_lock(study, units[1], wait=False) as again:
            assert not again  # a second worker cannot take it
        for_each_unit(study, units[::2], done.append)
        assert done == [units[0], units[2]]
    for_each_unit(study, units, done.append)  # free again: taken
    assert done[2:] == units


def test_reproduce_seeds_runs_only_those_seeds(study_files, monkeypatch, capsys):
    from matryoshka2d.cli import main

    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    assert main(["reproduce", "--config", str(study_path), "--seeds", "3"]) == 2
    err = capsys.readouterr().err
    assert "--seeds '3'" in err and "seeds 0,1" in err
    assert main(["reproduce", "--config", str(study_path), "--seeds", "1"]) == 0
    runs = Path(load_study(study_path).runs_dir)
    trained = {p.parent.relative_to(runs).as_posix() for p in runs.rglob("eval.json")}
    # the lr is chosen at the study's first seed (dev.json only); every evaluated study run is of seed 1
    assert trained and all(t.endswith("seed1") or t.endswith("base") for t in trained)
    assert any(p.parent.name == "seed0" for p in runs.rglob("dev.json"))
    # the report says it covers seed 1 only, not the study's planned seeds
    text = (Path(load_study(study_path).output_dir).parent / "results.md").read_text()
    assert "**Seeds reported: 1** of the configured 0, 1; seed 0 left out (not run yet" in text


def test_first_moves_matching_units_to_the_front_and_a_typo_is_an_error(study_files, monkeypatch, capsys):
    from matryoshka2d.cli import main
    from matryoshka2d.study.runner import units_first

    units = [Unit("full", 0), Unit("2dmse", 0), Unit("separate-2", 0), Unit("dense-heads", 0),
             Unit("separate-head-2", 0), Unit("separate-head-4", 0), Unit("full", 1)]
    ordered = units_first(units, ["dense-heads", "separate-head-*"])
    assert [(u.label, u.seed) for u in ordered] == [
        ("dense-heads", 0), ("separate-head-2", 0), ("separate-head-4", 0),  # pattern order, then plan order
        ("full", 0), ("2dmse", 0), ("separate-2", 0), ("full", 1)]  # every other unit still runs, in plan order
    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    assert main(["reproduce", "--config", str(study_path), "--seeds", "0", "--first", "2dms"]) == 2
    err = capsys.readouterr().err
    assert "--first '2dms' matches none" in err and "2dmse" in err
    assert not list(Path(load_study(study_path).runs_dir).rglob("final"))  # refused before any training


def test_only_trains_the_matching_units_and_the_report_keeps_every_finished_run(study_files, monkeypatch, capsys):
    from matryoshka2d.cli import main
    from matryoshka2d.study.runner import units_only

    units = [Unit("full", 0), Unit("2dmse", 0), Unit("separate-2", 0), Unit("separate-head-2", 0), Unit("full", 1)]
    assert [(u.label, u.seed) for u in units_only(units, ["separate*", "2dmse"])] == [
        ("2dmse", 0), ("separate-2", 0), ("separate-head-2", 0)]  # plan order, not pattern order
    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    for bad in ("2dms", ","):  # a typo and an empty list are refused before any training
        assert main(["reproduce", "--config", str(study_path), "--seeds", "0", "--only", bad]) == 2
        assert "--only" in capsys.readouterr().err
    runs = Path(load_study(study_path).runs_dir)
    assert not list(runs.rglob("final"))

    def evaluated() -> set[str]:  # study runs (not the lr choice, which leaves dev.json only) with test results
        return {p.parent.parent.name.split("-lr")[0] for p in runs.rglob("seed0/eval.json")}

    assert main(["reproduce", "--config", str(study_path), "--seeds", "0", "--only", "2dmse"]) == 0
    assert evaluated() == {"2dmse"}  # full was trained for the lr choice, but only 2dmse was evaluated
    assert main(["reproduce", "--config", str(study_path), "--seeds", "0", "--only", "separate-*"]) == 0
    assert evaluated() == {"2dmse", "separate-2"}
    report = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote "))
    text = report.read_text()
    assert "2dmse" in text and "separate (model of that depth)" in text  # the earlier call's run is reported


def test_report_only_without_finished_runs_is_refused_and_keeps_the_report(study_files, monkeypatch, capsys):
    from matryoshka2d.cli import main

    study_path, data = study_files
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    study = load_study(study_path)
    out = Path(study.output_dir)
    out.mkdir(parents=True)
    (out / "selection.json").write_text("{not json")  # a damaged file is named, not a bare JSON error
    assert main(["reproduce", "--config", str(study_path), "--report-only"]) == 2
    assert f"{out / 'selection.json'}: not valid JSON" in capsys.readouterr().err
    kept = {"summary.json": '{"runs": {"full": []}}', "selection.json": '{"chosen": "0.001", "scores": {}}'}
    for name, text in kept.items():
        (out / name).write_text(text)
    assert main(["reproduce", "--config", str(study_path), "--seeds", "0", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "no finished run of seeds 0" in err and str(study.runs_dir) in err and "Traceback" not in err
    assert {name: (out / name).read_text() for name in kept} == kept  # nothing overwritten


STUDY_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.toml")
                       if "\n[study]\n" in f"\n{p.read_text(encoding='utf-8')}")


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_shipped_study_configs_load_and_plan(path: Path) -> None:
    from matryoshka2d.training.config import load_config

    study = load_study(path)
    root = path.parents[1]
    load_config(root / study.train_config)  # the training config it names exists and is valid
    units = plan_units(study, num_layers=6, lr=1e-4)
    labels = [(u.label, u.seed) for u in units]
    assert units and len(labels) == len(set(labels))  # no run planned twice
    for unit in units:
        load_config(root / study.train_config, overrides={**study.overrides, **dict(unit.overrides)})


def _beir_files(folder: Path, seed: int = 0) -> None:
    """A tiny BEIR set: 40 documents, one relevant document per query, train / dev / test qrels."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(40)]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.tsv").write_text("doc_id\ttitle\ttext\n" + "".join(f"d{i}\t\t{t}\n" for i, t in enumerate(docs)))
    (folder / "queries.tsv").write_text("query_id\ttext\n" + "".join(  # 1 word of its document, 4 random
        f"q{i}\t{' '.join(rng.sample(docs[i].split(), 1) + [rng.choice(WORDS) for _ in range(4)])}\n"
        for i in range(40)))
    for split, ids in (("train", range(0, 24)), ("dev", range(24, 32)), ("test", range(32, 40))):
        (folder / "qrels" / f"{split}.tsv").write_text("query_id\tdoc_id\tscore\n" + "".join(
            f"q{i}\td{i}\t1\n" for i in ids))


def test_retrieval_study_trains_evaluates_and_compares_over_queries(tmp_path, tiny_dir, monkeypatch):
    """Issue 19 step 4 through the study runner: a BEIR set as the test set (retrieval.json per run, nDCG@10
    over the corpus), the lr chosen on its dev split, CIs from a paired bootstrap over queries."""
    from matryoshka2d.evaluation.retrieval_compare import compare_retrieval
    from matryoshka2d.evaluation.retrieval_result import RetrievalResult

    data = tmp_path / "data"
    _beir_files(data / "nfcorpus")
    monkeypatch.setenv("M2D_DATA_DIR", str(data))
    train_cfg = tmp_path / "train.toml"
    train_cfg.write_text(
        f'[model]\nname = "{tiny_dir}"\n[data]\nsource = "nfcorpus"\ndata_dir = "{data}"\n[loss]\nname = "ibn"\n'
        '[train]\nbatch_size = 8\nmax_steps = 6\nlr = 1e-2\n[run]\nsave_every = 0\nprogress_bar = false\n')
    study_path = tmp_path / "study.toml"
    study_path.write_text(
        f'[study]\nname = "tiny retrieval"\ntrain_config = "{train_cfg}"\nstrategies = ["full", "separate"]\n'
        'seeds = [0]\nseparate_layers = [2]\nlr_grid = [1e-2, 1e-3]\nselection_strategies = ["full"]\n'
        'selection_set = "nfcorpus"\neval_sets = ["nfcorpus"]\ndev_eval = true\ndims = [8, 32]\n'
        f'runs_dir = "{tmp_path / "runs"}"\noutput_dir = "{tmp_path / "out"}"\nreport = "{tmp_path / "r.md"}"\n'
        'draws = 50\n[study.variants.dense-heads]\n"objective.strategy" = "dense"\n"model.exit_heads" = "linear"\n')
    study = load_study(study_path)
    assert study.retrieval and study.result_tag == "retrieval"
    md = run_study(study).read_text()
    assert "## nfcorpus test: every strategy" in md and "nDCG@10 x100" in md and "resamples of queries" in md
    assert "| dense-heads |" in md and "| separate (model of that depth) |" in md and "STS12-16" not in md
    assert "- **dense-heads vs separately trained models of the same depth** (NFCorpus test)" in md
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert selection["set"] == "nfcorpus dev" and "ndcg@10" in selection["rule"]
    runs = Path(study.runs_dir)
    assert not list(runs.rglob("eval.json")) and len(list(runs.rglob("retrieval.json"))) == 3
    assert len(list(runs.rglob("retrieval.preds.npz"))) == 3  # the per-query scores the bootstrap needs
    rows = json.loads((tmp_path / "out" / "comparisons.json").read_text())
    row = next(r for r in rows if r["comparison"] == "dense-heads - separate" and (r["layer"], r["dim"]) == (2, 32))
    # one seed: the report's CI is compare_retrieval's (the same resamples of the same queries)
    sep, dense = (RetrievalResult.load(next(runs.glob(f"{label}-lr*/seed0/retrieval.json")))
                  for label in ("separate-2", "dense-heads"))
    ci = compare_retrieval([sep, dense], draws=50, seed=0).cis[(0, 1)][("nfcorpus", 2, 32)]
    assert (row["delta"], row["low"], row["high"]) == pytest.approx((ci["delta"], ci["low"], ci["high"]), abs=1e-4)
    assert row["low"] < row["high"]  # the queries disagree: a real interval
    assert "## nfcorpus dev (for choosing) and training cost" in md
    for dev in runs.rglob("dev.json"):  # a set without a dev split (SciFact): only the training cost
        dev.unlink()
    md = run_study(study, report_only=True).read_text()
    assert "## Training cost" in md and "dev (for choosing)" not in md and "| dense-heads | " in md


def test_study_sets_of_one_kind(tmp_path):
    with pytest.raises(ValueError, match=r"mixes STS and retrieval sets; a study evaluates one kind"):
        StudyConfig(eval_sets=["stsb", "scifact"])
    with pytest.raises(ValueError, match=r"unknown set 'msmarco'; known sets: .* \(STS\) and scifact, nfcorpus"):
        StudyConfig(eval_sets=["msmarco"])
    assert StudyConfig(eval_sets=["scifact"]).result_tag == "retrieval" and StudyConfig().result_tag == "eval"
