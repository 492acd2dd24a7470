"""A Hypothesis fuzz of ``POST /v1/embeddings`` on a live server: generated bodies (lone surrogates, NUL and
whitespace texts, huge strings, wrong types, unknown fields, bodies that are not JSON) never get a response of
500 or above, every error is JSON with a code, and ``/health`` answers within 1 s throughout.

The default run sends 200 bodies; the slow run 2,000.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from matryoshka2d import MatryoshkaEncoder  # noqa: E402
from tests.helpers.serve import running_server  # noqa: E402

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXTS = st.one_of(
    st.text(max_size=40),  # any Unicode, NUL and whitespace included
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), SURROGATES, st.text(max_size=8)),
    st.sampled_from(["", " ", "\t\n ", "\x00", "a\x00b", "\u3000", "\ufeff", "\U0001f600" * 3]),
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=6), st.integers(20_000, 800_000)),  # huge
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXTS)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                              max_size=3),
                      max_leaves=8)
TOKEN_IDS = st.lists(st.integers(-5, 2**40) | st.integers(0, 200), max_size=40)
INPUTS = st.one_of(TEXTS, st.lists(TEXTS, max_size=70), TOKEN_IDS, st.lists(TOKEN_IDS, max_size=8), VALUES)
OPTIONS = {
    "model": st.one_of(st.just("fuzz"), TEXTS, VALUES),
    "layer": st.one_of(st.integers(-2, 6), st.floats(), VALUES),
    "dimensions": st.one_of(st.integers(-2, 40), st.floats(), VALUES),
    "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), VALUES),
    "precision": st.one_of(st.sampled_from(["float32", "int8", "uint8", "binary", "ubinary"]), VALUES),
    "truncate": st.one_of(st.booleans(), VALUES),
    "user": VALUES,
}
OBJECTS = st.fixed_dictionaries({"input": INPUTS}, optional={**OPTIONS, "extra": VALUES})
WORDS = st.text(alphabet="abcdefghij klmnop,.", min_size=1, max_size=80).filter(str.strip)
VALID = st.fixed_dictionaries({"input": st.one_of(WORDS, st.lists(WORDS, min_size=1, max_size=20))}, optional={
    "layer": st.integers(1, 4), "dimensions": st.integers(1, 32),
    "encoding_format": st.sampled_from(["float", "base64"]),
    "precision": st.sampled_from(["float32", "int8", "uint8", "binary", "ubinary"]), "truncate": st.booleans()})
BODIES = st.one_of(
    VALID.map(lambda body: json.dumps(body).encode()),
    OBJECTS.map(lambda body: json.dumps(body).encode()),  # surrogates become \\udXXX escapes: valid JSON
    VALUES.map(lambda value: json.dumps(value).encode()),  # not an object
    st.binary(max_size=64),  # not JSON at all
    OBJECTS.map(lambda body: json.dumps(body)[:-1].encode()),  # cut short
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = MatryoshkaEncoder.from_pretrained(tiny_dir, pooling="mean").save(tmp_path_factory.mktemp("fz") / "fuzz")
    log = tmp_path_factory.mktemp("fuzz-log") / "server.log"
    with running_server(folder, log, "--served-model-name", "fuzz", "--max-client-batch", "64",
                        "--batch-wait-ms", "0") as server:
        yield server
    assert "Traceback" not in server.log_text()


WATCH = """
import json, os, sys, time
import httpx
url, stop = sys.argv[1], sys.argv[2]
seen = []
with httpx.Client(base_url=url, timeout=10) as client:
    while not os.path.exists(stop):
        began = time.perf_counter()
        assert client.get("/health").status_code == 200
        seen.append(time.perf_counter() - began)
        time.sleep(0.1)
print(json.dumps(seen))
"""


def fuzz(server, examples: int, tmp_path: Path) -> dict[int, int]:
    """Send ``examples`` generated bodies while another process times ``/health`` (a process of its own, so
    the time is the server's, not this busy process's); return the status counts."""
    statuses: dict[int, int] = {}
    stop = tmp_path / "stop"
    watcher = subprocess.Popen([sys.executable, "-c", WATCH, server.url, str(stop)], stdout=subprocess.PIPE)
    client = httpx.Client(base_url=server.url, timeout=120, headers={"content-type": "application/json"})

    @given(body=BODIES)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def send(body: bytes) -> None:
        response = client.post("/v1/embeddings", content=body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body[:300], response.text[:300])
        assert response.headers["content-type"].startswith("application/json"), response.headers
        if response.status_code >= 400:
            assert isinstance(response.json()["error"]["code"], str), response.text
        else:
            assert response.json()["data"], response.text

    try:
        send()
    finally:
        stop.touch()
        out, _ = watcher.communicate(timeout=30)
        client.close()
    health = json.loads(out)
    assert watcher.returncode == 0 and len(health) >= 5, health
    assert max(health) < 1.0, sorted(health)[-5:]
    print(f"fuzz: {sum(statuses.values())} bodies, statuses {dict(sorted(statuses.items()))}, /health max "
          f"{max(health) * 1000:.0f} ms over {len(health)} probes")
    return statuses


def test_fuzz_embeddings_200_bodies(fuzz_server, tmp_path: Path) -> None:
    statuses = fuzz(fuzz_server, 200, tmp_path)
    assert sum(statuses.values()) >= 200 and statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0


@pytest.mark.slow
def test_fuzz_embeddings_2000_bodies(fuzz_server, tmp_path: Path) -> None:
    statuses = fuzz(fuzz_server, 2000, tmp_path)
    assert sum(statuses.values()) >= 2000 and statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0
