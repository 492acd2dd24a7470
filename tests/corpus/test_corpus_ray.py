"""The Ray engine gives the same shards as the local one (starts a small local Ray cluster: slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

from matryoshka2d.corpus import encode_corpus, make_job  # noqa: E402


@pytest.mark.slow
def test_ray_engine_equals_local(tiny_model, tiny_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    words = "a man dog cat plays the guitar in park red blue".split()
    lines = [f"d{i}\t{' '.join(rng.choice(words, int(rng.integers(1, 12))))}" for i in range(700)]
    (tmp_path / "c.tsv").write_text("id\ttext\n" + "\n".join(lines) + "\n", encoding="utf-8")
    job = make_job(tiny_model, str(tiny_dir), [str(tmp_path / "c.tsv")], "2:16,4:32", id_column="id",
                   shard_size=200, pooling="mean")
    local = encode_corpus(job, tmp_path / "local", model=tiny_model, progress=False)
    ray_run = encode_corpus(job, tmp_path / "ray", engine="ray", workers=2, threads_per_worker=1, progress=False)
    assert ray_run.pop("run")["engine"] == "ray" and local.pop("run")["engine"] == "local"
    a, b = pq.read_table(tmp_path / "local" / "shards"), pq.read_table(tmp_path / "ray" / "shards")
    assert a.column("id").to_pylist() == b.column("id").to_pylist() == [f"d{i}" for i in range(700)]
    for col in ("layer2_dim16", "layer4_dim32"):
        x = np.stack(a.column(col).to_numpy(zero_copy_only=False))
        y = np.stack(b.column(col).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert ray_run["rows"] == local["rows"] == 700 and ray_run["num_shards"] == 4
