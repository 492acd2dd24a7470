"""The public callbacks the benchmarks sample memory through (issue 37: they monkeypatched library internals):
``MatryoshkaEncoder.encode(progress=...)`` and ``encode_corpus(on_shard=..., release_memory=...)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from matryoshka2d.corpus import encode_corpus, make_job  # noqa: E402
from matryoshka2d.corpus.shards import ShardSpec  # noqa: E402


def test_encode_progress_is_called_once_per_batch_with_its_size(tiny_model) -> None:
    texts = [f"the dog runs in the park {'very ' * (i % 4)}fast {i}" for i in range(23)]
    seen: list[int] = []
    out = tiny_model.encode(texts, layer=2, dim=16, batch_size=5, progress=seen.append)
    assert sorted(seen) == [3, 5, 5, 5, 5]  # every text counted once, one call per batch of 5
    np.testing.assert_array_equal(out, tiny_model.encode(texts, layer=2, dim=16, batch_size=5))


def write_corpus(path: Path, rows: int) -> Path:
    path.write_text("id\ttext\n" + "".join(f"d{i}\ta man plays the guitar {i}\n" for i in range(rows)),
                    encoding="utf-8")
    return path


def test_on_shard_sees_each_shard_once_it_is_written(tiny_model, tmp_path: Path) -> None:
    job = make_job(tiny_model, "tiny", [str(write_corpus(tmp_path / "c.tsv", 7))], "2:16,4:32", shard_size=3,
                   batch_size=2)
    out = tmp_path / "out"
    seen: list[tuple[int, int, bool]] = []

    def on_shard(spec: ShardSpec) -> None:
        seen.append((spec.index, spec.rows, (out / spec.file).is_file()))

    manifest = encode_corpus(job, out, model=tiny_model, progress=False, on_shard=on_shard)
    assert seen == [(0, 3, True), (1, 3, True), (2, 1, True)]
    assert manifest["rows"] == 7
    seen.clear()
    encode_corpus(job, out, model=tiny_model, progress=False, on_shard=on_shard)  # resumed: nothing left to do
    assert seen == []


@pytest.mark.parametrize("release", [True, False])
def test_release_memory_decides_whether_the_heap_is_trimmed_after_each_shard(tiny_model, tmp_path: Path,
                                                                             monkeypatch, release: bool) -> None:
    import matryoshka2d.corpus.shards as shards

    calls: list[int] = []
    monkeypatch.setattr(shards, "release_free_memory", lambda: calls.append(1) or True)
    job = make_job(tiny_model, "tiny", [str(write_corpus(tmp_path / "c.tsv", 5))], "2:16", shard_size=2)
    encode_corpus(job, tmp_path / "out", model=tiny_model, progress=False, release_memory=release)
    assert len(calls) == (3 if release else 0)


def test_on_shard_with_the_ray_engine(tiny_model, tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    job = make_job(tiny_model, str(tiny_dir), [str(write_corpus(tmp_path / "c.tsv", 5))], "2:16", shard_size=2,
                   pooling="mean")
    seen: list[int] = []
    encode_corpus(job, tmp_path / "out", engine="ray", workers=1, progress=False,
                  on_shard=lambda spec: seen.append(spec.index))
    assert sorted(seen) == [0, 1, 2]
