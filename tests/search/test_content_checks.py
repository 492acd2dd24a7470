"""Content, not names (issue 35): index files and the model that built an index are checked by digest, a
corpus run refuses to resume over edited input, a result refuses another run's sidecar or NaN in it, TREC
runs refuse ids they cannot carry. Each case is the issue's example: exit 2 with one line, or the right answer.
See docs/reliability.md ("Content, not names").
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d.evaluation.grid import GridResult
from matryoshka2d.io.manifest import file_sha256
from matryoshka2d.search.index import CascadeIndex
from tests.helpers.cli import INDEX_DAMAGE, assert_user_error, cli, damage_index

DOCS = [(f"d{i}", f"a man plays {i} near the {'river' if i % 2 else 'house'}") for i in range(12)]


@pytest.fixture(scope="module")
def world(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("content")
    corpus = root / "corpus.tsv"
    corpus.write_text("doc_id\ttitle\ttext\n" + "".join(f"{i}\t\t{t}\n" for i, t in DOCS), encoding="utf-8")
    queries = root / "queries.tsv"
    queries.write_text("query_id\ttext\nq1\ta man plays\nq2\tthe house\n", encoding="utf-8")
    index = root / "index"
    assert cli_main("index", tiny_dir, "--corpus", corpus, "--dims", "8,32", "--output", index) == 0
    return {"root": root, "corpus": corpus, "queries": queries, "index": index, "model": tiny_dir}


def cli_main(*argv: object) -> int:
    from matryoshka2d.cli import main

    return main(["-q", *map(str, argv)])


def search_args(world: dict[str, Path], index: Path, out: Path, *extra: object) -> list[object]:
    return ["search", index, "--queries", world["queries"], "--output", out, *extra]


# ----------------------------------------------------------------------------------------- the index files
@pytest.mark.parametrize("how", INDEX_DAMAGE)
def test_a_damaged_index_is_one_line_and_exit_2(how, world, tmp_path, capsys) -> None:
    damaged = damage_index(world["index"], tmp_path / "idx", how)
    start = time.monotonic()
    code, _, err = cli(capsys, *search_args(world, damaged, tmp_path / "r.trec"))
    line = assert_user_error(code, err, str(damaged))
    assert time.monotonic() - start < 30
    assert not (tmp_path / "r.trec").exists()
    needle = {"truncated-faiss": "truncated", "no-dims": "'dims'", "version-string": "format_version '2'",
              "files-list": "'files' is a JSON list", "ids-dict": "ids.json", "duplicate-id": "ids.json",
              "swapped-rows": "same size, different SHA-256"}[how]
    assert needle in line, line


def test_no_verify_checks_sizes_only(world, tmp_path, capsys) -> None:
    """--no-verify skips the digests (the cost measured in docs/retrieval.md), not the size checks."""
    swapped = damage_index(world["index"], tmp_path / "swapped", "swapped-rows")
    code, _, err = cli(capsys, *search_args(world, swapped, tmp_path / "r.trec", "--no-verify"))
    assert code == 0, err
    truncated = damage_index(world["index"], tmp_path / "truncated", "truncated-faiss")
    code, _, err = cli(capsys, *search_args(world, truncated, tmp_path / "r2.trec", "--no-verify"))
    assert_user_error(code, err, "truncated")


def test_manifest_records_digests_and_the_model(world) -> None:
    manifest = json.loads((world["index"] / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    for name, entry in manifest["files"].items():
        assert entry == {"size": (world["index"] / name).stat().st_size,
                         "sha256": file_sha256(world["index"] / name)}
    assert manifest["model"] == str(world["model"])
    assert manifest["model_path"] == str(world["model"].resolve())
    assert len(manifest["model_fingerprint"]) == 64


def test_shortlist_dim_zero_is_an_error(world, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, *search_args(world, world["index"], tmp_path / "r.trec", "--shortlist-dim", "0"))
    assert_user_error(code, err, "shortlist dim 0", "[8, 32]")


def test_qrels_documents_missing_from_the_index_are_warned(world, tmp_path, capsys) -> None:
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query_id\tdoc_id\tscore\nq1\td1\t1\nq2\tgone\t1\n", encoding="utf-8")
    code, _, err = cli(capsys, *search_args(world, world["index"], tmp_path / "r.trec", "--qrels", qrels))
    assert code == 0, err
    assert "1 relevant document(s) of the qrels are not in the index" in err and "'gone'" in err


# ----------------------------------------------------------------------------------------- the model of an index
def test_another_model_is_refused_unless_forced(world, tmp_path, capsys) -> None:
    from tests.conftest import build_tiny_model

    narrow = build_tiny_model(tmp_path / "narrow", hidden=16)  # 16 wide, the index's model 32
    capsys.readouterr()  # transformers' bar while saving it
    code, _, err = cli(capsys, *search_args(world, world["index"], tmp_path / "r.trec", "--model", narrow))
    assert_user_error(code, err, "is not the model that built this index", "16 wide", "--force")
    same_width = tmp_path / "other"  # same weights, another config: another fingerprint
    shutil.copytree(world["model"], same_width)
    config = json.loads((same_width / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (same_width / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, *search_args(world, world["index"], tmp_path / "r.trec", "--model", same_width))
    assert_user_error(code, err, "fingerprint")
    code, _, err = cli(capsys, *search_args(world, world["index"], tmp_path / "r.trec", "--model", same_width,
                                            "--force"))
    assert code == 0 and "searching anyway (--force)" in err, err
    code, _, err = cli(capsys, *search_args(world, world["index"], tmp_path / "r2.trec", "--model", world["model"]))
    assert code == 0, err  # the index's own model, named by another path


def test_a_relative_model_path_is_never_resolved_in_another_folder(world, tmp_path, capsys, monkeypatch) -> None:
    from tests.conftest import build_tiny_model

    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(world["model"], here / "tiny")
    build_tiny_model(there / "tiny", hidden=16)  # another model under the same relative name
    capsys.readouterr()
    monkeypatch.chdir(here)
    assert cli_main("index", "tiny", "--corpus", world["corpus"], "--dims", "8,32", "--output", tmp_path / "idx") == 0
    assert cli_main(*search_args(world, tmp_path / "idx", tmp_path / "a.trec")) == 0
    monkeypatch.chdir(there)
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "b.trec"))
    assert code == 0, err  # the recorded absolute path, not ./tiny here
    assert (tmp_path / "a.trec").read_text() == (tmp_path / "b.trec").read_text()
    shutil.rmtree(here / "tiny")
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "c.trec"))
    assert_user_error(code, err, "no longer there", "--model")
    # an index written before fingerprints records only the relative name: refused, not looked up here
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    for key in ("model_path", "model_fingerprint"):
        manifest.pop(key)
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "c.trec"))
    assert_user_error(code, err, "records its model only as 'tiny'", "--model")


def test_an_index_of_format_1_still_loads_with_sizes_checked(world, tmp_path, capsys, caplog) -> None:
    old = tmp_path / "old"
    shutil.copytree(world["index"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    for key in ("model_path", "model_fingerprint"):
        manifest.pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, *search_args(world, old, tmp_path / "r.trec"))  # its model: an absolute path
    assert code == 0, err
    assert "records file sizes, not digests; rebuild it" in err
    (old / "ids.json").write_text((old / "ids.json").read_text() + " ")
    code, _, err = cli(capsys, *search_args(world, old, tmp_path / "r2.trec"))
    assert_user_error(code, err.split("\n", 1)[1], "ids.json", "truncated or altered")  # after the warning


# ----------------------------------------------------------------------------------------- TREC ids
def test_trec_runs_refuse_ids_with_whitespace(world, tiny_dir, tmp_path, capsys) -> None:
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("doc_id\ttitle\ttext\n" + "".join(f"doc {i}\t\t{t}\n" for i, t in DOCS[:4]), encoding="utf-8")
    assert cli_main("index", tiny_dir, "--corpus", corpus, "--dims", "8,32", "--output", tmp_path / "idx") == 0
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "r.trec"))
    assert_user_error(code, err, "document id 'doc ", "index row", "JSONL", "r.jsonl")
    assert not (tmp_path / "r.trec").exists()
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "r.jsonl"))
    assert code == 0, err
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])["results"][0]["doc_id"].startswith("doc ")


# ----------------------------------------------------------------------------------------- corpus resume
def test_corpus_resume_over_an_edited_input_is_refused(tiny_dir, tmp_path, capsys) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"the dog runs {i}\n" for i in range(6)), encoding="utf-8")
    out = tmp_path / "out"
    args = ["encode", tiny_dir, "--input", texts, "--exits", "4:32", "--shard-size", "2", "--output", out]
    assert cli_main(*args) == 0
    # a run killed after two shards: the manifest and the last shard are not there yet
    (out / "manifest.json").unlink()
    (out / "shards" / "part-00002.parquet").unlink()
    kept = sorted((out / "shards").iterdir())
    before = [p.read_bytes() for p in kept]
    texts.write_text(texts.read_text().replace("runs 1", "sits 1"), encoding="utf-8")  # same size, other text
    code, _, err = cli(capsys, *args)
    assert_user_error(code, err, str(texts.resolve()), "changed", "--overwrite")
    assert [p.read_bytes() for p in kept] == before  # nothing rewritten
    assert cli_main(*args, "--overwrite") == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out / "shards" / "part-00000.parquet")
    from matryoshka2d import MatryoshkaEncoder

    fresh = MatryoshkaEncoder.from_pretrained(tiny_dir).encode(["the dog sits 1"], layer=4)
    np.testing.assert_allclose(np.asarray(table.column("layer4_dim32")[1].as_py()), fresh[0], atol=1e-5)


# ----------------------------------------------------------------------------------------- result sidecars
@pytest.fixture(scope="module")
def result_json(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    (root / "data" / "stsb").mkdir(parents=True)
    (root / "data" / "stsb" / "test.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"a man plays {i}\tthe dog runs {i % 3}\t{i % 5}\n" for i in range(10)), encoding="utf-8")
    out = root / "r.json"
    assert cli_main("eval", tiny_dir, "--sets", "stsb", "--data-dir", root / "data", "--layers", "2,4", "--dims",
                    "8,32", "--output", out) == 0
    return out


def test_results_record_the_digest_of_their_sidecar(result_json) -> None:
    info = json.loads(result_json.read_text())["predictions"]
    assert info["sha256"] == file_sha256(result_json.with_name(info["file"]))


def test_a_copied_result_does_not_read_a_newer_runs_sidecar(result_json, tiny_dir, tmp_path, capsys) -> None:
    run = tmp_path / "r.json"
    shutil.copy(result_json, run)
    shutil.copy(result_json.with_name("r.preds.npz"), tmp_path / "r.preds.npz")
    copy = tmp_path / "copy.json"
    shutil.copy(run, copy)  # points at r.preds.npz, as the copied result did
    data = result_json.parent / "data"
    assert cli_main("eval", tiny_dir, "--sets", "stsb", "--data-dir", data, "--layers", "2,4", "--dims", "8,32",
                    "--pooling", "cls", "--output", run, "--overwrite") == 0  # a newer run rewrites the sidecar
    code, _, err = cli(capsys, "compare", run, copy, "--labels", "new,copy", "--draws", "10")
    assert_user_error(code, err, "r.preds.npz is not the sidecar written with", str(copy))


def test_nan_in_a_sidecar_is_refused(result_json, tmp_path, capsys) -> None:
    bad = tmp_path / "nan.json"
    obj = json.loads(result_json.read_text())
    with np.load(result_json.with_name("r.preds.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pred_0"][0, 0, :3] = np.nan
    np.savez(tmp_path / "nan.preds.npz", **arrays)
    obj["predictions"] = {**obj["predictions"], "file": "nan.preds.npz",
                          "sha256": file_sha256(tmp_path / "nan.preds.npz")}  # the right digest: NaN itself is refused
    bad.write_text(json.dumps(obj))
    code, _, err = cli(capsys, "compare", result_json, bad, "--labels", "a,b", "--draws", "10")
    assert_user_error(code, err, "nan.preds.npz: array pred_0 holds 3 NaN")
    with pytest.raises(ValueError, match="NaN"):
        GridResult.load(bad)


def test_an_index_without_a_model_record(world, tmp_path, capsys) -> None:
    """An index saved by the library without ``source`` loads, but search will not guess its model (it
    guessed minilm, or the trained model's base, before); a repeated id is refused at build time."""
    rng = np.random.default_rng(0)
    index = CascadeIndex.from_vectors([f"d{i}" for i in range(5)], rng.normal(size=(5, 8)), [4, 8], layer=1)
    index.save(tmp_path / "idx")
    assert CascadeIndex.load(tmp_path / "idx").ids == index.ids
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "r.trec"))
    assert_user_error(code, err, "records no model", "--model")
    code, _, err = cli(capsys, *search_args(world, tmp_path / "idx", tmp_path / "r.trec", "--model", world["model"]))
    assert code == 0, err
    with pytest.raises(ValueError, match="repeat"):
        CascadeIndex.from_vectors(["a", "a"], rng.normal(size=(2, 8)), [8], layer=1)
