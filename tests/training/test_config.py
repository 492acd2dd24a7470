"""The training config: defaults, TOML round trip, precedence, --set parsing and validation messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from matryoshka2d.losses.options import ObjectiveOptions
from matryoshka2d.training.config import (
    Config,
    ObjectiveConfig,
    apply_assignments,
    check_against_model,
    config_differences,
    load_config,
    parse_assignment,
    resolve_key,
)
from matryoshka2d.vocab import STRATEGIES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_validate_and_round_trip_through_toml(tmp_path: Path) -> None:
    config = Config()
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    assert load_config(path) == config
    changed = config.replace({"objective.dims": [16, 32], "loss.options": {"scale": 30.0},
                              "data.kind": "scored", "train.max_steps": 7, "data.data_dir": 'we"ird\\path'})
    path.write_text(changed.to_toml(), encoding="utf-8")
    assert load_config(path) == changed


def test_objective_defaults_live_once(tiny_model) -> None:  # noqa: ANN001
    from matryoshka2d.losses.base import CoSENTLoss
    from matryoshka2d.losses.objective import TwoDMatryoshkaLoss

    assert issubclass(ObjectiveConfig, ObjectiveOptions)  # the [objective] section IS the loss's options
    names = {f.name for f in dataclasses.fields(ObjectiveOptions)}
    extra = {f.name for f in dataclasses.fields(ObjectiveConfig)} - names
    assert extra == {"separate_layers", "seed"}  # ours: truncation depth; seed None = train.seed
    from_config = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), ObjectiveConfig()).config_dict()
    from_api = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss()).config_dict()
    assert from_config == from_api


def test_precedence_defaults_file_flags_set(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    text = '[train]\nlr = 1e-4\nseed = 3\nbatch_size = 8\n[objective]\nstrategy = "mrl"\n'
    path.write_text(text, encoding="utf-8")
    config = load_config(path, overrides={"train.seed": 5, "train.lr": None},
                         assignments=["train.batch_size=4", "objective.kl_weight=0.5"])
    assert config.train.lr == 1e-4  # file beats default; a None flag does not override
    assert config.train.seed == 5  # flag beats file
    assert config.train.batch_size == 4  # --set beats file
    assert config.objective.strategy == "mrl"
    assert config.objective.kl_weight == 0.5
    assert config.train.epochs == Config().train.epochs  # untouched default


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    from matryoshka2d.cli import build_parser
    from matryoshka2d.cli.train import resolve_config

    path = tmp_path / "c.toml"
    path.write_text('[run]\noutput_dir = "a"\nsave_every = 9\n[model]\ngradient_checkpointing = true\n',
                    encoding="utf-8")
    args = build_parser().parse_args(["train", "--config", str(path), "--output-dir", "b", "--max-steps", "3",
                                      "--strategy", "layers", "--no-gradient-checkpointing",
                                      "--set", "train.seed=7"])
    config = resolve_config(args)
    assert (config.run.output_dir, config.run.save_every, config.train.max_steps) == ("b", 9, 3)
    assert config.objective.strategy == "layers"
    assert config.model.gradient_checkpointing is False
    assert config.train.seed == 7


def test_set_parses_toml_values_and_falls_back_to_text() -> None:
    assert parse_assignment("train.lr=3e-5") == ("train.lr", 3e-5)
    assert parse_assignment("objective.dims=[8, 64]") == ("objective.dims", [8, 64])
    assert parse_assignment("model.name=minilm") == ("model.name", "minilm")
    assert parse_assignment("objective.detach_teacher=false") == ("objective.detach_teacher", False)
    assert parse_assignment("train.max_steps=none") == ("train.max_steps", None)
    config = apply_assignments(Config(), ["loss.options.scale=30", "loss.name=ibn", "epochs=2"])
    assert config.loss.options == {"scale": 30} and config.loss.name == "ibn" and config.train.epochs == 2.0
    with pytest.raises(ValueError, match="is not key=value"):
        parse_assignment("train.lr")


def test_unknown_and_ambiguous_keys_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        resolve_key("train.lrr")
    with pytest.raises(ValueError, match="'seed' is ambiguous.*objective.seed.*train.seed"):
        apply_assignments(Config(), ["seed=2"])
    path = tmp_path / "c.toml"
    path.write_text("[trian]\nlr = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown section \[trian\] \(did you mean 'train'\?\)"):
        load_config(path)
    path.write_text("[train]\nbatchsize = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown field train.batchsize \(did you mean 'batch_size'\?\)"):
        load_config(path)
    path.write_text("[train\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("objective.strategy", "2d", r"unknown objective.strategy '2d'; choose one of full, mrl, layers"),
    ("objective.depth_weighting", "exp", "unknown objective.depth_weighting 'exp'; choose one of none"),
    ("objective.dims", [0, 8], r"objective.dims has \[0\] below 1 \(got \[0, 8\]\); dims are widths 1..D"),
    ("objective.dims", [], r"objective.dims must be a non-empty list of integers, got \[\]"),
    ("objective.layer_pool", [0], r"objective.layer_pool has \[0\] below 1 .* layer 0 is never an exit"),
    ("objective.kl_temperature", 0, "objective.kl_temperature must be a finite number > 0, got 0"),
    ("objective.kl_weight", -1, "objective.kl_weight must be a finite number >= 0, got -1"),
    ("objective.n_layers_per_step", 0, "objective.n_layers_per_step must be a positive integer or 'all', got 0"),
    ("objective.starbucks_pairs", [[2]], r"objective.starbucks_pairs has \[2\], not a \(layer, dim\) pair"),
    ("objective.strategy", "separate", "objective.separate_layers = None is invalid: strategy 'separate'"),
    ("train.batch_size", 0, "train.batch_size = 0 is invalid: expected an integer in 1 or more"),
    ("train.lr", float("nan"), "train.lr = nan is invalid: expected a finite number > 0"),
    ("train.layer_lr_decay", 0, r"train.layer_lr_decay = 0.0 is invalid: expected a finite number > 0.0 and <= 1.0"),
    ("train.layer_lr_decay", 1.5, r"train.layer_lr_decay = 1.5 is invalid: expected a finite number > 0.0 and <= 1"),
    ("train.warmup_ratio", 1.5, r"warmup_ratio = 1.5 is invalid: expected a finite number >= 0.0 and <= 1.0"),
    ("train.mixed_precision", "fp8", "mixed_precision = 'fp8' is invalid: choose one of no, fp16, bf16"),
    ("train.max_steps", 1.5, "train.max_steps = 1.5 is invalid: expected an integer"),
    ("train.seed", True, "train.seed = True is invalid"),
    ("run.keep_last", 0, "run.keep_last = 0 is invalid: expected an integer in 1 or more"),
    ("model.pooling", "avg", "model.pooling = 'avg' is invalid: choose one of cls, mean"),
    ("data.columns", ["a"], r"data.columns = \['a'\] is invalid: expected 2 or 3 column names"),
    ("loss.options", 3, "loss.options = 3 is invalid"),
])
def test_invalid_values_name_field_value_and_range(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config().replace({key: value})


def test_model_dependent_checks() -> None:
    ok = Config().replace({"objective.dims": [8, 32], "objective.layer_pool": [1, 3]})
    check_against_model(ok, num_layers=4, hidden_size=32)
    with pytest.raises(ValueError, match=r"objective.dims has \[64\] outside the allowed range 1..32 .* 32 dims"):
        check_against_model(Config().replace({"objective.dims": [8, 64]}), 4, 32)
    with pytest.raises(ValueError, match=r"objective.layer_pool has \[4\] outside the allowed range 1..3 .*"
                                         r"layers 1..N-1 of this 4-layer model"):
        check_against_model(Config().replace({"objective.layer_pool": [1, 4]}), 4, 32)
    with pytest.raises(ValueError, match="data.dev_layers = .* layers must be in 1..4; drop 5"):
        check_against_model(Config().replace({"data.dev_layers": [5]}), 4, 32)
    with pytest.raises(ValueError, match=r"objective.starbucks_pairs has \[5, 8\], outside layers 1..4"):
        check_against_model(Config().replace({"objective.strategy": "starbucks",
                                              "objective.starbucks_pairs": [[5, 8]]}), 4, 32)


def test_resume_differences_ignore_budget_and_bookkeeping() -> None:
    run = Config()
    same = run.replace({"train.max_steps": 99, "run.save_every": 1, "run.output_dir": "elsewhere",
                        "run.progress_bar": False})
    assert config_differences(run, same) == []
    other = run.replace({"objective.kl_weight": 0.5, "train.lr": 1e-4})
    assert config_differences(run, other) == ["objective.kl_weight (run: 1.0, now: 0.5)",
                                              "train.lr (run: 2e-05, now: 0.0001)"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("stsb-minilm-*.toml")), ids=lambda p: p.name)
def test_bundled_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.run.output_dir == f"runs/{path.stem}"
    assert config.objective.strategy == path.stem.rsplit("-", 1)[1]


def test_one_bundled_config_per_strategy() -> None:
    strategies = {load_config(p).objective.strategy for p in CONFIGS.glob("stsb-minilm-*.toml")}
    assert strategies == set(STRATEGIES)
