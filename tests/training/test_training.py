"""The training loop on the tiny model: loss goes down, exact resume, checkpoints, logs, bad input, CLI, DDP."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from matryoshka2d.training import checkpoint as ckpt
from matryoshka2d.training.config import load_config
from matryoshka2d.training.loop import CONFIG_FILE, LOG_FILE, TrainingDivergedError, train
from tests.conftest import build_tiny_model
from tests.helpers.training import make_config, read_log, scored_rows, sentence

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT of conftest, with a tokenizer that knows its words on every transformers version.

    (transformers 5 ignores the ``vocab_file=`` keyword that conftest passes, leaving only special tokens;
    the vocabulary file as the first positional argument works on 4.x and 5.x.)
    """
    import transformers

    real = transformers.BertTokenizerFast
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers, "BertTokenizerFast", lambda vocab_file, **kw: real(vocab_file, **kw))
        folder = build_tiny_model(tmp_path_factory.mktemp("tiny-words") / "bert")
    assert real.from_pretrained(folder).vocab_size > 100
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with scored training pairs, unscored pairs and a synthetic stsb/ (dev, test)."""
    root = tmp_path_factory.mktemp("data")
    header = "sentence1\tsentence2\tscore"
    (root / "train.tsv").write_text("\n".join([header, *scored_rows(0, 64)]) + "\n", encoding="utf-8")
    rng = random.Random(1)
    pairs = [f"{' '.join(a)}\t{' '.join(a[:4] + sentence(rng, 2))}" for a in (sentence(rng) for _ in range(64))]
    (root / "pairs.tsv").write_text("\n".join(["anchor\tpositive", *pairs]) + "\n", encoding="utf-8")
    (root / "stsb").mkdir()
    for split, seed in (("dev", 2), ("test", 3)):
        (root / "stsb" / f"{split}.tsv").write_text("\n".join([header, *scored_rows(seed, 40)]) + "\n",
                                                    encoding="utf-8")
    return root


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 8-step 2dmse run with checkpoints at steps 4 and 8."""
    return train(make_config(tiny_dir, data_dir, tmp_path_factory.mktemp("runs") / "straight"))


# ----------------------------------------------------------------------------------- the loop
def test_run_folder_log_and_final_model(straight) -> None:
    from matryoshka2d import MatryoshkaEncoder

    run = straight.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", CONFIG_FILE, "final", LOG_FILE]
    saved = load_config(run / CONFIG_FILE)
    assert saved.run.output_dir == str(run) and saved.objective.strategy == "2dmse" and saved.train.max_steps == 8
    records = read_log(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"epoch", "lr", "loss", "loss/last", "loss/prior", "loss/kl", "grad_norm", "samples_per_s"} <= set(r)
        assert abs(r["loss"] - (r["loss/last"] + r["loss/prior"] + r["loss/kl"])) < 1e-4
        assert len(r["layers"]) == 1 and 1 <= r["layers"][0] <= 3  # 1..N-1, never 0
        assert len(r["dims"]) == 1 and r["dims"][0] in (8, 16)  # dims below D=32
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # warm-up from 0
    assert records[-1]["epoch"] == 2.0  # 64 rows / batch 16 = 4 steps per epoch
    model = MatryoshkaEncoder.from_pretrained(straight.final_dir)
    training = model.metadata["training"]
    assert training["strategy"] == "2dmse" and training["steps"] == 8 and training["seed"] == 42
    assert training["base_loss"] == "cosent" and training["data"]["rows"] == 64
    assert model.metadata["trained_layers"] == [1, 2, 3, 4] and model.metadata["trained_dims"] == [8, 16, 32]


def test_training_lowers_the_loss(tiny_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.data.datasets import load_training_data
    from matryoshka2d.losses.base import CoSENTLoss

    data = load_training_data(data_dir / "train.tsv")
    scores = torch.tensor(data.scores)

    def dataset_loss(model: MatryoshkaEncoder, layer: int) -> float:
        emb = [torch.from_numpy(model.encode(data.columns[c], layer=layer, normalize=False))
               for c in ("sentence1", "sentence2")]
        return float(CoSENTLoss()(emb, scores))

    before = MatryoshkaEncoder.from_pretrained(tiny_dir)
    result = train(make_config(tiny_dir, data_dir, tmp_path / "run", **{"train.max_steps": 20,
                                                                          "run.save_every": 0}))
    after = MatryoshkaEncoder.from_pretrained(result.final_dir)
    for layer in (2, 4):  # a shallow exit and the last one both improve
        assert dataset_loss(after, layer) < dataset_loss(before, layer) - 0.5


def test_kill_and_resume_gives_bitwise_identical_weights(straight, tiny_dir: Path, data_dir: Path,
                                                         tmp_path: Path) -> None:
    config = make_config(tiny_dir, data_dir, tmp_path / "killed")

    def kill(step: int, record: dict) -> None:
        if step == 6:  # after the step-4 checkpoint, with steps 5-6 done and logged
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=kill)
    assert not (tmp_path / "killed" / "final").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "killed")] == [4]
    resumed = train(config, resume=True)
    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(resumed.run_dir) == [{**r, "samples_per_s": s["samples_per_s"], "step_s": s["step_s"]}
                                         for r, s in zip(read_log(straight.run_dir), read_log(resumed.run_dir),
                                                         strict=True)]


def test_resume_can_extend_the_budget(straight, tiny_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(straight.run_dir, tmp_path / "run")
    result = train(make_config(tiny_dir, data_dir, tmp_path / "run", **{"train.max_steps": 10}), resume=True)
    assert [r["step"] for r in read_log(result.run_dir)] == list(range(1, 11))
    assert [s for s, _ in ckpt.list_checkpoints(result.run_dir)] == [8, 10]  # keep_last = 2


def test_separate_trains_a_truncated_model_with_accumulation(tiny_dir: Path, data_dir: Path,
                                                             tmp_path: Path) -> None:
    from matryoshka2d import MatryoshkaEncoder

    config = make_config(tiny_dir, data_dir, tmp_path / "run", **{
        "objective.strategy": "separate", "objective.separate_layers": 2, "train.max_steps": 2,
        "train.grad_accumulation": 2, "train.batch_size": 8, "run.save_every": 0})
    result = train(config)
    model = MatryoshkaEncoder.from_pretrained(result.final_dir)
    assert model.num_layers == 2 and model.metadata["truncated_from"] == 4
    assert model.metadata["trained_layers"] == [2] and model.metadata["trained_dims"] == [32]
    records = read_log(result.run_dir)
    assert set(records[0]) >= {"loss", "loss/last"} and "loss/kl" not in records[0]
    assert records[-1]["epoch"] == 0.5  # 2 steps x 2 micro-batches x 8 rows = 32 of 64 rows


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_complete_verified_and_loadable(straight) -> None:
    from matryoshka2d.io.manifest import verify_manifest

    folder = ckpt.latest_checkpoint(straight.run_dir)
    assert folder.name == "step-00000008"
    verify_manifest(folder)
    state = ckpt.load_checkpoint(folder)
    assert state.step == 8 and state.state["data_order"] == {"epoch": 1, "position": 4}
    assert set(state.rng) >= {"torch", "numpy", "python", "sampler", "data_order"}
    final = weights(straight.final_dir)
    assert all(torch.equal(state.model[f"backbone.{k}"], v) for k, v in final.items())
    assert not list((straight.run_dir / "checkpoints").glob(".*"))  # no temp folders left


def test_data_order_resumes_mid_epoch_and_across_epochs() -> None:
    straight = ckpt.DataOrder(10, 3, seed=7)
    batches = [straight.next_batch() for _ in range(8)]  # 3 batches per epoch, the last row dropped
    assert all(len(b) == 3 for b in batches) and len(set(sum(batches[:3], []))) == 9
    assert batches[:3] != batches[3:6]  # a new order every epoch
    for stop in (1, 3, 4):
        first = ckpt.DataOrder(10, 3, seed=7)
        for _ in range(stop):
            first.next_batch()
        resumed = ckpt.DataOrder(10, 3, seed=7)
        resumed.load_state_dict(first.state_dict())
        assert [resumed.next_batch() for _ in range(8 - stop)] == batches[stop:]
        assert resumed.epochs_done == 8 / 3


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    args = dict(model={"w": torch.ones(2)}, optimizer={"state": {}}, scheduler={"last_epoch": 1},
                rng=[ckpt.capture_rng()], keep_last=2)
    ckpt.save_checkpoint(tmp_path, 1, state={"step": 1}, **args)

    def crash(obj: object, path: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, state={"step": 2}, **args)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)).step == 1


class _Payload:
    def __reduce__(self):  # noqa: ANN204 - executed by a full unpickler only
        return (os.system, ("echo pwned",))


def test_loading_never_unpickles_objects_and_detects_damage(tmp_path: Path) -> None:
    from matryoshka2d.io.manifest import write_manifest

    folder = ckpt.save_checkpoint(tmp_path, 1, model={"w": torch.ones(2)}, optimizer={"state": {}},
                                  scheduler={}, rng=[ckpt.capture_rng()], state={"step": 1}, keep_last=1)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match=r"is damaged.*model\.safetensors"):
        ckpt.load_checkpoint(folder)
    torch.save({"evil": _Payload()}, folder / "optimizer.pt")
    folder.joinpath("manifest.json").unlink()
    write_manifest(folder)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_checkpoint(folder)


# ----------------------------------------------------------------------------------- bad input
def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"data.columns": ["s1", "s2", "score"]}, ValueError,
     r"missing column\(s\) \['s1', 's2'\]; found \['sentence1', 'sentence2', 'score'\]"),
    ({"data.source": "BAD_SCORE"}, ValueError, r"bad.tsv:3: 'score' value 'high' is not a finite number"),
    ({"data.source": "NAN_SCORE"}, ValueError, r"nan.tsv:2: 'score' value 'nan' is not a finite number"),
    ({"data.source": "EMPTY"}, ValueError, "empty.tsv:1: file is empty"),
    ({"objective.dims": [8, 64]}, ValueError, r"objective.dims has \[64\] outside the allowed range 1..32"),
    ({"objective.layer_pool": [2, 4]}, ValueError, r"objective.layer_pool has \[4\] outside the "
                                                    r"allowed range 1..3"),
    ({"objective.strategy": "matryoshka"}, ValueError, "unknown objective.strategy 'matryoshka'; choose one"),
    ({"loss.name": "triplet"}, ValueError, "unknown base loss 'triplet'; choose one of cosent, ibn"),
    ({"loss.options": {"margin": 1}}, ValueError, "base loss 'cosent' does not take margin"),
    ({"loss.name": "ibn", "data.source": "PAIRS", "train.batch_size": 1}, ValueError,
     r"train.batch_size = 1 leaves in-batch negatives \('ibn'\) with no negative"),
    ({"loss.name": "ibn"}, ValueError, "ibn .* trains on unscored .* but scores were given"),
    ({"data.source": "PAIRS"}, ValueError, "cosent needs graded scores"),
    ({"train.batch_size": 65}, ValueError, "train.batch_size = 65 is larger than the 64 training rows"),
    ({"objective.strategy": "separate", "objective.separate_layers": 4}, ValueError,
     r"objective.separate_layers = 4 must be in 1..3"),
    ({"train.mixed_precision": "fp16"}, ValueError, "'fp16' needs a CUDA GPU"),
])
def test_bad_input_fails_before_training(tiny_dir: Path, data_dir: Path, tmp_path: Path, overrides: dict,
                                         error: type, message: str) -> None:
    if overrides.get("train.mixed_precision") == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    files = {"BAD_SCORE": _write(tmp_path / "bad.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\thigh\n"),
             "NAN_SCORE": _write(tmp_path / "nan.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n"),
             "EMPTY": _write(tmp_path / "empty.tsv", ""), "PAIRS": data_dir / "pairs.tsv"}
    if overrides.get("data.source") in files:
        overrides = {**overrides, "data.source": str(files[overrides["data.source"]])}
    run_dir = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(make_config(tiny_dir, data_dir, run_dir).replace(overrides))
    assert not run_dir.exists()  # nothing was written


def test_existing_run_folder_and_bad_resume(straight, tiny_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    config = make_config(tiny_dir, data_dir, straight.run_dir)
    with pytest.raises(FileExistsError, match=r"run folder .*straight already exists; pass --resume"):
        train(config)
    with pytest.raises(ValueError, match=r"cannot resume .*config differs .* in objective.kl_weight \(run: 1.0, "
                                         r"now: 0.5\)"):
        train(config.replace({"objective.kl_weight": 0.5}), resume=True)
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        train(config, resume=True, overwrite=True)
    with pytest.raises(FileNotFoundError, match="cannot resume: run folder .* does not exist"):
        train(make_config(tiny_dir, data_dir, tmp_path / "nothing"), resume=True)
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / CONFIG_FILE).write_text(config.to_toml(), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(make_config(tiny_dir, data_dir, tmp_path / "early"), resume=True)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x", encoding="utf-8")
    with pytest.raises(FileExistsError, match="is not a matryoshka2d run folder .* refusing to delete it"):
        train(make_config(tiny_dir, data_dir, tmp_path / "precious"), overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_nan_loss_stops_with_the_step_and_part_and_keeps_the_checkpoint(tiny_dir: Path, data_dir: Path,
                                                                        tmp_path: Path, monkeypatch) -> None:
    from matryoshka2d.cli import main
    from matryoshka2d.io.manifest import verify_manifest
    from matryoshka2d.losses.objective import TwoDMatryoshkaLoss

    original = TwoDMatryoshkaLoss.forward
    calls = {"n": 0}

    def poisoned(self, features, labels=None):  # noqa: ANN001, ANN202
        out = original(self, features, labels)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss/kl"] = torch.tensor(float("nan"))
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(TwoDMatryoshkaLoss, "forward", poisoned)
    config = make_config(tiny_dir, data_dir, tmp_path / "run", **{"run.save_every": 2})
    with pytest.raises(TrainingDivergedError, match=r"step 3: loss/kl is nan .* last checkpoint is intact"):
        train(config)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    verify_manifest(ckpt.latest_checkpoint(tmp_path / "run"))
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    calls["n"] = 0
    config_file = _write(tmp_path / "c.toml", config.replace({"run.output_dir": str(tmp_path / "cli")}).to_toml())
    assert main(["-q", "train", "--config", str(config_file)]) == 2


# ----------------------------------------------------------------------------------- CLI
def test_cli_train_resume_and_eval(tiny_dir: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    from matryoshka2d.cli import COMMANDS, main

    out = tmp_path / "run"
    config = make_config(tiny_dir, data_dir, tmp_path / "ignored", **{"run.eval_every": 2, "train.max_steps": 4,
                                                                         "run.save_every": 2})
    config_file = _write(tmp_path / "c.toml", config.to_toml())
    argv = ["-q", "train", "--config", str(config_file), "--output-dir", str(out), "--strategy", "starbucks",
            "--set", "objective.starbucks_pairs=[[2, 16], [4, 32]]", "--no-progress-bar"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "best dev score" in printed and f"m2d eval {out / 'final'}" in printed
    assert load_config(out / CONFIG_FILE).objective.starbucks_pairs == [[2, 16], [4, 32]]
    records = read_log(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and "dev/stsb-dev/L4/d32" in evals[0]
    assert (out / "best" / "matryoshka2d.json").is_file()
    assert main(argv) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert main(["-q", "train", "--resume", "--output-dir", str(out), "--max-steps", "5"]) == 0
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5]
    if "eval" in COMMANDS:
        assert main(["-q", "eval", str(out / "final"), "--sets", "stsb", "--data-dir", str(data_dir),
                     "--layers", "2,4", "--dims", "16,32"]) == 0


# ----------------------------------------------------------------------------------- DDP
def _no_dropout_copy(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir, dest)
    cfg = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dest / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dest


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo), global batch 16 = 2 x 8, in-batch negatives gathered across them."""
    model_dir = _no_dropout_copy(tiny_dir, tmp_path / "model")
    overrides = {"loss.name": "ibn", "data.source": str(data_dir / "pairs.tsv"), "train.max_steps": 6,
                 "run.save_every": 3}
    single = train(make_config(model_dir, data_dir, tmp_path / "single", **overrides))
    config = make_config(model_dir, data_dir, tmp_path / "ddp", **overrides)
    config_file = _write(tmp_path / "ddp.toml", config.to_toml())
    launcher = _write(tmp_path / "launch.py", "import sys\nfrom matryoshka2d.cli import main\n"
                                              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), "-q", "train", "--config", str(config_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ddp"), rank=1)
    assert state.state["world_size"] == 2 and (tmp_path / "ddp" / "checkpoints" / "step-00000006" /
                                              "rng-rank1.pt").is_file()
    init, a, b = weights(model_dir), weights(single.final_dir), weights(tmp_path / "ddp" / "final")
    moved = sum(float((a[k] - init[k]).norm()) for k in a)
    gap = sum(float((a[k] - b[k]).norm()) for k in a)
    assert moved > 0.1 and gap < 1e-3 * moved, (moved, gap)
    losses = [(r["loss"], s["loss"]) for r, s in zip(read_log(single.run_dir), read_log(tmp_path / "ddp"),
                                                     strict=True)]
    np.testing.assert_allclose(*zip(*losses, strict=True), rtol=1e-4)
