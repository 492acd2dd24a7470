"""m2d bench with several peers and backends: the worker protocol, the peer venv, interleaved records, targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from matryoshka2d.bench import peer_env
from matryoshka2d.bench.result import OURS, PEER, BenchmarkResult, exact_enough
from matryoshka2d.bench.runner import run_benchmark
from matryoshka2d.bench.settings import BenchmarkSettings
from matryoshka2d.export.exporter import export_model
from tests.conftest import SENTENCES

ALL_PEERS = ",".join(["sentence-transformers", "sentence-transformers:onnx", "sentence-transformers:onnx-int8",
                      "sentence-transformers:openvino"])


def _venv_ready() -> bool:
    venv = peer_env.cache_dir() / "peer-venv"
    return (venv / peer_env.READY).is_file() and peer_env.venv_python(venv).exists()


def test_worker_protocol_in_this_interpreter(tiny_model, tmp_path):
    """The worker script, run by PeerWorker with our own interpreter on sentence-transformers' torch backend."""
    pytest.importorskip("sentence_transformers")
    folder = export_model(tiny_model, tmp_path / "st", layer=2, dim=32, format="sentence-transformers")
    worker = peer_env.PeerWorker(Path(sys.executable), SENTENCES)
    try:
        worker.load("t", "torch", folder, width=32, threads=1, max_seq_length=tiny_model.max_seq_length)
        run = worker.runner("t", 16)
        got = run(SENTENCES, 3)
        assert run.last_cpu is not None and run.last_cpu >= 0
        np.testing.assert_allclose(got, tiny_model.encode(SENTENCES, layer=2, dim=16), atol=1e-5)
        with pytest.raises(RuntimeError, match="unknown backend 'tpu'"):
            worker.load("x", "tpu", folder, width=32, threads=1, max_seq_length=16)
    finally:
        worker.close()
    assert worker.proc.poll() is not None


def test_ready_venv_is_reused_without_pip(tmp_path, monkeypatch):
    venv = tmp_path / "peer-venv"
    python = peer_env.venv_python(venv)
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    import sysconfig

    (venv / peer_env.READY).write_text(json.dumps({"requirements": list(peer_env.PEER_REQUIREMENTS),
                                                   "parent": sysconfig.get_paths()["purelib"]}), encoding="utf-8")
    monkeypatch.setattr(peer_env, "_run", lambda *a: pytest.fail("pip must not run for a ready venv"))
    assert peer_env.ensure_peer_venv(venv) == python


def test_bad_peer_or_backend_is_named():
    with pytest.raises(ValueError, match="unknown peer 'sentence-transformers:tensorrt'; valid peers: "):
        BenchmarkSettings(peer="sentence-transformers,sentence-transformers:tensorrt")
    with pytest.raises(ValueError, match="unknown backend 'tflite'; valid backends: torch, onnx"):
        BenchmarkSettings(backends=["torch", "tflite"])
    assert BenchmarkSettings(peer=" sentence-transformers:onnx,sentence-transformers:onnx").peers == [
        "sentence-transformers:onnx"]


def test_our_backends_are_timed_beside_torch(tiny_model):
    pytest.importorskip("openvino")
    settings = BenchmarkSettings(layers=[1], batch_sizes=[3], repeats=1, warmup=0, threads=1,
                                 backends=["torch", "onnx", "onnx-int8", "openvino"])
    result = run_benchmark(tiny_model, SENTENCES, settings)
    names = {(r["impl"], r["dtype"], r["layer"]) for r in result.records}
    assert {(OURS, "fp32", 1), (f"{OURS}:onnx", "fp32", 1), (f"{OURS}:onnx", "int8", 1),
            (f"{OURS}:openvino", "fp32", 4)} <= names
    for r in result.records:
        if r["impl"] != OURS:
            assert r["fp32_reference"] == f"{OURS} fp32"
            assert r["cosine_to_fp32_mean"] > (0.9 if r["dtype"] == "int8" else 0.99999)
        assert len(r["sentences_per_s_rounds"]) == 1
    assert "| matryoshka2d:onnx int8 |" in result.to_markdown_all()


@pytest.mark.skipif(not _venv_ready(), reason="the peer venv is not made (m2d bench --peer ... makes it once)")
def test_every_peer_in_one_interleaved_run(tiny_model, tiny_dir):
    settings = BenchmarkSettings(layers=[1], dims=[16, 32], batch_sizes=[4], repeats=2, warmup=1, threads=1,
                                 peer=ALL_PEERS, backends=["torch", "onnx"])
    result = run_benchmark(tiny_model, SENTENCES * 3, settings, peer_source=str(tiny_dir))
    impls = {(r["impl"], r["dtype"]) for r in result.records}
    assert {(PEER, "fp32"), (f"{PEER}:onnx", "fp32"), (f"{PEER}:onnx", "int8"), (f"{PEER}:openvino", "auto"),
            (OURS, "fp32"), (f"{OURS}:onnx", "fp32")} <= impls
    for r in result.records:
        assert r["blocks_run"] == r["layer"] and len(r["sentences_per_s_rounds"]) == 2
        if r["impl"].startswith(PEER) and r["dtype"] != "int8":  # the same exit, physically truncated alike
            assert r["cosine_to_fp32_mean"] > 0.9999, r
    assert result.meta["peer_worker_versions"]["sentence_transformers"]
    targets = result.peer_targets()
    assert {t["layer"] for t in targets} == {1, 4} and all(t["value"] > 0 for t in targets)


def _rec(impl, dtype, rate, **extra):
    return {"impl": impl, "dtype": dtype, "layer": 2, "dim": 8, "batch_size": 4, "sentences_per_s": rate,
            "sentences_per_s_rounds": [rate, rate], **extra}


def test_peer_target_takes_the_fastest_exact_enough_on_each_side():
    records = [
        _rec(OURS, "fp32", 100.0),
        _rec(f"{OURS}:onnx", "int8", 900.0, cosine_to_fp32_mean=0.99, stsb_spearman_delta=-1.0),  # not exact
        _rec(f"{OURS}:openvino", "fp32", 400.0, cosine_to_fp32_mean=0.99999, stsb_spearman_delta=0.0),
        _rec(PEER, "fp32", 100.0, cosine_to_fp32_mean=1.0),
        _rec(f"{PEER}:onnx", "int8", 800.0, cosine_to_fp32_mean=0.95),  # not exact
        _rec(f"{PEER}:openvino", "auto", 200.0, cosine_to_fp32_mean=0.9999, stsb_spearman_delta=0.05),
    ]
    assert not exact_enough(records[1]) and exact_enough(records[2]) and exact_enough(records[0])
    result = BenchmarkResult({"hidden_size": 8, "batch_sizes": [4], "layers": [2]}, records)
    [target] = result.peer_targets()
    assert target["value"] == 2.0 and target["met"] and "openvino fp32" in target["target"]
    assert "sentence-transformers:openvino auto" in target["target"]
