"""``m2d serve --replicas 2`` on a local Ray cluster (127.0.0.1): the same answers as one process, both replicas
take traffic, SIGTERM drains both (the requests each holds are answered in full). Slow (Ray starts in about a
minute here)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import SENTENCES

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the ray-serve extra)")
from tests.helpers.serve import running_server  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = [t for t in SENTENCES if t]


def embeddings(url: str, layer: int, dim: int) -> np.ndarray:
    response = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "layer": layer, "dimensions": dim},
                          timeout=60)
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


async def crowd(url: str, count: int, inputs: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*[client.post("/v1/embeddings", json={"input": TEXTS[:inputs], "layer": 2})
                                      for _ in range(count)])


async def timed_crowd(url: str, count: int, inputs: list[str]) -> list[tuple[float, int | None, str | None]]:
    """``count`` requests of ``inputs`` at once: each one's (time answered, status or ``None`` if the connection
    failed, replica)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one() -> tuple[float, int | None, str | None]:
            try:
                response = await client.post("/v1/embeddings", json={"input": inputs, "layer": 4})
            except httpx.HTTPError:
                return time.monotonic(), None, None
            return time.monotonic(), response.status_code, response.headers.get("x-m2d-replica")

        return list(await asyncio.gather(*[one() for _ in range(count)]))


def test_two_replicas_answer_like_one_process_share_traffic_and_drain(tiny_dir: Path, tmp_path: Path) -> None:
    pairs = [(1, 8), (2, 32), (4, 16)]
    with running_server(tiny_dir, tmp_path / "single.log") as single:
        expected = {pair: embeddings(single.url, *pair) for pair in pairs}
    with running_server(tiny_dir, tmp_path / "ray.log", "--replicas", "2", timeout=300, new_session=True) as ray:
        url, process = ray.url, ray.process
        for pair in pairs:
            np.testing.assert_allclose(embeddings(url, *pair), expected[pair], atol=1e-5)
        info = httpx.get(f"{url}/info").json()
        assert info["backend"] == "torch" and info["runner"]["threads"] == 1
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "a", "layer": 9}).json()["error"]["code"] == \
            "invalid_layer"  # the same errors
        served: set[str] = set()
        for _ in range(10):  # Ray's proxy learns of the second replica within a few seconds of the first
            served |= {r.headers["x-m2d-replica"] for r in asyncio.run(crowd(url, 40, 4))}
            if len(served) == 2:
                break
            time.sleep(2)
        assert len(served) == 2, served  # both replicas took traffic
        results: list[tuple[float, int | None, str | None]] = []
        # 16 requests of 256 long texts (within each replica's --max-queue): seconds of work, running at SIGTERM
        long = [f"{' '.join(TEXTS)} {i}" for i in range(256)]
        sender = threading.Thread(target=lambda: results.extend(asyncio.run(timed_crowd(url, 16, long))))
        sender.start()
        time.sleep(1.0)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        sender.join(300)
        assert process.wait(300) == 0
    # every request the replicas held is answered in full, by both replicas after the SIGTERM
    assert [status for _, status, _ in results] == [200] * 16, results
    drained = {replica for done, status, replica in results if done > stopped}
    assert len(drained) == 2, [(round(d - stopped, 2), s, r) for d, s, r in results]
    log = (tmp_path / "ray.log").read_text()
    assert "stopping: the replicas finish their requests in flight" in log
