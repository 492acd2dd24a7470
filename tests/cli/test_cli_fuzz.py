"""Hypothesis-driven fuzz of the ``m2d`` command line on the tiny model fixtures.

Random argument vectors for every subcommand, each flag drawn from its valid and invalid values (missing
paths, folders, files where folders are due, ``/proc``, paths under a file, negative and non-numeric
numbers, unknown choices, damaged results). Property: no traceback, ever; every non-zero exit is 2 with
exactly one ``m2d ...: error:`` line on stderr (besides logged warnings); no lock file or temporary is
left behind. 50 examples in the default suite, 1,000 in the slow one (``make test-all``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from matryoshka2d.cli import COMMANDS, main
from matryoshka2d.vocab import POOLING_MODES
from tests.helpers.cli import INDEX_DAMAGE, damage_index

FUZZ = settings(
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative defaults (``runs/train``, ``.``) land in a scratch folder, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _serve_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``m2d serve`` with valid flags loads the model and builds the app, then would serve forever: the
    server's run loop returns at once here (SERVED counts the vectors that got that far)."""
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: SERVED.append(self.config.port))
    # --backend auto would export every exit to OpenVINO first (seconds each): the fuzz draws torch or onnx
    monkeypatch.setattr("matryoshka2d.serve.launch.default_backend", lambda **_: ("torch", "auto (fuzz): torch"))


SERVED: list[int] = []


@pytest.fixture(scope="module")
def world(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files and folders the fuzzer draws from."""
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    for name, scores in (("stsb", [0, 1, 2, 3, 4, 5, 1, 2]), ("sickr", [3] * 8)):
        (data / name).mkdir(parents=True)
        rows = ["sentence1\tsentence2\tscore"] + [
            f"a man plays {i}\tthe dog runs {s}\t{s}" for i, s in enumerate(scores)
        ]
        (data / name / "test.tsv").write_text("\n".join(rows) + "\n")
    (root / "s.txt").write_text("a man plays\nthe dog\n\ncat\n")
    (root / "s.tsv").write_text("text\tother\nhello\tx\nworld\ty\n")
    (root / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "train.tsv").write_text(
        "sentence1\tsentence2\tscore\n" + "".join(f"a man {i}\tthe dog {i % 3}\t{i % 4}\n" for i in range(8))
    )
    (root / "plain").write_text("just a file\n")
    (root / "garbage.toml").write_bytes(b"[[[ not toml \xff")
    (root / "unknown.toml").write_text("[study]\nname = 'x'\nno_such_key = 1\n")
    (root / "empty-dir").mkdir()
    (root / "out").mkdir()
    no_weights = root / "no-weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    result = root / "r.json"
    assert (
        main(
            [
                "-q",
                "eval",
                str(tiny_dir),
                "--sets",
                "stsb",
                "--data-dir",
                str(data),
                "--layers",
                "2,4",
                "--dims",
                "8,32",
                "--output",
                str(result),
            ]
        )
        == 0
    )
    damaged = root / "damaged.json"
    obj = json.loads(result.read_text())
    obj["predictions"]["file"] = "damaged.preds.npz"
    damaged.write_text(json.dumps(obj))
    (root / "damaged.preds.npz").write_bytes(b"PK\x03\x04 truncated")
    (root / "corpus.tsv").write_text("doc_id\ttitle\ttext\n" + "".join(
        f"d{i}\tdoc {i}\ta man plays {i} near the {'river' if i % 2 else 'house'}\n" for i in range(12)))
    (root / "queries.tsv").write_text("query_id\ttext\nq1\ta man plays\nq2\tthe house\n")
    index = root / "index"
    assert main(["-q", "index", str(tiny_dir), "--corpus", str(root / "corpus.tsv"), "--dims", "8,32",
                 "--output", str(index)]) == 0
    damaged_indexes = {name: damage_index(index, root / f"index-{name}", name) for name in INDEX_DAMAGE}
    nan_result = root / "nan.json"
    shutil.copy(result, nan_result)
    with np.load(root / "r.preds.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pred_0"] = arrays["pred_0"] * np.nan
    np.savez(root / "nan.preds.npz", **arrays)
    obj = json.loads(result.read_text())
    obj["predictions"] = {**obj["predictions"], "file": "nan.preds.npz"}
    obj["predictions"].pop("sha256")
    nan_result.write_text(json.dumps(obj))
    bench = root / "bench.json"
    bench.write_text(json.dumps({"records": [{"impl": "matryoshka2d", "layer": 2, "dim": 32, "sentences_per_s": 10}]}))
    return {
        k: str(v)
        for k, v in {
            "root": root,
            "data": data,
            "model": tiny_dir,
            "no_weights": no_weights,
            "txt": root / "s.txt",
            "tsv": root / "s.tsv",
            "bad_txt": root / "bad.txt",
            "train": root / "train.tsv",
            "plain": root / "plain",
            "garbage_toml": root / "garbage.toml",
            "unknown_toml": root / "unknown.toml",
            "dir": root / "empty-dir",
            "out": root / "out",
            "result": result,
            "damaged": damaged,
            "bench": bench,
            "corpus": root / "corpus.tsv",
            "queries": root / "queries.tsv",
            "index": index,
            "nan_result": nan_result,
            **{f"index_{name}": path for name, path in damaged_indexes.items()},
        }.items()
    }


class V:
    """A flag's values: ``valid`` ones (the ``valid`` mode draws only these) and ``invalid`` ones."""

    def __init__(self, valid: list[str], invalid: list[str]) -> None:
        self.valid, self.invalid = valid, invalid

    def strategy(self, valid_only: bool) -> st.SearchStrategy[str]:
        return st.sampled_from(self.valid if valid_only else self.valid + self.invalid)


def paths(w: dict[str, str], valid: list[str], invalid: list[str] = ()) -> V:
    bad = [w["root"] + "/missing.x", w["dir"], w["plain"] + "/under-a-file", "/proc/m2d-fuzz", ""]
    return V([w[k] for k in valid], [w[k] for k in invalid] + bad)


def outputs(w: dict[str, str], *suffixes: str) -> V:
    names = [f"{w['out']}/o{i}{s}" for i in range(2) for s in suffixes]
    bad = [
        w["out"],
        ".",
        w["plain"],
        w["plain"] + "/x" + suffixes[0],
        "/proc/m2d-fuzz" + suffixes[0],
        w["out"] + "/x.unknownformat",
        "",
    ]
    return V(names, bad)


INTS = V(["1", "2", "4"], ["0", "-1", "99999", "x", "1.5", ""])
LISTS = V(["all", "1", "2,4", "1,1", "ALL"], ["0", "5", "-1", "x", "1,,2", "", "9999"])
DIMS = V(["all", "8", "8,32", "16,16"], ["0", "33", "-1", "x", "", "9999"])
FLOATS = V(["0.5", "0.95", "1e-3"], ["0", "1", "-1", "1.5", "nan", "inf", "x"])
POOLING = V(list(POOLING_MODES), ["median", "", "MEAN", "lasttoken"])


def command_flags(w: dict[str, str]) -> dict[str, tuple[list[V], dict[str, V | None]]]:
    """command -> (positional values, {flag: its values, or None for a switch})."""
    model = paths(w, ["model"], ["no_weights", "txt"])
    common = {"--pooling": POOLING, "--trust-remote-code": None}
    return {
        "info": ([model], {**common, "--json": None}),
        "encode": (
            [model],
            {
                **common,
                "--layer": INTS,
                "--dim": INTS,
                "--column": V(["text"], ["nope", ""]),
                "--input": paths(w, ["txt", "tsv"], ["bad_txt"]),
                "--output": outputs(w, ".npy"),
                "--batch-size": INTS,
                "--no-normalize": None,
                "--overwrite": None,
            },
        ),
        "eval": (
            [model],
            {
                **common,
                "--sets": V(["stsb", "stsb,sickr", "sickr"], ["nope", "", "all"]),
                "--layers": LISTS,
                "--dims": DIMS,
                "--split": V(["test"], ["dev", "x"]),
                "--variant": V(["original"], ["senteval_tok", "x"]),
                "--data-dir": paths(w, ["data"]),
                "--batch-size": INTS,
                "--metric": V(["spearman", "pearson"], ["x"]),
                "--no-ignore-identical-ids": None,
                "--output": outputs(w, ".json"),
                "--plot": outputs(w, ".png", ".svg"),
                "--overwrite": None,
            },
        ),
        "compare": (
            [paths(w, ["result"], ["damaged", "nan_result"]), paths(w, ["result"])],
            {
                "--labels": V(["a,b"], ["a", "", "a,b,c"]),
                "--output": outputs(w, ".md"),
                "--plot": outputs(w, ".png"),
                "--plot-set": V(["stsb"], ["nope"]),
                "--benchmark": paths(w, ["bench"], ["result"]),
                "--pareto": outputs(w, ".png"),
                "--seed": INTS,
                "--draws": V(["0", "10"], ["-1", "x"]),
                "--confidence": FLOATS,
                "--overwrite": None,
            },
        ),
        "train": (
            [],
            {
                "--model": model,
                "--data": paths(w, ["train"], ["txt", "tsv"]),
                "--output-dir": outputs(w, "-run"),
                "--strategy": V(["2dmse", "dense", "full"], ["x", ""]),
                "--loss": V(["cosent", "angle"], ["x"]),
                "--max-steps": V(["1", "2"], ["0", "-1", "x"]),
                "--batch-size": V(["2", "4"], ["0", "-3", "x"]),
                "--lr": FLOATS,
                "--seed": INTS,
                "--mixed-precision": V(["no"], ["bf16", "fp16", "x"]),
                "--save-every": V(["0", "1"], ["-1"]),
                "--eval-every": V(["0"], ["-1"]),
                "--set": V(["train.lr=1e-3", "run.eval_every=0"], ["nope=1", "train.lr", "objective.kl_weight=-1"]),
                "--resume": None,
                "--overwrite": None,
                "--print-config": None,
                "--no-progress-bar": None,
            },
        ),
        "align": (
            [model],
            {
                **common,
                "--texts": paths(w, ["txt", "tsv"], ["bad_txt", "corpus"]),
                "--exits": V(["1", "1,2"], ["0", "4", "9", "x", ""]),
                "--output": outputs(w, "-aligned"),
                "--method": V(["head"], ["x", ""]),
                "--rank": V(["2"], ["0", "-1", "x"]),
                "--epochs": V(["0.5", "1"], ["0", "-1", "nan", "x"]),
                "--batch-size": V(["2", "8"], ["0", "x"]),
                "--distance": V(["cosine", "mse"], ["l1"]),
                "--overwrite": None,
            },
        ),
        "export": (
            [model],
            {
                **common,
                "--layer": INTS,
                "--dim": INTS,
                "--format": V(["hf", "st", "sentence-transformers"], ["x"]),
                "--output": outputs(w, "-exp"),
                "--overwrite": None,
                "--no-verify": None,
                "--eval-results": paths(w, ["result"], ["damaged"]),
                "--bench-results": paths(w, ["bench"]),
                "--sts": V(["stsb"], ["nope"]),
                "--data-dir": paths(w, ["data"]),
            },
        ),
        "serve": (
            [model],
            {
                **common,
                "--host": V(["127.0.0.1"], []),
                "--port": V(["0", "8000"], ["-1", "70000", "x"]),
                "--backend": V(["torch"], ["onnx", "x"]),
                "--dtype": V(["fp32", "bf16"], ["fp16", "x"]),
                "--device": V(["cpu"], ["cuda:7", "tpu", ""]),
                "--threads": V(["1"], ["0", "-2", "x"]),
                "--max-batch-tokens": V(["64", "16384"], ["0", "-1", "x"]),
                "--max-batch-requests": V(["1", "256"], ["0", "x"]),
                "--batch-wait-ms": V(["0", "2.5"], ["-1", "x"]),
                "--max-queue": V(["1", "4096"], ["0", "x"]),
                "--max-client-batch": V(["1", "2048"], ["0", "x"]),
                "--max-body-bytes": V(["1024"], ["0", "x"]),
                "--no-truncation": None,
                "--api-key": V(["secret"], []),
                "--log-level": V(["warning"], ["loud"]),
            },
        ),
        "index": (
            [model],
            {
                **common,
                "--corpus": paths(w, ["corpus"], ["txt", "queries"]),
                "--layer": V(["1", "4"], ["0", "9", "x"]),
                "--dims": V(["8", "8,32"], ["0", "33", "x", ""]),
                "--type": V(["flat", "hnsw", "sq8"], ["x"]),
                "--hnsw-m": V(["8"], ["0", "x"]),
                "--ivf-nlist": V(["2"], ["0", "x"]),
                "--rerank-dtype": V(["float32", "float16"], ["int4"]),
                "--batch-size": INTS,
                "--output": outputs(w, "-idx"),
                "--overwrite": None,
            },
        ),
        "search": (
            [paths(w, ["index"], ["corpus", *(f"index_{name}" for name in INDEX_DAMAGE)])],
            {
                "--queries": paths(w, ["queries"], ["corpus", "txt"]),
                "--model": model,
                "--pooling": POOLING,
                "--query-layer": V(["1", "4"], ["0", "9", "x"]),
                "--shortlist-dim": V(["8"], ["0", "16", "x"]),
                "--k": V(["5", "12"], ["0", "-1", "x"]),
                "--rerank-dim": V(["32", "0"], ["-1", "99", "x"]),
                "--top": V(["3", "10"], ["0", "x"]),
                "--force": None,
                "--no-verify": None,
                "--batch-size": INTS,
                "--output": V([f"{w['out']}/r{i}{s}" for i in range(2) for s in (".trec", ".jsonl")],
                              [w["out"], ".", w["plain"] + "/x.trec", "/proc/m2d-fuzz.trec", w["out"] + "/x.csv", ""]),
                "--overwrite": None,
            },
        ),
        "reproduce": ([], {"--config": paths(w, [], ["garbage_toml", "unknown_toml", "txt"]), "--report-only": None}),
        "bench": (
            [model],
            {
                **common,
                "--layers": LISTS,
                "--dims": DIMS,
                "--batch-sizes": V(["2", "2,4"], ["0", "x", ""]),
                "--dtype": V(["fp32", "fp32,bf16"], ["fp16", "x"]),
                "--allow-fallback": None,
                "--attention": V(["auto", "eager", "sdpa"], ["x"]),
                "--sentences": paths(w, ["txt", "tsv"], ["bad_txt"]),
                "--column": V(["text"], ["nope"]),
                "--repeats": V(["1"], ["0", "-1", "x"]),
                "--warmup": V(["0", "1"], ["-1"]),
                "--threads": V(["1"], ["0", "-2", "x"]),
                "--device": V(["cpu"], ["cuda", "cuda:7", "tpu", "", "meta"]),
                "--peer": V([], ["x", "nope"]),
                "--output": outputs(w, ".json"),
                "--plot": outputs(w, ".png"),
                "--overwrite": None,
            },
        ),
    }


@st.composite
def argv_for(draw: st.DrawFn, w: dict[str, str]) -> list[str]:
    """Half the vectors use valid values only (they mostly succeed), half mix in invalid ones."""
    table = command_flags(w)
    command = draw(st.sampled_from(sorted(table)))
    positionals, flags = table[command]
    valid_only = draw(st.booleans())
    usable = {f: v for f, v in flags.items() if v is None or v.valid or not valid_only}
    argv = ["-q", command, *(draw(p.strategy(valid_only and bool(p.valid))) for p in positionals)]
    required = {
        "encode": ["--input", "--output"],
        "index": ["--corpus", "--dims", "--output"],
        "search": ["--queries", "--output"],
        "export": ["--output"],
        "reproduce": ["--config"],
        "bench": ["--sentences", "--repeats", "--warmup"],
        "eval": ["--data-dir"],
        "train": ["--max-steps", "--data", "--output-dir"],
        "align": ["--texts", "--exits", "--output", "--method"],
    }.get(command, [])
    chosen = set(draw(st.lists(st.sampled_from(sorted(usable)), max_size=6, unique=True))) | set(required)
    if chosen and not valid_only and draw(st.integers(0, 9)) == 0:  # sometimes a required flag is missing
        chosen.discard(draw(st.sampled_from(sorted(chosen))))
    for flag in sorted(chosen):
        values = flags[flag]
        argv += [flag] if values is None else [flag, draw(values.strategy(valid_only and bool(values.valid)))]
    return argv


def check(argv: list[str], capsys: pytest.CaptureFixture[str], out_dir: Path) -> None:
    code = main(argv)
    _, err = capsys.readouterr()
    event(f"m2d {argv[1]} exit {code}")  # the mix of commands and outcomes: --hypothesis-show-statistics
    if code == 2 and os.environ.get("M2D_FUZZ_SHOW"):  # M2D_FUZZ_SHOW=1 pytest -s: see what was refused
        print("FUZZ", " ".join(argv[1:]), "|", err.strip().splitlines()[-1], file=sys.__stdout__)
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        ours = [line for line in err.splitlines() if line.startswith("m2d ")]
        others = [
            line
            for line in err.splitlines()
            if line.strip() and not line.startswith(("m2d ", "WARNING ", "ERROR ", "INFO "))
        ]
        assert len(ours) == 1 and ": error: " in ours[0] and not others, (argv, err)
    stray = [p.name for p in out_dir.parent.rglob(".*") if p.name.endswith(".lock") or ".tmp-" in p.name]
    assert stray == [], (argv, stray)


def test_command_table_covers_every_subcommand(world) -> None:
    assert sorted(command_flags(world)) == sorted(COMMANDS)


def test_usage_errors_are_one_line(capsys) -> None:
    for argv in (["encode"], ["nope"], ["eval", "x", "--layers"], ["bench", "x", "--attention", "nope"], []):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ": error: " in err, (argv, err)


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_cli_fuzz(world, capsys, data) -> None:
    check(data.draw(argv_for(world)), capsys, Path(world["out"]))


@pytest.mark.slow
@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_cli_fuzz_1000(world, capsys, data) -> None:
    check(data.draw(argv_for(world)), capsys, Path(world["out"]))
