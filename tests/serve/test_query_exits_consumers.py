"""Every consumer of a model with query exits of its own (``m2d align``) takes ``input_type``: the server (torch,
onnx and openvino runners, mixed batches of queries and documents), ``m2d export --input-type query``, and the
corpus encoder (``m2d encode --exits --input-type``); exports record the document space in ``config.json``,
``matryoshka2d.json`` and the model card."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import main
from matryoshka2d.training.align import AlignConfig, align_query_exits

TEXTS = ["the dog runs in the park", "a man is playing the guitar", "the cat sits on the red car",
         "two children are eating food near the river", "the woman reads a book under a tree",
         "a woman plays the piano in the house", "who plays music", "a dog in the park"]
SPACE = {"document_exit": 4, "query_exits": [1, 2, 4], "query_path": "own"}


@pytest.fixture(scope="module")
def aligned_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with own query paths at exits 1 and 2, pushed well away from the shared path."""
    model = MatryoshkaEncoder.from_pretrained(tiny_dir)
    align_query_exits(model, TEXTS, AlignConfig(exits=[1, 2], method="lora", rank=2, epochs=1, batch_size=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a query path far from the documents', so a wrong route cannot pass for the right one
        for p in model.query_path.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("aligned") / "aligned"
    model.save(folder)
    return folder


@pytest.fixture(scope="module")
def aligned(aligned_dir: Path) -> MatryoshkaEncoder:
    return MatryoshkaEncoder.from_pretrained(aligned_dir).eval()


ROUTES = [4, -2, 2, -1, 1, -2, 4, 3]  # exit n on the shared path, -n on exit n's own query path


def expected(model: MatryoshkaEncoder, routes: list[int]) -> np.ndarray:
    return np.stack([model.encode([TEXTS[i]], layer=abs(r), normalize=False,
                                  input_type="query" if r < 0 else "document")[0] for i, r in enumerate(routes)])


def run_batched(model: MatryoshkaEncoder, routes: list[int], runner: object = None) -> np.ndarray:
    """Every text as its own request at once (they share batches), text ``i`` on ``routes[i]``."""
    from matryoshka2d.serve.batcher import Batcher

    ids = model.tokenizer(TEXTS)["input_ids"]
    batcher = Batcher(model, max_batch_tokens=4096, max_batch_requests=64, batch_wait_ms=20, max_queue=64,
                      runner=runner)

    async def send() -> list[np.ndarray]:
        return await asyncio.gather(*[batcher.submit([row], route=r) for row, r in zip(ids, routes, strict=True)])

    batcher.start()
    try:
        return np.concatenate(asyncio.run(send()))
    finally:
        batcher.stop()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_torch_runner_runs_queries_and_documents_in_one_batch(aligned: MatryoshkaEncoder) -> None:
    pytest.importorskip("fastapi")
    want = expected(aligned, ROUTES)
    got = run_batched(aligned, ROUTES)
    assert cosine(got, want).min() >= 0.9999
    # the routes really differ: a query row is not its text's shared-path vector
    shared = expected(aligned, [abs(r) for r in ROUTES])
    assert cosine(got, shared)[[1, 3, 5]].max() < 0.999


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_runners_have_a_graph_per_query_exit(aligned: MatryoshkaEncoder, tmp_path: Path,
                                                      backend: str) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("onnxruntime", reason="the onnx extra")
    from matryoshka2d.serve.runners import OnnxRunner, OpenVinoRunner

    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra")
        runner = OpenVinoRunner.from_model(aligned, tmp_path / "exits", threads=1, precision="f32")
    else:
        runner = OnnxRunner.from_model(aligned, tmp_path / "exits", threads=1)
    assert runner.describe()["exits"] == [1, 2, 3, 4] and runner.describe()["query_exits"] == [1, 2]
    assert (tmp_path / "exits" / "query-exit-2" / "manifest.json").is_file()
    meta = json.loads((tmp_path / "exits" / "query-exit-2" / "matryoshka2d.json").read_text())
    assert meta["exported_from"]["document_space"] == {**SPACE, "exit": 2, "input_type": "query"}
    got = run_batched(aligned, ROUTES, runner)
    assert cosine(got, expected(aligned, ROUTES)).min() >= 0.9999


def test_server_takes_input_type(aligned_dir: Path, aligned: MatryoshkaEncoder, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from tests.helpers.serve import running_server

    with running_server(aligned_dir, tmp_path / "serve.log") as server:
        info = httpx.get(f"{server.url}/info").json()
        assert info["document_space"] == SPACE
        post = lambda **body: httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[:3], **body})  # noqa: E731
        for input_type in ("query", "document", None):
            body = {"layer": 2, **({"input_type": input_type} if input_type else {})}
            got = np.array([d["embedding"] for d in post(**body).json()["data"]], dtype=np.float32)
            want = aligned.encode(TEXTS[:3], layer=2, input_type=input_type or "document")
            assert cosine(got, want).min() >= 0.9999, input_type
        # a query at an exit without its own path takes the shared path, as encode does
        got = np.array([d["embedding"] for d in post(layer=3, input_type="query").json()["data"]])
        assert cosine(got, aligned.encode(TEXTS[:3], layer=3)).min() >= 0.9999
        bad = post(layer=2, input_type="passage")
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "input_type" and "passage" in bad.json()["error"]["message"]


def test_export_of_a_query_exit_and_the_document_space(aligned_dir: Path, aligned: MatryoshkaEncoder,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q2"
    assert main(["export", str(aligned_dir), "--layer", "2", "--format", "sentence-transformers", "--no-verify",
                 "--input-type", "query", "--output", str(out)]) == 0
    assert "own query path of layer 2" in capsys.readouterr().out
    back = MatryoshkaEncoder.from_pretrained(out)
    assert back.num_layers == 2
    np.testing.assert_allclose(back.encode(TEXTS, layer=2), aligned.encode(TEXTS, layer=2, input_type="query"),
                               atol=2e-5)
    space = {**SPACE, "exit": 2, "input_type": "query"}
    assert json.loads((out / "config.json").read_text())["matryoshka2d_document_space"] == space
    assert json.loads((out / "matryoshka2d.json").read_text())["exported_from"]["document_space"] == space
    assert "this folder is the own query path of layer 2: encode queries only" in (out / "README.md").read_text()
    docs = tmp_path / "d4"
    assert main(["export", str(aligned_dir), "--layer", "4", "--format", "hf", "--no-verify",
                 "--output", str(docs)]) == 0
    assert json.loads((docs / "config.json").read_text())["matryoshka2d_document_space"] == {
        **SPACE, "exit": 4, "input_type": "document"}
    assert "this folder encodes documents (layer 4)" in (docs / "README.md").read_text()
    capsys.readouterr()
    assert main(["export", str(aligned_dir), "--layer", "3", "--input-type", "query",
                 "--output", str(tmp_path / "q3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 3 has no query path of its own (query exits: [1, 2])" in err and len(err.splitlines()) == 1


def test_corpus_encode_takes_input_type_and_index_refuses_query_vectors(
        aligned_dir: Path, aligned: MatryoshkaEncoder, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\n" + "".join(f"t{i}\t{t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    for kind in ("query", "document"):
        out = tmp_path / kind
        assert main(["encode", str(aligned_dir), "--input", str(corpus), "--exits", "2:32", "--input-type", kind,
                     "--output", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["input_type"] == kind
        run = json.loads((out / "run.json").read_text())
        assert ("input_type" in run["job"]) == (kind == "query")  # records written before the option still resume
        table = pq.read_table(next((out / "shards").glob("*.parquet")))
        got = np.array(table.column(table.column_names[1]).to_pylist(), dtype=np.float32)
        assert cosine(got, aligned.encode(TEXTS, layer=2, input_type=kind)).min() >= 0.9999
    capsys.readouterr()
    assert main(["index", str(aligned_dir), "--encoded", str(tmp_path / "query"), "--dims", "8,32",
                 "--output", str(tmp_path / "idx")]) == 2
    assert "holds 'query' vectors" in capsys.readouterr().err
