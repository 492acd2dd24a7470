"""The server's request path as plain functions, without a server: parsing and checking a request
(serve/request.py), the error JSON (serve/errors.py), the catch-all middleware (serve/http.py), the shutdown
abort of the batcher, the served id, and the folders the onnx backend may replace."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from matryoshka2d.serve.batcher import Batcher, StoppedError  # noqa: E402
from matryoshka2d.serve.config import ServeConfig, default_model_name  # noqa: E402
from matryoshka2d.serve.errors import APIError, error_body, raw_response, validation_error  # noqa: E402
from matryoshka2d.serve.exports import MARK, check_replaceable, claim_folder  # noqa: E402
from matryoshka2d.serve.http import Shield  # noqa: E402
from matryoshka2d.serve.request import Tokens, parse, token_rows  # noqa: E402
from matryoshka2d.serve.schemas import EmbeddingRequest  # noqa: E402


@pytest.fixture
def tokens(tiny_model) -> Tokens:
    return Tokens.of(tiny_model, 8)


@pytest.mark.parametrize(("text", "needle"), [
    ("ab\ud800cd", "lone surrogate"), ("a\x00b", "NUL character"), ("   \n\t", "only whitespace"), ("", "empty"),
])
def test_texts_m2d_encode_refuses_are_400_naming_the_input_index(tokens, text, needle) -> None:
    with pytest.raises(APIError) as caught:
        token_rows(["a dog", "a cat", text], True, tokens)
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "input", "invalid_input")
    assert error.message.startswith("input[2] ") and needle in error.message
    json.loads(error.body())  # the body is valid JSON even when the message quotes a surrogate


def test_parse_checks_options_against_the_model(tiny_model, tokens) -> None:
    config = ServeConfig(model_name="tiny", max_client_batch=8)
    parsed = parse(EmbeddingRequest(input="a dog", layer=2, dimensions=8), tiny_model, config)
    assert (parsed.items, parsed.layer, parsed.dim, parsed.truncate) == (["a dog"], 2, 8, True)
    assert parse(EmbeddingRequest(input=[5, 6]), tiny_model, config).items == [[5, 6]]
    for body, status, param, code in (
        ({"input": "a", "layer": 9}, 400, "layer", "invalid_layer"),
        ({"input": "a", "dimensions": 0}, 400, "dimensions", "invalid_dimensions"),
        ({"input": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"input": []}, 400, "input", "empty_input"),
        ({"input": ["a"] * 9}, 400, "input", "too_many_inputs"),
    ):
        with pytest.raises(APIError) as caught:
            parse(EmbeddingRequest(**body), tiny_model, config)
        assert (caught.value.status, caught.value.param, caught.value.code) == (status, param, code), body
    rows = token_rows([[5, 6]], True, tokens)
    assert rows == [[*tokens.prefix, 5, 6, *tokens.suffix]]
    with pytest.raises(APIError, match=r"input\[0\] holds token id 100000"):
        token_rows([[100000]], True, tokens)


def test_error_json_always_has_a_code_and_names_the_field() -> None:
    body = json.loads(error_body(400, "bad \ud800 value", param="in\udcffput"))["error"]
    assert body["code"] == "invalid_request" and "\\ud800" in body["message"] and body["param"] == "in\\udcffput"
    not_json = validation_error([{"type": "json_invalid", "loc": ("body", 17), "msg": "JSON decode error"}])
    assert (not_json.param, not_json.code) == (None, "invalid_value")  # not a character offset
    extra = validation_error([{"type": "extra_forbidden", "loc": ("body", "layers"), "msg": "Extra inputs"}])
    assert (extra.param, extra.code) == ("layers", "unknown_parameter")
    nested = validation_error([{"type": "string_type", "loc": ("body", "input", 3), "msg": "bad"}] * 2)
    assert nested.param == "input" and "input.3: bad (and 1 more problems)" in nested.message
    raw = raw_response(408, "too slow")
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout") and b"connection: close" in head
    assert json.loads(payload)["error"]["code"] == "request_timeout"


def run_shield(app) -> tuple[list[dict], list[int]]:
    sent, counted = [], []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(Shield(app, counted.append)({"type": "http", "path": "/v1/embeddings"}, receive, send))
    return sent, counted


def test_shield_answers_a_crash_with_json_500_and_a_cancelled_request_with_json_503(caplog) -> None:
    async def crash(scope, receive, send) -> None:
        raise RuntimeError("boom")

    async def cancelled(scope, receive, send) -> None:
        raise asyncio.CancelledError

    sent, counted = run_shield(crash)
    assert sent[0]["status"] == 500 and counted == [500]
    assert (b"connection", b"close") not in sent[0]["headers"]  # a bug in one request: the connection stays usable
    assert json.loads(sent[1]["body"])["error"]["code"] == "internal_error"
    sent, counted = run_shield(cancelled)
    assert sent[0]["status"] == 503 and counted == [503] and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down"


def test_batcher_abort_answers_every_unfinished_request_and_computes_none(tiny_model) -> None:
    ran: list[int] = []
    batcher = Batcher(tiny_model, max_batch_tokens=4096, max_batch_requests=64, batch_wait_ms=1, max_queue=100,
                      on_batch=lambda stats: ran.append(stats.rows))
    ids = tiny_model.tokenizer(["a dog", "a cat"])["input_ids"]

    async def run() -> list:
        futures = [batcher.submit([ids[i % 2]], route=2) for i in range(20)]  # not started: nothing runs them
        assert batcher.abort(StoppedError("bye")) == 20 and batcher.queued_rows == 0
        with pytest.raises(StoppedError):
            batcher.submit([ids[0]], route=2)
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(run())
    batcher.start()
    batcher.stop(5)
    assert all(isinstance(r, StoppedError) for r in results) and ran == []


def test_default_served_id_is_the_models_own_name(tiny_model, tmp_path: Path) -> None:
    final = tiny_model.save(tmp_path / "runs" / "demo" / "final")
    from matryoshka2d import MatryoshkaEncoder

    trained = MatryoshkaEncoder.from_pretrained(final)
    source = Path(str(trained.metadata["source"])).name
    assert source != "final" and default_model_name(trained.metadata, str(final)) == source
    assert default_model_name({"source": "minilm"}, "runs/demo/final") == "minilm"
    assert default_model_name({}, "runs/demo/final/") == "final"  # no metadata: the folder's name


def test_onnx_dir_never_replaces_what_m2d_serve_did_not_write(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "exit-1").mkdir(parents=True)
    (theirs / "exit-1" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files m2d serve did not write"):
        claim_folder(theirs)
    assert (theirs / "exit-1" / "notes.txt").read_text() == "mine" and not (theirs / MARK).exists()
    ours = claim_folder(tmp_path / "new")
    assert (ours / MARK).is_file() and claim_folder(ours) == ours  # reused once marked
    export = ours / "exit-1"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"x")
    (export / "manifest.json").write_text(json.dumps({"files": {"model.onnx": {}}}))
    check_replaceable(export)  # every file is the export's own
    (export / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt, a file m2d serve did not write"):
        check_replaceable(export)
    with pytest.raises(ValueError, match="is a file"):
        claim_folder(export / "notes.txt")


def test_base64_rows_are_float32_whatever_the_precision() -> None:
    from matryoshka2d.serve.output import encode_rows

    codes = np.array([[-128, 0, 127]], dtype=np.int8)
    import base64

    decoded = np.frombuffer(base64.b64decode(encode_rows(codes, "base64")[0]), dtype="<f4")
    np.testing.assert_array_equal(decoded, [-128.0, 0.0, 127.0])


def test_after_the_shutdown_abort_new_requests_get_503_not_a_crash(tiny_model) -> None:
    from matryoshka2d.serve.app import create_app

    state = create_app(tiny_model, ServeConfig(model_name="tiny")).state.server
    parsed = parse(EmbeddingRequest(input="a dog " * 300), tiny_model, state.config)  # over INLINE: a thread
    assert asyncio.run(state.tokenize(parsed)) == token_rows(["a dog " * 300], True, state.tokens)
    state.abort()  # the pool is shut down
    with pytest.raises(APIError) as caught:
        asyncio.run(state.tokenize(parsed))
    assert (caught.value.status, caught.value.code) == (503, "shutting_down")
