"""``m2d serve``'s request path under hostile but realistic use (issue 35, class 1): every bad case is a 4xx
or 503 JSON with a code and no traceback, the connection stays usable or is closed explicitly, slow or
half-open clients time out, huge inputs do not stall the event loop, SIGTERM ends within its timeout, and
bad flags are refused before the model loads."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

pytest.importorskip("fastapi")
from matryoshka2d import MatryoshkaEncoder  # noqa: E402
from tests.helpers.serve import free_port, running_server  # noqa: E402

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folder(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").save(tmp_path_factory.mktemp("hard") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("hard-log") / "server.log"
    with running_server(folder, log, "--api-key", KEY, "--header-timeout", "1", "--body-timeout", "1",
                        "--max-body-bytes", "5000000", "--batch-wait-ms", "0") as s:
        yield s
    assert "Traceback" not in s.log_text()


def address(server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port  # type: ignore[return-value]


def raw(server, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with socket.create_connection(address(server), timeout=wait) as sock:
        if data:
            sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def json_error(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:300]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and error["message"]
    return error


@pytest.mark.parametrize(("text", "needle"), [
    ("ab\ud800cd", "lone surrogate"), ("a\x00b", "NUL character"), ("   ", "only whitespace"), ("", "empty"),
])
def test_bad_texts_are_400_naming_the_index_and_the_connection_stays_usable(server, text, needle) -> None:
    host, port = address(server)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"content-type": "application/json", **AUTH}
    conn.request("POST", "/v1/embeddings", json.dumps({"input": ["a dog", text]}), headers)  # \ud800 as JSON escape
    first = conn.getresponse()
    error = json.loads(first.read())["error"]
    sock = conn.sock
    assert first.status == 400 and first.getheader("connection") != "close"
    assert (error["param"], error["code"]) == ("input", "invalid_input")
    assert error["message"].startswith("input[1] ") and needle in error["message"]
    conn.request("POST", "/v1/embeddings", json.dumps({"input": ["a dog"]}), headers)
    second = conn.getresponse()
    assert second.status == 200 and len(json.loads(second.read())["data"]) == 1
    assert conn.sock is sock  # the same keep-alive connection served the next request
    conn.close()


def test_every_error_is_json_with_a_code_and_counted_by_status(server) -> None:
    url = f"{server.url}/v1/embeddings"
    cases = [
        (httpx.get(url, headers=AUTH), 405, None),
        (httpx.get(f"{server.url}/nowhere", headers=AUTH), 404, None),
        (httpx.post(url, json={"input": "a"}), 401, None),
        (httpx.post(url, content=b'{"input": "a", ', headers={**AUTH, "content-type": "application/json"}), 400,
         None),
        (httpx.post(url, json={"input": "a", "layers": 2}, headers=AUTH), 400, "layers"),
        (httpx.post(url, json={"input": 5}, headers=AUTH), 400, "input"),
        (httpx.post(url, json={"input": "a", "layer": "2"}, headers=AUTH), 400, "layer"),
        (httpx.post(url, content=json.dumps({"input": "a", "model": "m\ud800"}),  # a JSON escape: valid JSON
                    headers={**AUTH, "content-type": "application/json"}), 404, "model"),
        (httpx.post(url, json={"input": "x" * 5_100_000}, headers=AUTH, timeout=30), 413, None),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["param"] == param, error
    metrics = httpx.get(f"{server.url}/metrics").text
    for status in (400, 401, 404, 405, 413):
        found = re.search(rf'^m2d_http_responses_total\{{status="{status}"\}} (\S+)$', metrics, re.M)
        assert found and float(found.group(1)) >= 1, status


def test_a_huge_input_is_tokenised_off_the_event_loop(server) -> None:
    text = "word " * 820_000  # 4.1 MB, under the body limit: seconds of tokenisation
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{server.url}/v1/embeddings", json={"input": text}, headers=AUTH, timeout=120)))
    started = time.perf_counter()
    sender.start()
    latencies = []
    while sender.is_alive():
        began = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        latencies.append(time.perf_counter() - began)
        time.sleep(0.05)
    sender.join()
    in_flight = time.perf_counter() - started
    assert answers[0].status_code == 200 and answers[0].json()["usage"]["prompt_tokens"] == 128
    # a blocked event loop would hold one health check for the whole tokenisation; a free one answers many
    # while the big request is in flight (relative to that time, so a loaded machine does not fail it)
    assert len(latencies) >= 3 and max(latencies) < in_flight / 3, (in_flight, latencies)


def test_slow_and_half_open_clients_time_out_with_json(server) -> None:
    began = time.perf_counter()
    assert raw(server, b"") == b""  # silent: closed after the header timeout
    assert time.perf_counter() - began < 5
    error = json_error(raw(server, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"), 408)  # headers never end
    assert error["code"] == "request_timeout" and "headers" in error["message"]
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    error = json_error(raw(server, head + b'{"input": '), 408)  # the body never ends
    assert error["code"] == "request_timeout" and "body" in error["message"]
    error = json_error(raw(server, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"), 431)
    assert error["code"] == "headers_too_large"
    assert json_error(raw(server, b"HELLO WORLD\r\n\r\n"), 400)["code"] == "invalid_request"
    assert httpx.post(f"{server.url}/v1/embeddings", json={"input": "a dog"}, headers=AUTH).status_code == 200


def test_sigterm_answers_queued_requests_with_json_503_and_exits_within_the_timeout(folder: Path,
                                                                                   tmp_path: Path) -> None:
    texts = [f"a man is playing a guitar on the street number {i} " * 12 for i in range(256)]

    async def flood(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/embeddings", json={"input": texts}) for _ in range(60)],
                                        return_exceptions=True)

    with running_server(folder, tmp_path / "server.log", "--graceful-timeout", "1", "--max-batch-tokens", "256",
                        "--max-queue", "100000", "--batch-wait-ms", "0") as s:
        results: list = []
        sender = threading.Thread(target=lambda: results.extend(asyncio.run(flood(s.url))))
        sender.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until every request is queued
            text = httpx.get(f"{s.url}/metrics", timeout=5).text
            queued = float(re.search(r"^m2d_queue_rows (\S+)$", text, re.M).group(1))
            if queued >= 40 * len(texts):
                break
            time.sleep(0.1)
        signalled = time.perf_counter()
        s.process.send_signal(signal.SIGTERM)
        code = s.process.wait(30)
        took = time.perf_counter() - signalled
        sender.join(30)
    assert code == 0 and took < 1 + 1.0, (code, took)  # --graceful-timeout 1, plus slack for a loaded machine
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 30, statuses
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down"
    log = s.log_text()
    assert "Traceback" not in log and "CancelledError" not in log and "answered 503" in log


def test_bad_flags_and_busy_ports_are_refused_before_the_model_loads(folder: Path, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    import torch

    import matryoshka2d.cli.serve as cli_serve
    from matryoshka2d.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(cli_serve, "load_model", no_load)
    devices = ["tpu", "", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert main(["serve", str(folder), "--device", device, "--port", str(free_port())]) == 2, device
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--device" in err and "internal error" not in err, err
    for flag, value, needle in (("--header-timeout", "0", "header_timeout_s 0.0 is out of range"),
                                ("--body-timeout", "-1", "body_timeout_s -1.0 is out of range"),
                                ("--keep-alive-timeout", "1e9", "keep_alive_s 1000000000.0 is out of range"),
                                ("--max-connections", "0", "max_connections 0 must be a positive integer"),
                                ("--graceful-timeout", "-1", "graceful_timeout_s -1.0 is out of range")):
        assert main(["serve", str(folder), flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(folder), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--port {port} on 127.0.0.1 is in use" in err
    theirs = tmp_path / "graphs"
    (theirs / "exit-1").mkdir(parents=True)
    (theirs / "exit-1" / "notes.txt").write_text("mine")
    pytest.importorskip("onnxruntime")
    assert main(["serve", str(folder), "--backend", "onnx", "--onnx-dir", str(theirs)]) == 2
    assert "holds files m2d serve did not write" in capsys.readouterr().err
    assert (theirs / "exit-1" / "notes.txt").read_text() == "mine"


def test_quiet_serve_prints_nothing_on_success(folder: Path, tmp_path: Path) -> None:
    with running_server(folder, tmp_path / "server.log", quiet=True) as s:
        assert httpx.post(f"{s.url}/v1/embeddings", json={"input": "a dog"}).status_code == 200
        served = httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"]
    assert s.log_text() == ""
    assert served == Path(str(MatryoshkaEncoder.from_pretrained(folder).metadata["source"])).name  # not "tiny"


@pytest.mark.slow
def test_500_half_open_connections_do_not_lock_out_new_clients(folder: Path, tmp_path: Path) -> None:
    """500 clients send part of their headers and go silent, against a server whose file limit is 256: the
    oldest idle connections are shed, so new clients are still served at once (the header timeout is long)."""
    with running_server(folder, tmp_path / "server.log", "--header-timeout", "60", files=256) as s:
        held = []
        try:
            for _ in range(500):
                sock = socket.create_connection(address(s), timeout=10)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            slowest = 0.0
            for i in range(20):
                began = time.perf_counter()
                with httpx.Client(base_url=s.url, timeout=10) as client:
                    assert client.get("/health").status_code == 200
                    assert client.post("/v1/embeddings", json={"input": f"new client {i}"}).status_code == 200
                slowest = max(slowest, time.perf_counter() - began)
            assert slowest < 3.0, slowest
            shed = sum(1 for sock in held if closed(sock))
            assert shed >= 500 - 256, shed
        finally:
            for sock in held:
                sock.close()
        log = s.log_text()
    assert "Traceback" not in log and "out of system resource" not in log, log[-2000:]


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (EOF or reset)."""
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True
