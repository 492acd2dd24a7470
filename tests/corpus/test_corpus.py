"""Corpus-scale encoding (matryoshka2d.corpus): streaming readers, several exits from one pass, shards,
resume after SIGKILL, bad input. Tiny random model; the Ray engine is in test_corpus_ray.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from matryoshka2d.cli import main  # noqa: E402
from matryoshka2d.corpus import CorpusReader, encode_corpus, make_job, resolve_inputs  # noqa: E402
from matryoshka2d.corpus.readers import Position  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORDS = "a man dog cat plays the guitar in park red blue woman reads book under tree".split()


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 14)))) for _ in range(n)]


def write_formats(folder: Path, texts: list[str]) -> dict[str, Path]:
    """The same corpus (ids d0..) as .tsv, .csv (with quoted commas and newlines), .jsonl and .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"d{i}" for i in range(len(texts))]
    paths = {k: folder / f"c.{k}" for k in ("tsv", "csv", "jsonl", "parquet")}
    rows = "".join(f"{i}\t{t}\n" for i, t in zip(ids, texts, strict=True))
    paths["tsv"].write_text("id\ttext\n" + rows, encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(zip(ids, texts, strict=True))
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True)),
                              encoding="utf-8")
    pq.write_table(pa.table({"id": ids, "text": texts}), paths["parquet"], row_group_size=7)
    return paths


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(folder / "shards")


def vectors(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


# ------------------------------------------------------------------------------------------ readers
def test_every_format_streams_the_same_records_and_resumes_from_any_position(tmp_path: Path) -> None:
    texts = corpus_texts(40)
    texts[5] = 'a text, with a comma and "quotes"\nand a second line'  # CSV quoting; one line in jsonl/parquet
    paths = write_formats(tmp_path, [t.replace("\n", " ") for t in texts[:5]] + texts[5:])
    tsv_texts = [t.replace("\n", " ") for t in texts]
    paths["tsv"].write_text("id\ttext\n" + "".join(f"d{i}\t{t}\n" for i, t in enumerate(tsv_texts)))
    for kind, path in paths.items():
        reader = CorpusReader([path], id_column="id")
        records = list(reader.records())
        assert [r.id for r in records] == [f"d{i}" for i in range(40)], kind
        assert [r.text for r in records] == (tsv_texts if kind == "tsv" else texts), kind
        for k in (0, 6, 17, 39):  # restart from a record's position, as a shard does
            again = list(reader.records(Position.from_dict(records[k].position.to_dict())))
            assert [r.id for r in again] == [r.id for r in records[k:]], (kind, k)
    assert [r.position.line for r in CorpusReader([paths["csv"]], id_column="id").records()][5:8] == [7, 9, 10]


def test_inputs_from_glob_and_folder_and_line_number_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("\ufeffthree\r\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    files = resolve_inputs([tmp_path])
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    assert resolve_inputs([str(tmp_path / "**" / "*.txt")]) == files
    records = list(CorpusReader(files).records())
    assert [(r.id, r.text) for r in records] == [("a.txt:1", "one"), ("a.txt:2", "two"), ("sub/b.txt:1", "three")]
    assert [r.id for r in CorpusReader([files[0]]).records()] == ["1", "2"]
    with pytest.raises(FileNotFoundError, match="no such file, folder or glob match"):
        resolve_inputs([tmp_path / "missing.tsv"])
    with pytest.raises(ValueError, match=r"a \.txt file has one text per line and no columns"):
        CorpusReader(files, id_column="id")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("content, message", [
    (b"id\ttext\nx\tone\ny\ttwo\nx\tthree\n", r"c\.tsv:4: duplicate id 'x'"),
    (b"id\ttext\nx\tone\ny\t  \n", r"c\.tsv:3: empty text; .*--skip-empty"),
    (b"id\ttext\nx\tone\ny\tbad \xff byte\n", r"c\.tsv:3: not valid UTF-8"),
    (b"id\ttext\nx\tone\ty\n", r"c\.tsv:2: 3 fields, expected 2"),
    (b"id\ttext\nx\tone\x00\n", r"c\.tsv:2: NUL byte"),
])
def test_bad_rows_fail_before_any_encoding_naming_file_and_line(tiny_model, tmp_path: Path, content: bytes,
                                                               message: str) -> None:
    (tmp_path / "c.tsv").write_bytes(content)
    job = make_job(tiny_model, "tiny", [str(tmp_path / "c.tsv")], "2:16", id_column="id")
    with pytest.raises(ValueError, match=message):
        encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False)
    assert not (tmp_path / "out").exists()  # a bad input never claims the output folder


def test_skip_empty_skips_and_counts(tiny_model, tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a man"}\n{"id": 2, "text": ""}\n\n'
                                      '{"id": 3, "text": null}\n{"id": 4, "text": "a dog"}\n', encoding="utf-8")
    job = make_job(tiny_model, "tiny", [str(tmp_path / "c.jsonl")], "2:16", id_column="id", skip_empty=True)
    manifest = encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False)
    assert (manifest["rows"], manifest["skipped_empty"]) == (2, 2)
    assert read_output(tmp_path / "out").column("id").to_pylist() == ["1", "4"]


# ------------------------------------------------------------------------------------------ outputs
def test_several_exits_in_one_pass_equal_separate_encodes(tiny_model, tmp_path: Path) -> None:
    texts = corpus_texts(150)
    paths = write_formats(tmp_path / "in", texts)
    job = make_job(tiny_model, "tiny", [str(paths["parquet"])], "2:16,4:32,4:8", id_column="id", shard_size=60)
    manifest = encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False)
    table = read_output(tmp_path / "out")
    assert table.column_names == ["id", "layer2_dim16", "layer4_dim32", "layer4_dim8"]
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(150)]
    assert (manifest["rows"], manifest["num_shards"]) == (150, 3)
    assert [s["rows"] for s in manifest["shards"]] == [60, 60, 30]
    for layer, dim in ((2, 16), (4, 32), (4, 8)):
        ref = np.concatenate([tiny_model.encode(texts[a:a + 60], layer=layer, dim=dim) for a in (0, 60, 120)])
        np.testing.assert_array_equal(vectors(table, f"layer{layer}_dim{dim}"), ref)
        np.testing.assert_allclose(vectors(table, f"layer{layer}_dim{dim}"),
                                   tiny_model.encode(texts, layer=layer, dim=dim), atol=1e-6)


def test_formats_float16_int8_binary(tiny_model, tmp_path: Path) -> None:
    paths = write_formats(tmp_path / "in", corpus_texts(30))
    out = {}
    for fmt in ("float32", "float16", "int8", "binary"):
        job = make_job(tiny_model, "tiny", [str(paths["tsv"])], "3:12", id_column="id", fmt=fmt)
        encode_corpus(job, tmp_path / fmt, model=tiny_model, progress=False)
        out[fmt] = vectors(read_output(tmp_path / fmt), "layer3_dim12")
    x = out["float32"]
    assert out["float16"].dtype == np.float16 and np.abs(out["float16"] - x).max() < 1e-3
    np.testing.assert_array_equal(out["int8"], np.clip(np.rint(x * 127), -127, 127).astype(np.int8))
    assert out["binary"].shape == (30, 2) and out["binary"].dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(out["binary"], axis=1)[:, :12], (x > 0).astype(np.uint8))
    with pytest.raises(ValueError, match="int8 quantises normalised vectors"):
        make_job(tiny_model, "tiny", [str(paths["tsv"])], "3:12", fmt="int8", normalize=False)
    with pytest.raises(ValueError, match=r"--format 'bf16' is not one of"):
        make_job(tiny_model, "tiny", [str(paths["tsv"])], "3:12", fmt="bf16")
    with pytest.raises(ValueError, match="out of range"):
        make_job(tiny_model, "tiny", [str(paths["tsv"])], "9:12")


def test_rerun_skips_finished_shards_and_another_command_is_an_error(tiny_model, tmp_path: Path) -> None:
    paths = write_formats(tmp_path / "in", corpus_texts(50))
    job = make_job(tiny_model, "tiny", [str(paths["csv"])], "2:16", id_column="id", shard_size=20)
    first = encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False)
    (tmp_path / "out" / "shards" / "part-00001.parquet").unlink()  # as if killed before this shard
    again = encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False)
    assert again.pop("run")["resumed_shards"] == 2 and first.pop("run")["resumed_shards"] == 0
    assert again == first
    other = make_job(tiny_model, "tiny", [str(paths["csv"])], "2:8", id_column="id", shard_size=20)
    with pytest.raises(ValueError, match=r"output of a different command \(differs in: exits\)"):
        encode_corpus(other, tmp_path / "out", model=tiny_model, progress=False)
    assert encode_corpus(other, tmp_path / "out", model=tiny_model, progress=False, overwrite=True)["rows"] == 50
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a corpus output"):
        encode_corpus(job, tmp_path / "mine", model=tiny_model, progress=False)


def test_every_shard_hands_the_free_heap_back(tiny_model, tmp_path: Path, monkeypatch) -> None:
    import platform

    import matryoshka2d.corpus.shards as shards

    calls = []
    real = shards.release_free_memory
    monkeypatch.setattr(shards, "release_free_memory", lambda: calls.append(1) or real())
    paths = write_formats(tmp_path / "in", corpus_texts(50))
    job = make_job(tiny_model, "tiny", [str(paths["csv"])], "2:16", id_column="id", shard_size=20)
    assert encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False)["rows"] == 50
    assert len(calls) == 3  # one trim per shard
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert real() is True  # glibc has malloc_trim


# ------------------------------------------------------------------------------------------ CLI
def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_cli_resume_after_sigkill_gives_the_identical_manifest(tiny_dir: Path, tmp_path: Path) -> None:
    texts = corpus_texts(6000, seed=1)
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")

    def command(out: Path) -> list[str]:
        return [sys.executable, "-c", "import sys; from matryoshka2d.cli import main; sys.exit(main(sys.argv[1:]))",
                "-q", "encode", str(tiny_dir), "--pooling", "mean", "--input", str(tmp_path / "c.txt"),
                "--exits", "2:16,4:32", "--output", str(out), "--shard-size", "250", "--batch-size", "16",
                "--threads", "1"]

    subprocess.run(command(tmp_path / "whole"), env=cli_env(), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "shards" / "part-00000.parquet").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists(), "the run finished before it was killed"
    done = sorted(p.name for p in (killed / "shards").glob("part-*.parquet"))
    assert 1 <= len(done) < 24
    rerun = subprocess.run(command(killed), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} shards already done" in rerun.stdout
    assert (killed / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json").read_text()
    assert not [p for p in (killed / "shards").iterdir() if p.name.startswith(".")]  # no temporaries left
    ids = read_output(killed).column("id").to_pylist()
    assert ids == [str(i) for i in range(1, 6001)]


def test_cli_npy_output_unchanged_and_corpus_errors(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "s.txt").write_text("a man\na dog\n", encoding="utf-8")
    assert main(["encode", str(tiny_dir), "--layer", "2", "--dim", "8", "--input", str(tmp_path / "s.txt"),
                 "--output", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 8)
    assert main(["encode", str(tiny_dir), "--input", str(tmp_path / "s.txt"), str(tmp_path / "s.txt"),
                 "--output", str(tmp_path / "e2.npy")]) == 2
    assert "the .npy output takes one file" in capsys.readouterr().err
    assert main(["encode", str(tiny_dir), "--input", str(tmp_path / "s.txt"), "--exits", "2:8x",
                 "--output", str(tmp_path / "o")]) == 2
    assert "--exits item '2:8x' is not LAYER:DIM" in capsys.readouterr().err
    assert main(["-q", "encode", str(tiny_dir), "--input", str(tmp_path / "s.txt"), "--exits", "2:8,4",
                 "--output", str(tmp_path / "o"), "--format", "float16"]) == 0
    assert "wrote 2 rows at exits 2:8,4:32 (float16) in 1 shards" in capsys.readouterr().out


def test_progress_moves_after_every_batch(tiny_model) -> None:
    """Issue 35: the bar moved once per 8,192-text chunk (0% for minutes on SciFact); now once per batch."""
    from matryoshka2d.corpus.shards import Exit, embed_exits

    calls: list[int] = []
    texts = [f"the dog runs {i}" for i in range(10)]
    out = embed_exits(tiny_model, texts, [Exit(4, 32)], batch_size=3, progress=calls.append)
    assert calls == [3, 3, 3, 1]
    np.testing.assert_allclose(out[Exit(4, 32)], tiny_model.encode(texts, layer=4), atol=1e-5)


def test_the_run_records_each_inputs_digest(tiny_dir, tmp_path) -> None:
    from matryoshka2d.io.manifest import file_sha256

    texts = tmp_path / "t.txt"
    texts.write_text("a\nb\n", encoding="utf-8")
    assert main(["-q", "encode", str(tiny_dir), "--input", str(texts), "--exits", "4:32", "--output",
                 str(tmp_path / "out")]) == 0
    for name in ("run.json", "manifest.json"):
        obj = json.loads((tmp_path / "out" / name).read_text())
        inputs = (obj.get("job") or obj)["inputs"]
        assert inputs == [{"path": str(texts.resolve()), "size": 4, "sha256": file_sha256(texts)}]
