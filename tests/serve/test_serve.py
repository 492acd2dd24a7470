"""``m2d serve``: a real server subprocess on 127.0.0.1, queried with the real ``openai`` client and httpx."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import SENTENCES

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from matryoshka2d import MatryoshkaEncoder  # noqa: E402
from matryoshka2d.serve.batcher import Batcher  # noqa: E402
from tests.helpers.serve import running_server  # noqa: E402

TEXTS = [t for t in SENTENCES if t]
NAME = "tiny-heads"
MAX_CLIENT_BATCH, MAX_QUEUE, MAX_BODY = 64, 48, 200_000


@pytest.fixture(scope="module")
def model(heads_dir: Path) -> MatryoshkaEncoder:
    return MatryoshkaEncoder.from_pretrained(heads_dir).eval()


@pytest.fixture(scope="module")
def server(heads_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(heads_dir, log, "--served-model-name", NAME, "--max-client-batch", str(MAX_CLIENT_BATCH),
                        "--max-queue", str(MAX_QUEUE),
                        "--max-body-bytes", str(MAX_BODY), "--batch-wait-ms", "5") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def post(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30, **kw)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(("layer", "dim"), [(1, 8), (2, 32), (3, 5), (4, 16), (None, None)])
def test_embeddings_equal_encode_at_the_exit(client, model, layer, dim) -> None:
    extra = {} if layer is None else {"extra_body": {"layer": layer}}
    kwargs = {} if dim is None else {"dimensions": dim}
    response = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float", **kwargs, **extra)
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    expected = model.encode(TEXTS, layer=layer, dim=dim)
    assert got.shape == expected.shape == (len(TEXTS), dim or model.hidden_size)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    n_tokens = sum(len(ids) for ids in model.tokenizer(TEXTS)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == n_tokens
    assert response.model == NAME


def test_base64_decodes_to_the_same_floats(client, server) -> None:
    floats = client.embeddings.create(model=NAME, input=TEXTS, dimensions=12, encoding_format="float",
                                      extra_body={"layer": 2})
    # without encoding_format the openai client asks for base64 and decodes it itself
    decoded = client.embeddings.create(model=NAME, input=TEXTS, dimensions=12, extra_body={"layer": 2})
    raw = post(server, {"input": TEXTS, "dimensions": 12, "layer": 2, "encoding_format": "base64"}).json()
    ours = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    want = np.array([d.embedding for d in floats.data], dtype=np.float32)
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(np.array([d.embedding for d in decoded.data], dtype=np.float32), want)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("dim", [32, 13])
def test_quantised_outputs_equal_sentence_transformers(server, precision, dim) -> None:
    st_quant = pytest.importorskip("sentence_transformers.quantization")
    body = {"input": TEXTS, "dimensions": dim, "layer": 3}
    floats = np.array([d["embedding"] for d in post(server, body).json()["data"]], dtype=np.float32)
    ranges = np.vstack([np.full(dim, -1.0), np.full(dim, 1.0)])
    expected = st_quant.quantize_embeddings(floats, precision, ranges=ranges)
    got = np.array([d["embedding"] for d in post(server, {**body, "precision": precision}).json()["data"]])
    np.testing.assert_array_equal(got, expected.astype(np.int64))
    assert got.shape[1] == (dim if precision.endswith("int8") else (dim + 7) // 8)
    b64 = post(server, {**body, "precision": precision, "encoding_format": "base64"}).json()["data"]
    # base64 carries float32 values whatever the precision (what OpenAI's clients decode): the codes as floats
    np.testing.assert_array_equal(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                                            for d in b64]), expected.astype(np.float32))


@pytest.mark.parametrize("precision", ["int8", "ubinary"])
def test_openai_client_decodes_quantised_output_with_its_default_base64(client, server, precision) -> None:
    """The openai client asks for base64 by default and decodes it as float32: it must get the codes."""
    body = {"input": TEXTS, "layer": 3, "precision": precision}
    codes = np.array([d["embedding"] for d in post(server, body).json()["data"]])
    response = client.embeddings.create(model=NAME, input=TEXTS, extra_body={"layer": 3, "precision": precision})
    got = np.array([d.embedding for d in response.data])
    assert got.shape == codes.shape == (len(TEXTS), 32 if precision == "int8" else 4)
    np.testing.assert_array_equal(got, codes)
    assert np.abs(got).max() <= 255 and np.all(got == np.round(got))  # codes, not reinterpreted bytes


def test_token_id_inputs_embed_like_their_text(client, model) -> None:
    ids = model.tokenizer(TEXTS[:3], add_special_tokens=False)["input_ids"]
    from_ids = client.embeddings.create(model=NAME, input=ids, encoding_format="float", extra_body={"layer": 2})
    single = client.embeddings.create(model=NAME, input=ids[0], encoding_format="float", extra_body={"layer": 2})
    expected = model.encode(TEXTS[:3], layer=2)
    got = np.array([d.embedding for d in from_ids.data], dtype=np.float32)
    assert cosines(got, expected).min() >= 0.9999
    assert cosines(np.array([single.data[0].embedding]), expected[:1]).min() >= 0.9999


def test_concurrent_mixed_layer_requests_share_batches_and_stay_exact(server, model) -> None:
    jobs = [(1 + i % 4, TEXTS[i % len(TEXTS) :] + TEXTS[: i % len(TEXTS)]) for i in range(8)]  # 8 x 6 fit the queue

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            bad = http.post("/v1/embeddings", json={"input": "a dog", "layer": 0})  # a bad request among them
            sent = [http.post("/v1/embeddings", json={"input": texts, "layer": layer}) for layer, texts in jobs]
            return await asyncio.gather(bad, *sent)

    before = _metric(server, "m2d_batch_rows_count")
    bad, *responses = asyncio.run(send_all())
    assert bad.status_code == 400
    for (layer, texts), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert cosines(got, model.encode(texts, layer=layer)).min() >= 0.9999
    batches = _metric(server, "m2d_batch_rows_count") - before
    assert 1 <= batches < len(jobs)  # requests were batched together


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


def test_out_of_range_layer_and_dimensions_name_value_and_range(server, client) -> None:
    assert _error(post(server, {"input": "a dog", "layer": 5}), 400, "layer 5", "1..4")["param"] == "layer"
    _error(post(server, {"input": "a dog", "layer": 0}), 400, "layer 0", "1..4")
    assert _error(post(server, {"input": "a dog", "dimensions": 33}), 400, "dimensions 33", "1..32")["param"] \
        == "dimensions"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=NAME, input="a dog", dimensions=0)
    assert caught.value.status_code == 400 and "1..32" in str(caught.value)


def test_input_limits(server) -> None:
    _error(post(server, {"input": []}), 400, "empty")
    _error(post(server, {"input": ["a dog", ""]}), 400, "input[1]", "empty")
    _error(post(server, {"input": [[]]}), 400, "empty token list")
    _error(post(server, {"input": [1, 10**9]}), 400, "token id 1000000000", "0..")
    _error(post(server, {"input": ["a"] * (MAX_CLIENT_BATCH + 1)}), 400, f"{MAX_CLIENT_BATCH + 1} items",
           str(MAX_CLIENT_BATCH))
    long_text = " ".join(["dog"] * 300)
    _error(post(server, {"input": ["a cat", long_text], "truncate": False}), 400, "input[1]", "128 tokens")
    _error(post(server, {"input": [[5] * 200], "truncate": False}), 400, "202 tokens", "128")
    ok = post(server, {"input": [long_text]})  # truncation on (the default): cut to the limit
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 128
    _error(post(server, {"input": "a dog", "model": "gpt-4"}), 404, "'gpt-4'")
    _error(post(server, {"input": "a dog", "layers": 2}), 400, "layers")
    _error(post(server, {"input": "a dog", "encoding_format": "hex"}), 400, "encoding_format")
    _error(httpx.post(f"{server.url}/v1/embeddings", content=b"{not json", timeout=10,
                      headers={"content-type": "application/json"}), 400)
    _error(post(server, {"input": ["x" * 4000] * 60}), 413, "bytes", str(MAX_BODY))
    # the queue cannot hold more than MAX_QUEUE inputs: 429 at once, not a hang
    began = time.perf_counter()
    _error(post(server, {"input": ["a dog"] * (MAX_QUEUE + 1)}), 429, "limit of 48")
    assert time.perf_counter() - began < 2
    assert post(server, {"input": "still fine"}).status_code == 200


def test_models_health_ready_info_metrics(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    info = httpx.get(f"{server.url}/info").json()
    assert (info["layers"], info["hidden_size"], info["exits"]) == (4, 32, [1, 2, 3, 4])
    assert info["heads"] == {"kind": "linear", "layers": [1, 2, 3]}
    assert info["limits"]["max_client_batch"] == MAX_CLIENT_BATCH and info["dtype"] == "fp32"
    assert info["document_space"] == {"document_exit": 4, "query_exits": [4], "query_path": None}
    post(server, {"input": "a dog", "layer": 2})
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("m2d_requests_total", "m2d_queue_rows", "m2d_batch_rows", "m2d_batch_tokens", "m2d_queue_seconds",
                 "m2d_tokenize_seconds", "m2d_inference_seconds", "m2d_heap_trim_seconds"):
        assert name in metrics
    assert re.search(r'm2d_requests_total\{layer="2",status="200"\} [1-9]', metrics)
    assert 'layer="5"' not in metrics and 'layer="invalid",status="400"' in metrics  # labels stay bounded


def test_a_failing_request_does_not_fail_its_batch(model) -> None:
    """The batcher re-runs a failed batch request by request; only the bad one gets the error."""
    vocab = len(model.tokenizer)
    batcher = Batcher(model, max_batch_tokens=4096, max_batch_requests=64, batch_wait_ms=200, max_queue=100)
    good = model.tokenizer(TEXTS)["input_ids"]

    async def run() -> tuple[list, BaseException | None]:
        futures = [batcher.submit([ids], route=1 + i % 4) for i, ids in enumerate(good)]
        broken = batcher.submit([[101, vocab + 50, 102]], route=2)  # an id past the embedding table
        results = await asyncio.gather(*futures)
        try:
            await broken
        except Exception as e:  # noqa: BLE001
            return results, e
        return results, None

    batcher.start()
    try:
        results, error = asyncio.run(run())
    finally:
        batcher.stop()
    assert isinstance(error, IndexError)
    for i, (text, vectors) in enumerate(zip(TEXTS, results, strict=True)):
        expected = model.encode([text], layer=1 + i % 4, normalize=False)
        np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_api_key_and_graceful_sigterm(heads_dir: Path, tmp_path: Path) -> None:
    with running_server(heads_dir, tmp_path / "server.log", "--api-key", "s3cret", "--max-batch-tokens", "256",
                        "--served-model-name", NAME) as s:
        _error(post(s, {"input": "a dog"}), 401, "API key")
        _error(post(s, {"input": "a dog"}, headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.get(f"{s.url}/v1/models"), 401)
        _error(httpx.get(f"{s.url}/info"), 401)
        _error(post(s, {"input": []}), 401)  # the key is checked before the body
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).embeddings.create(
                model=NAME, input="a dog")
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert len(good.embeddings.create(model=NAME, input=["a dog", "a cat"]).data) == 2
        assert httpx.get(f"{s.url}/health").status_code == 200  # liveness needs no key
        # a big request (many small batches) is in flight when SIGTERM comes: it must still be answered
        texts = [f"{t} {i}" for i in range(300) for t in TEXTS]
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(
            post(s, {"input": texts}, headers={"Authorization": "Bearer s3cret"})))
        sender.start()
        time.sleep(0.3)
        assert not answers, "the request finished before SIGTERM; make it bigger"
        s.process.send_signal(signal.SIGTERM)
        sender.join(60)
        assert s.process.wait(30) == 0, s.log_text()
        assert answers and answers[0].status_code == 200 and len(answers[0].json()["data"]) == len(texts)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health", timeout=2)


def test_batcher_waits_for_company_only_when_there_is_some(model) -> None:
    """A lone client is not made to wait; once requests have met, the batcher waits for more and gathers them."""
    batches: list[int] = []
    batcher = Batcher(model, max_batch_tokens=4096, max_batch_requests=64, batch_wait_ms=150, max_queue=100,
                      on_batch=lambda stats: batches.append(stats.rows))
    ids = model.tokenizer(TEXTS)["input_ids"]

    async def one() -> float:
        began = time.perf_counter()
        await batcher.submit([ids[0]], route=2)
        return time.perf_counter() - began

    async def crowd() -> None:  # all in one tick: every submit after the first finds company
        await asyncio.gather(*[batcher.submit([row], route=1 + i % 4) for i, row in enumerate(ids)])

    batcher.start()
    try:
        assert asyncio.run(one()) < 0.1  # no company seen yet: no 150 ms wait
        asyncio.run(crowd())
        assert asyncio.run(one()) >= 0.12  # company was seen a moment ago: it waits the quiet gap for more
    finally:
        batcher.stop()
    assert batches[0] == 1 and batches[-1] == 1 and sum(batches[1:-1]) == len(ids)
    assert len(batches) <= 4 and max(batches[1:-1]) >= len(ids) - 1  # the crowd shared (at most) two batches


def test_batcher_hands_the_free_heap_back_at_most_once_per_interval(model, monkeypatch) -> None:
    """Trim after a batch when ``trim_interval`` has passed, never more often, and never with ``None``."""
    import matryoshka2d.serve.batcher as batcher_module

    calls: list[float] = []
    monkeypatch.setattr(batcher_module, "release_free_memory", lambda: calls.append(time.perf_counter()) or True)
    ids = model.tokenizer(TEXTS)["input_ids"]

    def run(interval: float | None, rounds: int) -> Batcher:
        batcher = Batcher(model, max_batch_tokens=4096, max_batch_requests=64, batch_wait_ms=1, max_queue=100,
                          trim_interval=interval)

        async def one_by_one() -> None:
            for i in range(rounds):
                await batcher.submit([ids[i % len(ids)]], route=2)
                if interval:
                    await asyncio.sleep(interval / 3)

        batcher.start()
        try:
            asyncio.run(one_by_one())
        finally:
            batcher.stop()
        return batcher

    never = run(None, 6)
    assert calls == [] and never.trims == 0 and never.describe()["trim_interval_s"] is None
    every = run(0.0, 6)
    assert len(calls) == every.trims == 6  # interval 0: after every batch
    calls.clear()
    began = time.perf_counter()
    spaced = run(0.3, 9)  # 9 batches at least 100 ms apart: a trim at most every 300 ms
    wall = time.perf_counter() - began
    assert 1 <= spaced.trims == len(calls) <= wall / 0.3 + 1
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(calls))


def test_split_by_length_cuts_padding_and_keeps_every_row_once() -> None:
    from matryoshka2d.serve.batcher import split_by_length

    lengths = [30, 10, 31, 9, 30, 10, 29, 11, 30, 10, 28, 12]
    groups = split_by_length(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[28, 29, 30, 30, 30, 31], [9, 10, 10, 10, 11, 12]]
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded <= 0.8 * len(lengths) * max(lengths)
    assert len(split_by_length([20] * 16)) == 1  # nothing to gain
    assert len(split_by_length([40, 5, 5])) == 1  # too few rows to split


# ----------------------------------------------------------------------------------- the onnx backend
def test_onnx_runner_matches_the_model_at_every_exit_and_reuses_its_exports(model, heads_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Every exit exported once, mixed-layer batches answered row by row, a still-matching export reused and a
    stale one exported again."""
    pytest.importorskip("onnxruntime")
    from matryoshka2d.serve.runners import OnnxRunner

    runner = OnnxRunner.from_model(model, tmp_path / "onnx", threads=1)
    assert sorted(runner.encoders) == [1, 2, 3, 4]
    ids = model.tokenizer(TEXTS)["input_ids"]
    batcher = Batcher(model, max_batch_tokens=4096, max_batch_requests=64, batch_wait_ms=50, max_queue=100,
                      runner=runner)

    async def crowd() -> list[np.ndarray]:
        return await asyncio.gather(*[batcher.submit([row], route=1 + i % 4) for i, row in enumerate(ids)])

    batcher.start()
    try:
        results = asyncio.run(crowd())
    finally:
        batcher.stop()
    for i, (text, vectors) in enumerate(zip(TEXTS, results, strict=True)):
        expected = model.encode([text], layer=1 + i % 4)
        assert cosines(vectors, expected).min() >= 0.9999, (i, text)
    graph = tmp_path / "onnx" / "exit-3" / "model.onnx"
    stamp = graph.stat().st_mtime_ns
    OnnxRunner.from_model(model, tmp_path / "onnx", threads=1)
    assert graph.stat().st_mtime_ns == stamp  # reused: it still reproduces exit 3
    other = MatryoshkaEncoder.from_pretrained(heads_dir).eval()
    with torch.no_grad():
        for head in other.exit_heads.values():
            head.weight.mul_(-1)
    OnnxRunner.from_model(other, tmp_path / "onnx", threads=1)
    assert graph.stat().st_mtime_ns != stamp  # another model: exported again


def test_server_on_the_onnx_backend(heads_dir: Path, model, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    with running_server(heads_dir, tmp_path / "server.log", "--served-model-name", NAME, "--backend", "onnx",
                        "--onnx-dir", str(tmp_path / "graphs"), timeout=180) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=30)
        for layer, dim in ((1, 8), (3, 32), (4, 5)):
            response = client.embeddings.create(model=NAME, input=TEXTS, dimensions=dim, extra_body={"layer": layer})
            got = np.array([d.embedding for d in response.data], dtype=np.float32)
            assert cosines(got, model.encode(TEXTS, layer=layer, dim=dim)).min() >= 0.9999
        info = httpx.get(f"{s.url}/info").json()
        assert info["backend"] == "onnx" and info["exits"] == [1, 2, 3, 4]
        _error(post(s, {"input": "a dog", "layer": 5}), 400, "layer 5 is out of range")
        bad = httpx.post(f"{s.url}/v1/embeddings", content=json.dumps({"input": ["a", "ab\ud800cd"]}), timeout=30,
                         headers={"content-type": "application/json"})  # a lone surrogate, as a JSON escape
        assert _error(bad, 400, "input[1]", "lone surrogate")["code"] == "invalid_input"
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == [".m2d-serve", "exit-1", "exit-2", "exit-3",
                                                                       "exit-4"]


def test_onnx_backend_refuses_what_it_cannot_run(heads_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from matryoshka2d.cli import main

    assert main(["serve", str(heads_dir), "--backend", "onnx", "--dtype", "bf16"]) == 2
    assert "dtype 'bf16' is torch only" in capsys.readouterr().err
    assert main(["serve", str(heads_dir), "--backend", "onnx", "--device", "cuda"]) == 2
    assert "the onnx backend runs on the CPU" in capsys.readouterr().err
    assert main(["serve", str(heads_dir), "--trim-interval-s", "-1"]) == 2
    assert "trim_interval_s -1.0 is out of range 0..3600" in capsys.readouterr().err
