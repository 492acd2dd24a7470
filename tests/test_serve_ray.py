"""``m2d serve --replicas 2`` on a local Ray cluster (127.0.0.1): the same answers as one process, both replicas
take traffic, SIGTERM drains both (the rows each holds are answered). Slow (Ray starts in about a minute here)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SENTENCES

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the ray-serve extra)")
from serve_helpers import running_server  # noqa: E402

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


async def held_crowd(url: str, count: int, *, until: float) -> list[tuple[float, int | None, str | None]]:
    """``count`` requests at once, then one every 0.1 s until ``until`` (monotonic): the trickle keeps both
    batchers waiting for more (their quiet gap is 1 s), so the crowd's rows stay queued. Returns each request's
    (time answered, status or ``None`` if the connection failed, replica)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one() -> tuple[float, int | None, str | None]:
            try:
                response = await client.post("/v1/embeddings", json={"input": TEXTS, "layer": 2})
            except httpx.HTTPError:  # the proxy is gone (after the shutdown): not a request the replicas held
                return time.monotonic(), None, None
            return time.monotonic(), response.status_code, response.headers.get("x-m2d-replica")

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        while time.monotonic() < until:
            await asyncio.sleep(0.1)
            tasks.append(asyncio.create_task(one()))
        return list(await asyncio.gather(*tasks))


def test_two_replicas_answer_like_one_process_share_traffic_and_drain(tiny_dir: Path, tmp_path: Path) -> None:
    pairs = [(1, 8), (2, 32), (4, 16)]
    with running_server(tiny_dir, tmp_path / "single.log") as single:
        expected = {pair: embeddings(single.url, *pair) for pair in pairs}
    # a long batch wait keeps rows queued in the batchers when SIGTERM comes: the drain has work to finish
    with running_server(tiny_dir, tmp_path / "ray.log", "--replicas", "2", "--batch-wait-ms", "1000", timeout=300,
                        new_session=True) as ray:
        url, process = ray.url, ray.process
        for pair in pairs:
            np.testing.assert_allclose(embeddings(url, *pair), expected[pair], atol=1e-5)
        info = httpx.get(f"{url}/info").json()
        assert info["backend"] == "torch" and info["runner"]["threads"] == 1
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "a", "layer": 9}).json()["error"]["code"] == \
            "invalid_layer"  # the same errors
        served = {r.headers["x-m2d-replica"] for r in asyncio.run(crowd(url, 40, 4))}
        assert len(served) == 2, served  # both replicas took traffic
        results: list[tuple[float, int | None, str | None]] = []
        began = time.monotonic()
        sender = threading.Thread(target=lambda: results.extend(asyncio.run(held_crowd(url, 24, until=began + 4))))
        sender.start()
        time.sleep(1.5)  # the crowd waits in both replicas' batchers
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        sender.join(120)
        assert process.wait(120) == 0
    crowd_answers, trickle = results[:24], results[24:]
    # every request the replicas held is answered; the trickle after the shutdown meets Ray's clean 404 / 503
    assert {status for _, status, _ in crowd_answers} == {200}, crowd_answers
    assert {status for _, status, _ in trickle} <= {200, 404, 503, None}
    drained = {replica for done, status, replica in results if status == 200 and done > stopped}
    assert len(drained) == 2, [(round(d - stopped, 2), s, r) for d, s, r in results]  # both drained their rows
    log = (tmp_path / "ray.log").read_text()
    assert "stopping: the replicas finish their requests in flight" in log
