"""``m2d serve --backend openvino`` (every exit exported to OpenVINO), the backend choice, the OpenVINO defaults
shared by the library, the CLI and the server, and torch on a GPU."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import SENTENCES

pytest.importorskip("fastapi")
from matryoshka2d import MatryoshkaEncoder  # noqa: E402
from matryoshka2d.serve.batcher import Batcher  # noqa: E402
from tests.helpers.serve import running_server  # noqa: E402

TEXTS = [t for t in SENTENCES if t]
NAME = "tiny-heads"  # conftest.heads_dir


def needs_openvino() -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pytest.importorskip("onnxruntime", reason="the openvino backend converts from ONNX: the onnx extra")


def needs_bf16() -> None:
    from matryoshka2d.export.runtime import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 (OpenVINO reports no BF16 capability)")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def model(heads_dir: Path) -> MatryoshkaEncoder:
    return MatryoshkaEncoder.from_pretrained(heads_dir).eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every exit exported once (f32 runner); the tests below reuse the folder."""
    needs_openvino()
    from matryoshka2d.serve.runners import OpenVinoRunner

    root = tmp_path_factory.mktemp("ov-exports") / "exits"
    OpenVinoRunner.from_model(model, root, threads=1, precision="f32")
    return root


def crowd(batcher: Batcher, rows: list[list[int]], layers: list[int]) -> list[np.ndarray]:
    """Submit every row as its own request at once (they share batches) and wait for all."""

    async def run() -> list[np.ndarray]:
        return await asyncio.gather(*[batcher.submit([row], route=n) for row, n in zip(rows, layers, strict=True)])

    batcher.start()
    try:
        return asyncio.run(run())
    finally:
        batcher.stop()


@pytest.mark.parametrize(("precision", "threads", "floor"), [("f32", 1, 0.9999), ("f32", 2, 0.9999),
                                                              ("bf16", 2, 0.999)])
def test_mixed_layer_batches_equal_encode_at_every_exit(model, exports, precision, threads, floor) -> None:
    """Rows of every exit in shared batches, on one stream or two (chunks in flight at once): each row equals
    ``encode`` at its exit (f32 >= 0.9999, bf16 >= 0.999)."""
    from matryoshka2d.serve.runners import OpenVinoRunner

    if precision == "bf16":
        needs_bf16()
    runner = OpenVinoRunner.from_model(model, exports, threads=threads, precision=precision)
    assert sorted(runner.encoders) == [1, 2, 3, 4] and runner.streams == threads
    assert {e.precision for e in runner.encoders.values()} == {precision}
    texts = TEXTS * 3
    layers = [1 + i % 4 for i in range(len(texts))]
    batcher = Batcher(model, max_batch_tokens=8192, max_batch_requests=64, batch_wait_ms=50, max_queue=200,
                      runner=runner)
    results = crowd(batcher, model.tokenizer(texts)["input_ids"], layers)
    for text, n, vectors in zip(texts, layers, results, strict=True):
        assert cosines(vectors, model.encode([text], layer=n)).min() >= floor, (n, text)


def test_chunks_cover_every_row_once_and_balance_the_cost(model, exports) -> None:
    """A 50/50 layer-1 / layer-4 batch on two streams: every row in exactly one chunk, chunks trimmed to their
    longest row, costliest first, none more than twice the mean (the mix costs about its mean depth)."""
    from matryoshka2d.serve.runners import OpenVinoRunner

    runner = OpenVinoRunner.from_model(model, exports, threads=2, precision="f32")
    texts = [f"{t} {i}" for i in range(4) for t in TEXTS]
    tokens = model.tokenizer(texts, padding=True, return_tensors="np")
    arrays = {k: v.astype(np.int64) for k, v in tokens.items()}
    exits = [1 if i % 2 else 4 for i in range(len(texts))]
    chunks = runner.chunks(arrays, exits)
    rows = np.concatenate([rows for _, rows, _ in chunks])
    assert sorted(rows.tolist()) == list(range(len(texts)))
    costs = [n * inputs["input_ids"].size for n, _, inputs in chunks]
    assert costs == sorted(costs, reverse=True) and max(costs) <= 2 * np.mean(costs)
    for n, rows, inputs in chunks:
        assert all(exits[r] == n for r in rows)
        assert inputs["attention_mask"][:, -1].any()  # no all-padding column left


def test_exports_are_reused_redone_when_stale_and_foreign_folders_left_alone(model, heads_dir, exports,
                                                                            tmp_path) -> None:
    from matryoshka2d.serve.exports import MARK
    from matryoshka2d.serve.runners import OpenVinoRunner

    graph = exports / "exit-3" / "openvino_model.xml"
    stamp = graph.stat().st_mtime_ns
    OpenVinoRunner.from_model(model, exports, threads=1, precision="f32")
    assert graph.stat().st_mtime_ns == stamp  # reused: it still reproduces exit 3
    other = MatryoshkaEncoder.from_pretrained(heads_dir).eval()
    with torch.no_grad():
        for head in other.exit_heads.values():
            head.weight.mul_(-1)
    copy = tmp_path / "exits"
    import shutil

    shutil.copytree(exports, copy)
    OpenVinoRunner.from_model(other, copy, threads=1, precision="f32")
    assert (copy / "exit-3" / "openvino_model.xml").stat().st_mtime_ns != stamp  # another model: exported again
    assert (copy / "exit-4" / "openvino_model.xml").read_bytes() == (exports / "exit-4" / "openvino_model.xml"
                                                                     ).read_bytes()  # no head at 4: reused
    assert (copy / MARK).is_file()  # the folder is the server's own
    # a stale exit holding a file the export did not write is never deleted, even when it does not match
    (copy / "exit-3" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt, a file m2d serve did not write"):
        OpenVinoRunner.from_model(model, copy, threads=1, precision="f32")
    assert (copy / "exit-3" / "notes.txt").read_text() == "mine"
    # nor is a folder the server did not write (no mark)
    theirs = tmp_path / "theirs"
    shutil.copytree(exports, theirs, ignore=shutil.ignore_patterns(MARK))
    with pytest.raises(ValueError, match="holds files m2d serve did not write"):
        OpenVinoRunner.from_model(other, theirs, threads=1, precision="f32")
    assert (theirs / "exit-3" / "openvino_model.xml").read_bytes() == graph.read_bytes()


def test_server_on_the_openvino_backend_with_the_openai_client(heads_dir, model, exports, tmp_path) -> None:
    """Every exit and width through the real openai client (f32, two streams), mixed layers at once, /info."""
    openai = pytest.importorskip("openai")
    with running_server(heads_dir, tmp_path / "server.log", "--backend", "openvino", "--export-dir", str(exports),
                        "--precision", "f32", "--threads", "2", "--served-model-name", NAME, timeout=180) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=30)
        for layer, dim in ((1, 8), (2, 32), (3, 5), (4, 16), (None, None)):
            extra = {"layer": layer} if layer else {}
            response = client.embeddings.create(model=NAME, input=TEXTS, extra_body=extra,
                                                **({"dimensions": dim} if dim else {}))
            got = np.array([d.embedding for d in response.data], dtype=np.float32)
            assert cosines(got, model.encode(TEXTS, layer=layer, dim=dim)).min() >= 0.9999, (layer, dim)

        async def mixed() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as http:
                return await asyncio.gather(*[http.post("/v1/embeddings", json={"input": t, "layer": 1 + i % 4})
                                              for i, t in enumerate(TEXTS * 2)])

        for i, (text, response) in enumerate(zip(TEXTS * 2, asyncio.run(mixed()), strict=True)):
            got = np.array([response.json()["data"][0]["embedding"]], dtype=np.float32)
            assert cosines(got, model.encode([text], layer=1 + i % 4)).min() >= 0.9999
        info = httpx.get(f"{s.url}/info").json()
        assert info["backend"] == "openvino" and info["exits"] == [1, 2, 3, 4]
        runner = info["runner"]
        assert runner["precision"] == "f32" and runner["streams"] == 2 and runner["export_dir"] == str(exports)
        assert httpx.post(f"{s.url}/v1/embeddings", json={"input": "a", "layer": 5}).status_code == 400
    assert "backend {'name': 'openvino'" in s.log_text()


def test_auto_backend_is_openvino_and_says_why(heads_dir, model, exports, tmp_path) -> None:
    """``--backend auto`` picks OpenVINO where installed; /info and the log say why and which precision."""
    needs_openvino()
    from matryoshka2d.export.runtime import auto_precision, read_export_meta

    with running_server(heads_dir, tmp_path / "server.log", "--backend", "auto", "--export-dir", str(exports),
                        timeout=180) as s:
        info = httpx.get(f"{s.url}/info").json()
        response = httpx.post(f"{s.url}/v1/embeddings", json={"input": TEXTS, "layer": 2}).json()
    assert info["backend"] == "openvino" and info["runner"]["why"].startswith("auto: openvino is installed")
    expected = {auto_precision(read_export_meta(exports / f"exit-{n}"))[0] for n in range(1, 5)}
    assert info["runner"]["precision"] == ("bf16" if expected == {"bf16"} else "f32")
    assert info["runner"]["precision_reason"].startswith("auto")
    floor = 0.999 if info["runner"]["precision"] == "bf16" else 0.9999
    got = np.array([d["embedding"] for d in response["data"]], dtype=np.float32)
    assert cosines(got, model.encode(TEXTS, layer=2)).min() >= floor
    assert "auto: openvino is installed" in s.log_text()


def test_auto_precision_reads_the_exports_recorded_facts(monkeypatch) -> None:
    """bf16 only on a native-bf16 CPU and only while every recorded bf16 fact holds (STS within 0.2)."""
    pytest.importorskip("openvino")
    from matryoshka2d.export import runtime

    def meta(**check: float) -> dict:
        return {"export": {"format": "openvino", "verification": check}}

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.auto_precision(meta(openvino_bf16_vs_f32_min_cosine=0.9999))[0] == "bf16"
    ok = meta(openvino_bf16_vs_f32_min_cosine=0.9999, stsb_spearman_openvino_bf16=82.05, stsb_spearman_source=82.2)
    assert runtime.auto_precision(ok) == ("bf16", "native bf16; bf16 min cosine to f32 0.9999; stsb Spearman bf16 "
                                                  "82.05 vs source 82.2")
    far = meta(stsb_spearman_openvino_bf16=81.9, stsb_spearman_source=82.2)
    assert runtime.auto_precision(far)[0] == "f32" and "more than 0.2 points apart" in runtime.auto_precision(far)[1]
    assert runtime.auto_precision(meta(openvino_bf16_vs_f32_min_cosine=0.99))[0] == "f32"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.auto_precision(ok) == ("f32", "this CPU has no native bf16")


def test_library_cli_and_server_pick_the_same_precision_and_streams(model, exports, tmp_path, monkeypatch) -> None:
    """``load_exported``, ``OpenVinoEncoder``, ``m2d encode EXPORT`` and the server's runner: auto precision, one
    stream for one batch, one stream per thread for more; an explicit value still wins."""
    from matryoshka2d.cli import main
    from matryoshka2d.export import runtime
    from matryoshka2d.serve.runners import OpenVinoRunner

    folder = exports / "exit-2"
    seen: list[tuple[str, int | None]] = []
    original = runtime.OpenVinoEncoder.encode

    def spy(self, texts, **kw):  # noqa: ANN001, ANN202
        out = original(self, texts, **kw)
        seen.append((self.precision, self.last_streams))
        return out

    monkeypatch.setattr(runtime.OpenVinoEncoder, "encode", spy)
    many = [f"{t} {i}" for i in range(3) for t in TEXTS]
    runtime.load_exported(folder, threads=2).encode(many, batch_size=4)
    runtime.OpenVinoEncoder(folder, threads=2).encode(many, batch_size=4)
    (tmp_path / "in.txt").write_text("\n".join(many) + "\n", encoding="utf-8")
    assert main(["encode", str(folder), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e.npy"),
                 "--threads", "2", "--batch-size", "4"]) == 0
    runtime.load_exported(folder, threads=2).encode(many[:3], batch_size=4)  # one batch: one stream
    auto = runtime.auto_precision(runtime.read_export_meta(folder))[0]
    assert seen == [(auto, 2)] * 3 + [(auto, 1)]
    server = OpenVinoRunner.from_model(model, exports, threads=2)
    every = {runtime.auto_precision(runtime.read_export_meta(exports / f"exit-{n}"))[0] for n in range(1, 5)}
    assert {(e.precision, e.streams) for e in server.encoders.values()} == {
        ("bf16" if every == {"bf16"} else "f32", 2)}  # bf16 only if every exit allows it
    assert server.streams == runtime.auto_streams(2, batches=2) == 2
    fixed = runtime.load_exported(folder, threads=2, precision="f32", streams=1)
    assert (fixed.precision, fixed.streams) == ("f32", 1)
    assert json.loads((folder / "matryoshka2d.json").read_text())["export"]["format"] == "openvino"


def test_backend_flags_refuse_what_they_cannot_run(heads_dir, capsys, monkeypatch) -> None:
    from matryoshka2d.cli import main
    from matryoshka2d.serve.launch import default_backend

    assert default_backend(device="cuda", dtype="fp16")[0] == "torch"
    assert default_backend(dtype="bf16") == ("torch", "auto: --device cpu --dtype bf16 run on torch")
    cases = [
        (["--backend", "openvino", "--dtype", "bf16"], "dtype 'bf16' is torch only: the openvino backend"),
        (["--backend", "openvino", "--device", "cuda"], "the openvino backend runs on the CPU"),
        (["--backend", "torch", "--precision", "bf16"], "--precision bf16 is OpenVINO's"),
        (["--backend", "torch", "--dtype", "fp16"], "fp16 is for GPUs (--device cuda)"),
        (["--replicas", "0"], "--replicas 0 is out of range 1..1024"),
        (["--replicas", "2", "--autoscale", "3,4"], "need 1 <= MIN <= --replicas <= MAX"),
        (["--replicas", "2", "--autoscale", "x"], "--autoscale 'x' is not MIN,MAX"),
        (["--ray-address", "auto"], "pass --replicas N as well"),
    ]
    for flags, message in cases:
        assert main(["serve", str(heads_dir), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: --device cuda --dtype "
                    "fp16/bf16 runs where torch sees one (GPU machines)")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_server_on_a_gpu_in_half_precision(heads_dir, model, tmp_path, dtype) -> None:
    with running_server(heads_dir, tmp_path / "server.log", "--device", "cuda", "--dtype", dtype) as s:
        response = httpx.post(f"{s.url}/v1/embeddings", json={"input": TEXTS, "layer": 3}, timeout=60).json()
        info = httpx.get(f"{s.url}/info").json()
    assert info["dtype"] == dtype and info["runner"]["device"].startswith("cuda")
    got = np.array([d["embedding"] for d in response["data"]], dtype=np.float32)
    assert cosines(got, model.encode(TEXTS, layer=3)).min() >= 0.99


def test_replicas_without_ray_serve_name_the_extra(heads_dir, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == "ray"
                        else real(name, *a))
    from matryoshka2d.cli import main

    assert main(["serve", str(heads_dir), "--backend", "torch", "--replicas", "2"]) == 2
    assert "pip install 'matryoshka2d[serve,ray-serve]'" in capsys.readouterr().err


def test_an_encoder_that_ran_streams_is_freed(exports) -> None:
    """The throughput queue's callback must not keep its encoder (and compiled models) alive: the server's
    start-up exports score several encoders each, and such a cycle held about 600 MiB per MiniLM exit."""
    import gc
    import weakref

    from matryoshka2d.export.runtime import OpenVinoEncoder

    encoder = OpenVinoEncoder(exports / "exit-2", threads=2, precision="f32")
    encoder.encode([f"{t} {i}" for i in range(3) for t in TEXTS], batch_size=4)
    assert encoder.last_streams == 2
    ref = weakref.ref(encoder)
    del encoder
    gc.collect()
    assert ref() is None
