"""Fault injection on the ``m2d`` commands: unwritable outputs, disk full, concurrent writers, killed lock
holders, damaged sidecars and model folders, bad devices, degenerate data, alias shadowing, file modes.

Each case asserts exit 2, exactly one line on stderr (no traceback) and the state of the files after it.
CI runs as root, so ``chmod`` cannot make anything read-only: unwritable places are paths under ``/proc``
(which takes no new files) and paths under a regular file; disk full is ``RLIMIT_FSIZE`` in a subprocess.
See docs/reliability.md ("Environment faults").
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d.cli import main
from tests.helpers.cli import assert_user_error, cli

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
M2D = [sys.executable, "-c", "from matryoshka2d.cli import run; run()", "-q"]
# holds the writer lock of argv[1] until killed (imports only matryoshka2d.io: starts in a fraction of a second)
HOLDER = ("import sys, time\nfrom matryoshka2d.io.locks import output_lock\n"
          "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")


# ----------------------------------------------------------------------------------------- helpers
def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries and lock files in ``folder`` (none must remain after a clean failure)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and
                  (".tmp-" in p.name or p.name.endswith(".lock") or p.name.startswith(".m2d-write-check")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with a 12-pair stsb test set (varied scores) and a sickr test set of constant scores."""
    root = tmp_path_factory.mktemp("fault-data")
    words = ["a man plays the guitar", "a dog runs in the park", "two children eat food", "a woman reads a book",
             "the cat sits on the car", "people walk near the river"]
    rows = ["sentence1\tsentence2\tscore"]
    for i in range(12):
        rows.append(f"{words[i % 6]}\t{words[(i * 5 + 1) % 6]}\t{i % 6:.1f}")
    (root / "stsb").mkdir()
    (root / "stsb" / "test.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "sickr").mkdir()
    constant = [rows[0]] + [r.rsplit("\t", 1)[0] + "\t3.0" for r in rows[1:]]
    (root / "sickr" / "test.tsv").write_text("\n".join(constant) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fault-sentences") / "s.txt"
    path.write_text("a man plays the guitar\nthe dog runs\ncat\na woman reads a book\nred car\nold tree\n",
                    encoding="utf-8")  # no blank line: m2d encode refuses them in .npy mode
    return path


@pytest.fixture(scope="module")
def result_json(tiny_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``m2d eval --output`` of the tiny model on the stsb set: results JSON + .preds.npz."""
    out = tmp_path_factory.mktemp("fault-results") / "tiny.json"
    assert main(["-q", "eval", str(tiny_dir), "--sets", "stsb", "--data-dir", str(data_dir), "--layers", "2,4",
                 "--dims", "8,32", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def train_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["a", "man", "dog", "plays", "runs", "the", "park", "guitar", "cat", "red", "car", "book"]
    rows = ["sentence1\tsentence2\tscore"]
    for i in range(16):
        a = " ".join(words[(i + k) % 12] for k in range(4))
        b = " ".join(words[(i * 3 + k) % 12] for k in range(4))
        rows.append(f"{a}\t{b}\t{i % 5}")
    path = tmp_path_factory.mktemp("fault-train") / "train.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def train_args(tiny_dir: Path, train_tsv: Path, out: Path) -> list[str]:
    return ["train", "--model", str(tiny_dir), "--data", str(train_tsv), "--output-dir", str(out), "--max-steps",
            "2", "--batch-size", "4", "--no-progress-bar", "--set", "run.eval_every=0", "--set", "run.save_every=1"]


def commands(tiny_dir: Path, sentences: Path, data_dir: Path, out: str, result: str = "r.json",
             train_tsv: Path | None = None) -> dict:
    """One writing invocation per command, with ``out`` as its output path."""
    return {
        "encode": ["encode", tiny_dir, "--input", sentences, "--output", out],
        "eval": ["eval", tiny_dir, "--sets", "stsb", "--data-dir", data_dir, "--output", out],
        "eval-plot": ["eval", tiny_dir, "--sets", "stsb", "--data-dir", data_dir, "--plot", out],
        "compare": ["compare", result, result, "--draws", "0", "--output", out],
        "bench": ["bench", tiny_dir, "--sentences", sentences, "--repeats", "1", "--warmup", "0",
                  "--batch-sizes", "4", "--output", out],
        "export": ["export", tiny_dir, "--output", out],
        "train": train_args(tiny_dir, train_tsv or sentences, Path(out)),
    }


WRITERS = ["encode", "eval", "eval-plot", "compare", "bench", "export", "train"]


# ----------------------------------------------------------------------------------------- unwritable outputs
@pytest.mark.parametrize("command", WRITERS)
def test_output_under_proc_is_refused_before_any_work(command, tiny_dir, sentences, data_dir, result_json,
                                                      train_tsv, capsys) -> None:
    argv = commands(tiny_dir, sentences, data_dir, "/proc/m2d-fault-out", str(result_json), train_tsv)[command]
    start = time.perf_counter()
    code, out, err = cli(capsys, *argv)
    assert_user_error(code, err, "/proc", "cannot create files")
    assert time.perf_counter() - start < 5  # refused at start-up, before any model was loaded
    assert not os.path.exists("/proc/m2d-fault-out") and out == ""


@pytest.mark.parametrize("command", WRITERS)
def test_output_whose_parent_is_a_file(command, tiny_dir, sentences, data_dir, result_json, train_tsv,
                                       tmp_path, capsys) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("keep me\n")
    argv = commands(tiny_dir, sentences, data_dir, str(blocker / "sub" / "out.png"), str(result_json),
                    train_tsv)[command]
    code, _, err = cli(capsys, *argv)
    assert_user_error(code, err, str(blocker), "is a file, not a folder")
    assert blocker.read_text() == "keep me\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["encode", "eval", "compare", "bench"])
def test_file_output_that_is_a_folder(command, tiny_dir, sentences, data_dir, result_json, tmp_path,
                                      capsys, monkeypatch) -> None:
    folder = tmp_path / "existing-folder"
    folder.mkdir()
    for target in (str(folder), "."):
        monkeypatch.chdir(tmp_path)
        argv = commands(tiny_dir, sentences, data_dir, target, str(result_json))[command]
        code, _, err = cli(capsys, *argv, "--overwrite")
        assert_user_error(code, err, f"--output {target} is a folder")
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.parametrize("target", [".", "file"])
def test_export_into_the_current_folder_or_onto_a_file(target, tiny_dir, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "export", tiny_dir, "--output", target, "--overwrite")
    assert_user_error(code, err, f"--output {target}")
    assert (tmp_path / "file").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


def test_disk_full_is_one_line_and_leaves_nothing_behind(tiny_dir, sentences, tmp_path) -> None:
    """RLIMIT_FSIZE (the process's file size limit) makes the 1 KiB .npy write fail with EFBIG."""
    out = tmp_path / "emb.npy"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    proc = subprocess.run([*M2D, "encode", str(tiny_dir), "--input", str(sentences), "--output", str(out)],
                          env=ENV, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    line = assert_user_error(proc.returncode, proc.stderr, str(out), "too large", "ulimit")
    assert "failed too" in line  # the rescue copy hits the same per-process limit, and says so
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_late_write_failure_keeps_the_result(tiny_dir, data_dir, tmp_path, capsys, monkeypatch) -> None:
    """The disk fills after the grid is computed: the table is printed and the JSON is kept elsewhere."""
    from matryoshka2d.evaluation.grid import GridResult

    out = tmp_path / "results.json"
    real_save = GridResult.save

    def full_disk(self, path):  # noqa: ANN001, ANN202
        if Path(path).parent == tmp_path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(self, path)

    monkeypatch.setattr(GridResult, "save", full_disk)
    code, printed, err = cli(capsys, "eval", tiny_dir, "--sets", "stsb", "--data-dir", data_dir, "--output", out)
    line = assert_user_error(code, err, str(out), "no space left", "it was saved to")
    rescued = Path(line.split("it was saved to ")[1].split(" instead")[0])
    kept = GridResult.load(rescued)
    assert kept.sets == ["stsb"] and kept.predictions["stsb"].shape[2] == 12
    assert f"{kept.spearman('stsb', 4, 32):.2f}" in printed  # the same numbers as the printed table
    assert not out.exists() and leftovers(tmp_path) == []
    shutil.rmtree(rescued.parent)


# ----------------------------------------------------------------------------------------- concurrent writers
def start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("command", ["encode", "eval", "bench", "export", "train"])
def test_a_second_writer_is_refused_and_a_killed_holder_is_reclaimed(command, tiny_dir, sentences, data_dir,
                                                                   train_tsv, tmp_path, capsys) -> None:
    out = tmp_path / ("out" if command in ("export", "train") else "out.json")
    argv = commands(tiny_dir, sentences, data_dir, str(out), train_tsv=train_tsv)[command]
    holder = start_holder(out)
    try:
        code, _, err = cli(capsys, *argv)
        assert_user_error(code, err, "being written by another process", f"pid {holder.pid}")
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = tmp_path / f".{out.name}.lock"
    assert lock.read_text().startswith(f"{holder.pid}@")  # SIGKILL left the file; the kernel dropped the lock
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert out.exists() and not lock.exists() and leftovers(tmp_path) == []


def test_two_encode_processes_one_output(tiny_dir, sentences, tmp_path) -> None:
    """Two real writers race for one new file: one writes it, the other exits 2; nothing is lost silently."""
    out = tmp_path / "emb.npy"
    argv = [*M2D, "encode", str(tiny_dir), "--input", str(sentences), "--output", str(out)]
    procs = [subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert_user_error(2, err)
    assert "being written by another process" in err or "already exists" in err
    assert np.load(out).shape == (6, 32) and leftovers(tmp_path) == []


def test_two_train_runs_one_run_folder(tiny_dir, train_tsv, tmp_path, capsys) -> None:
    """The second run is refused while the first holds the folder; the folder is the first run's alone."""
    out = tmp_path / "run"
    first = subprocess.Popen([*M2D, *train_args(tiny_dir, train_tsv, out)[:-4], "--max-steps", "30",
                              "--set", "run.eval_every=0", "--set", "run.save_every=10"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".run.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    code, _, err = cli(capsys, *train_args(tiny_dir, train_tsv, out), "--seed", "2")
    assert_user_error(code, err, f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    config = (out / "config.resolved.toml").read_text()
    assert "seed = 2" not in config
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in log if "step" in r and "loss" in r]
    assert steps == sorted(set(steps)) and (out / "final" / "model.safetensors").is_file()
    assert not lock.exists()


# ----------------------------------------------------------------------------------------- damaged inputs
def damage(result_json: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the result with its .preds.npz damaged ``how``."""
    from matryoshka2d.evaluation.grid import predictions_path

    copy = tmp_path / "damaged.json"
    obj = json.loads(result_json.read_text())
    obj["predictions"]["file"] = "damaged.preds.npz"
    obj["predictions"].pop("sha256")  # as a result written before digests: the archive's own checks answer
    copy.write_text(json.dumps(obj))
    sidecar = tmp_path / "damaged.preds.npz"
    raw = predictions_path(result_json).read_bytes()
    with np.load(predictions_path(result_json)) as z:
        arrays = {k: z[k] for k in z.files}
    if how == "truncated":
        sidecar.write_bytes(raw[: len(raw) // 2])
    elif how == "not a zip":
        sidecar.write_bytes(b"hello, not a zip archive\n" * 10)
    elif how == "empty":
        sidecar.write_bytes(b"")
    elif how == "missing array":
        arrays.pop("gold_0")
        np.savez(sidecar, **arrays)
    elif how == "wrong shape":
        arrays["pred_0"] = arrays["pred_0"][:, :, :5]
        np.savez(sidecar, **arrays)
    elif how == "strings":
        arrays["gold_0"] = np.asarray(["x"] * len(arrays["gold_0"]))
        np.savez(sidecar, **arrays)
    return copy


@pytest.mark.parametrize("how", ["truncated", "not a zip", "empty", "missing array", "wrong shape", "strings"])
def test_damaged_predictions_sidecar(how, result_json, tmp_path, capsys) -> None:
    copy = damage(result_json, tmp_path, how)
    before = (tmp_path / "damaged.preds.npz").read_bytes()
    code, _, err = cli(capsys, "compare", result_json, copy, "--labels", "a,b")
    assert_user_error(code, err, "damaged.preds.npz", "m2d eval --output")
    assert (tmp_path / "damaged.preds.npz").read_bytes() == before  # never rewritten by a reader


def test_a_sidecar_that_is_not_the_results_own_is_refused(result_json, tmp_path, capsys) -> None:
    copy = damage(result_json, tmp_path, "wrong shape")
    obj = json.loads(copy.read_text())
    obj["predictions"]["sha256"] = json.loads(result_json.read_text())["predictions"]["sha256"]
    copy.write_text(json.dumps(obj))
    code, _, err = cli(capsys, "compare", result_json, copy, "--labels", "a,b")
    assert_user_error(code, err, "damaged.preds.npz is not the sidecar written with", "m2d eval --output")


@pytest.mark.parametrize("edit", [{"results": [{"set": "stsb"}]}, {"results": [{"set": "stsb", "layer": "x"}]},
                                  {"predictions": "nope"}])
def test_malformed_result_json(edit, result_json, tmp_path, capsys) -> None:
    obj = {**json.loads(result_json.read_text()), **edit}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    code, _, err = cli(capsys, "compare", result_json, bad, "--draws", "0")
    assert_user_error(code, err, str(bad))


def edited_copy(src: Path, dst: Path, file: str, **changes: object) -> Path:
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink(missing_ok=True)
    path = dst / file
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))
    return dst


@pytest.fixture(scope="module")
def saved_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved by matryoshka2d (with matryoshka2d.json and a manifest)."""
    from matryoshka2d import MatryoshkaEncoder

    out = tmp_path_factory.mktemp("fault-saved") / "model"
    MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").save(out)
    return out


@pytest.mark.parametrize(("field", "value", "needles"), [
    ("default_dim", 9999, ["default_dim = 9999", "1..32"]),
    ("default_layer", 0, ["default_layer = 0", "1..4"]),
    ("default_layer", "2", ["default_layer = '2'"]),
    ("max_seq_length", -1, ["max_seq_length = -1"]),
    ("pooling", "median", ["pooling = 'median'"]),
])
def test_bad_matryoshka2d_json_is_refused_at_load(field, value, needles, saved_dir, tmp_path, capsys) -> None:
    folder = edited_copy(saved_dir, tmp_path / "m", "matryoshka2d.json", **{field: value})
    code, _, err = cli(capsys, "info", folder)
    assert_user_error(code, err, str(folder / "matryoshka2d.json"), *needles)


@pytest.mark.parametrize(("field", "value"), [("num_hidden_layers", "four"), ("hidden_size", [32]),
                                              ("model_type", "gpt2")])
def test_transformers_config_of_the_wrong_type(field, value, tiny_dir, tmp_path, capsys) -> None:
    folder = edited_copy(tiny_dir, tmp_path / "m", "config.json", **{field: value})
    code, _, err = cli(capsys, "info", folder)
    assert_user_error(code, err, str(folder / "config.json"))


def test_model_folder_without_weights(tiny_dir, tmp_path, capsys, sentences) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    for argv in (["info", folder], ["encode", folder, "--input", sentences, "--output", tmp_path / "e.npy"]):
        code, _, err = cli(capsys, *argv)
        assert_user_error(code, err, str(folder), "holds no weights")
    assert not (tmp_path / "e.npy").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"{\"version\": \"1.0\", \"trunc", b"\xff\xfe garbage"])
def test_damaged_tokenizer_json_is_named(content, tiny_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "tokenizer.json").write_bytes(content)
    code, _, err = cli(capsys, "info", folder)
    assert_user_error(code, err, str(folder / "tokenizer.json"))


@pytest.mark.parametrize(("device", "needle"), [("tpu", "not a device torch knows"), ("cuda:99", "cuda"),
                                                ("cuda", "cuda"), ("mps", "MPS"), ("", "not a device")])
def test_bad_devices(device, needle, tiny_dir, sentences, capsys) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and device != "cuda:99":
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, _, err = cli(capsys, "bench", tiny_dir, "--sentences", sentences, "--device", device, "--repeats", "1")
    assert_user_error(code, err, f"--device {device!r}" if needle.startswith("not") else "--device", needle)


# ----------------------------------------------------------------------------------------- data and messages
def test_folder_given_as_input_file(tiny_dir, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "encode", tiny_dir, "--input", tmp_path, "--output", tmp_path / "e.npy")
    assert_user_error(code, err, str(tmp_path), "is a folder, not a file")


def test_input_messages_name_cli_flags_and_txt(tiny_dir, tmp_path, capsys) -> None:
    table = tmp_path / "in.tsv"
    table.write_text("text\nhello\n")
    code, _, err = cli(capsys, "encode", tiny_dir, "--input", table, "--column", "nope", "--output", tmp_path / "e.npy")
    assert_user_error(code, err, "--column")
    other = tmp_path / "in.docx"
    other.write_text("hello\n")
    code, _, err = cli(capsys, "encode", tiny_dir, "--input", other, "--output", tmp_path / "e.npy")
    assert_user_error(code, err, ".txt", ".jsonl")


def test_constant_gold_scores_warn_and_leave_averages(tiny_dir, data_dir, tmp_path, capsys) -> None:
    from matryoshka2d.evaluation.grid import GridResult

    out = tmp_path / "r.json"
    code, _, err = cli(capsys, "eval", tiny_dir, "--sets", "stsb,sickr", "--data-dir", data_dir, "--layers", "4",
                       "--dims", "32", "--output", out)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "same gold score" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING ") and "sickr" in warned[0], err
    saved = json.loads(out.read_text())
    sick = [r for r in saved["results"] if r["set"] == "sickr"]
    assert sick and all(r["spearman"] is None for r in sick)
    result = GridResult.load(out)
    avg = result.average(sets=["stsb", "sickr"])[(4, 32)]
    assert avg == pytest.approx(result.spearman("stsb", 4, 32))  # sickr left out, not nan


def test_local_folder_beats_an_alias(tiny_dir, tmp_path, capsys, monkeypatch) -> None:
    shutil.copytree(tiny_dir, tmp_path / "minilm")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "info", "minilm", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["layers"] == 4 and info["hidden_size"] == 32  # the tiny folder, not the bundled MiniLM (6 x 384)


# ----------------------------------------------------------------------------------------- modes and bugs
def test_saved_exported_and_checkpoint_files_follow_the_umask(tiny_dir, train_tsv, tmp_path, capsys) -> None:
    old = os.umask(0o022)
    try:
        code, _, err = cli(capsys, "export", tiny_dir, "--output", tmp_path / "exp")
        assert code == 0, err
        code, _, err = cli(capsys, *train_args(tiny_dir, train_tsv, tmp_path / "run"))
        assert code == 0, err
    finally:
        os.umask(old)
    files = [p for root in ("exp", "run") for p in (tmp_path / root).rglob("*")]
    assert any(p.name == "model.safetensors" and "checkpoints" in p.parts for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    wrong = {k: m for k, m in modes.items() if m != (oct(0o755) if (tmp_path / k).is_dir() else oct(0o644))}
    assert wrong == {}


def test_unexpected_errors_are_one_line_with_a_debug_hint(tiny_dir, capsys, monkeypatch) -> None:
    import matryoshka2d.cli.info as info

    def boom(args):  # noqa: ANN001, ANN202
        raise TypeError("something nobody checked")

    monkeypatch.setattr(info, "run", boom)
    code = main(["info", str(tiny_dir)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: TypeError: something nobody checked" in err and "--debug" in err
    code = main(["--debug", "info", str(tiny_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "boom" in err
    code = main(["info", str(tiny_dir), "--debug"])  # also after the command
    assert code == 1 and "Traceback" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- issue 35: environment
def test_a_lone_surrogate_in_training_data_is_exit_2(tiny_dir, tmp_path, capsys) -> None:
    data = tmp_path / "train.jsonl"
    rows = [{"sentence1": f"a man {i}", "sentence2": f"the dog {i}", "score": i % 4} for i in range(8)]
    rows[3]["sentence2"] = "ab\ud800cd"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # JSON escapes it: valid JSON
    code, _, err = cli(capsys, *train_args(tiny_dir, data, tmp_path / "run"))
    assert_user_error(code, err, f"{data}:4", "lone surrogate")


def test_overwrite_never_clears_another_tools_folder(tiny_dir, sentences, tmp_path, capsys) -> None:
    out = tmp_path / "theirs"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "their-data.bin").write_bytes(b"precious")
    (out / "run.json").write_text(json.dumps({"tool": "someone else's", "steps": 3}))
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "encode", tiny_dir, "--input", sentences, "--exits", "4:32", "--output", out,
                           *extra)
        line = assert_user_error(code, err, "run.json is not the run record of an m2d corpus encode",
                                 "--overwrite does not clear it")
        assert "pass --overwrite" not in line
    assert (out / "shards" / "their-data.bin").read_bytes() == b"precious"


def test_an_unreachable_ray_address_times_out_with_exit_2(tiny_dir, sentences, tmp_path) -> None:
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([*M2D, "encode", str(tiny_dir), "--input", str(sentences), "--exits", "4:32", "--engine",
                           "ray", "--ray-address", "127.0.0.1:1", "--ray-timeout", "3", "--skip-empty", "--output",
                           str(out)], env=ENV, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "rpc_client" not in line]
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 90
    assert any("no Ray cluster answered within 3 s (--ray-timeout)" in line for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(tmp_path) == []


def test_sigterm_stops_a_ray_connection_and_releases_the_lock(tiny_dir, sentences, tmp_path) -> None:
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    argv = [*(a for a in M2D if a != "-q"), "encode", str(tiny_dir), "--input", str(sentences), "--exits", "4:32",
            "--engine", "ray", "--ray-address", "127.0.0.1:1", "--skip-empty", "--output", str(out)]
    proc = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until it is connecting (model loaded, lock held, handler installed)
            if "connecting to the Ray cluster" in line:
                break
        time.sleep(1.0)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - start < 10
    assert code == 143
    assert leftovers(tmp_path) == []


def test_quiet_silences_library_bars_and_notices(tiny_dir, tmp_path) -> None:
    """Issue 35: -q showed transformers' "Writing model shards" bar; faiss's CPU-build notices always showed."""
    export = subprocess.run([*M2D, "export", str(tiny_dir), "--output", str(tmp_path / "exp")], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert export.stderr == ""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("doc_id\ttitle\ttext\nd1\t\ta dog\nd2\t\ta cat\n", encoding="utf-8")
    loud = [a for a in M2D if a != "-q"]
    index = subprocess.run([*loud, "index", str(tiny_dir), "--corpus", str(corpus), "--dims", "8,32", "--output",
                            str(tmp_path / "idx")], env=ENV, capture_output=True, text=True, timeout=300)
    assert index.returncode == 0, index.stderr
    assert "faiss.loader" not in index.stderr and "AVX" not in index.stderr


def test_a_failed_onnx_export_prints_no_graph(tiny_dir, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    proc = subprocess.run([*M2D, "export", str(tiny_dir), "--format", "onnx", "--opset", "9", "--output",
                           str(tmp_path / "onnx")], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # the exporter printed 100 kB of graph here
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not trace architecture 'bert' into ONNX opset 9" in lines[0], proc.stderr
    assert not (tmp_path / "onnx").exists()


def test_quiet_filters_numba_warnings_and_the_training_bar(tiny_dir, train_tsv, tmp_path, capsys) -> None:
    import logging
    import warnings

    from matryoshka2d.logs import setup_logging

    def numba_warning() -> None:  # as numba raises them (ranx compiles its metrics with numba)
        warnings.warn_explicit("The TBB threading layer requires TBB version 2021 update 6 or later",
                               UserWarning, "numba/np/ufunc/parallel.py", 1, module="numba.np.ufunc.parallel")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with setup_logging(logging.WARNING, quiet=True):
            numba_warning()
        assert seen == []
        with setup_logging(logging.INFO, verbose=True):
            numba_warning()
        assert len(seen) == 1
    args = [a for a in train_args(tiny_dir, train_tsv, tmp_path / "run") if a != "--no-progress-bar"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert "train:" not in err and "it/s" not in err and "step/s" not in err
