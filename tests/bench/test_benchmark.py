"""The encoding benchmark (``m2d bench``) on the tiny model: well-formed records, real truncation, bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.bench import settings as benchmark
from matryoshka2d.bench.peers import load_peer, truncate_peer
from matryoshka2d.bench.result import OURS, PEER
from matryoshka2d.bench.runner import run_benchmark
from matryoshka2d.bench.settings import BenchmarkSettings
from matryoshka2d.cli import main
from matryoshka2d.encoder import architectures
from matryoshka2d.encoder.tokenization import tokenize_unpadded
from tests.conftest import SENTENCES

FIELDS = {"impl", "layer", "dim", "dtype", "batch_size", "sentences_per_s", "sentences_per_s_min",
          "sentences_per_s_max", "speedup_vs_full", "ideal_speedup", "peak_rss_mb", "blocks_run"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models only lose from a second intra-op thread on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def sentence_file(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(s for s in SENTENCES if s) + "\n", encoding="utf-8")
    return path


def test_records_cover_every_layer_of_both_implementations(tiny_model, tiny_dir):
    settings = BenchmarkSettings(batch_sizes=[3], repeats=1, warmup=0, peer="sentence-transformers")
    result = run_benchmark(tiny_model, SENTENCES, settings, peer_source=str(tiny_dir))
    n = tiny_model.num_layers
    assert len(result.records) == 2 * n
    for impl in (OURS, PEER):
        recs = sorted(result.find(impl=impl), key=lambda r: r["layer"])
        assert [r["layer"] for r in recs] == list(range(1, n + 1))
        for r in recs:
            assert FIELDS <= set(r)
            assert r["sentences_per_s_max"] >= r["sentences_per_s"] >= r["sentences_per_s_min"] > 0
            assert r["blocks_run"] == r["layer"]  # the model that was timed really is that shallow
            assert r["ideal_speedup"] == pytest.approx(n / r["layer"])
            assert r["dim"] == tiny_model.hidden_size and r["dtype"] == "fp32" and r["batch_size"] == 3
        assert recs[-1]["speedup_vs_full"] == pytest.approx(1.0)
    for r in result.find(impl=OURS):  # same folder, same pooling: both libraries compute the same embedding
        assert r["cosine_to_peer_mean"] == pytest.approx(1.0, abs=1e-5)
        assert r["ratio_vs_peer"] > 0
    meta = result.meta
    assert meta["num_layers"] == n and meta["peer"] == PEER and meta["sentences"]["count"] == len(SENTENCES)
    assert {"torch", "transformers", "sentence-transformers"} <= set(meta["library_versions"])
    assert meta["threads"] >= 1 and meta["date"] and meta["cpu"]["model"]
    table = result.to_markdown()
    assert table.count("\n") == 1 + n and "ours/ST" in table


def test_truncated_copies_are_shallower_and_leave_the_original_whole(tiny_model, tiny_dir):
    st = load_peer(str(tiny_dir), tiny_model, "cpu")
    short = truncate_peer(st, 2)
    assert architectures.get_depth(short[0].auto_model) == 2 and short[0].auto_model.config.num_hidden_layers == 2
    assert architectures.get_depth(st[0].auto_model) == tiny_model.num_layers
    calls: list[int] = []
    for i, block in enumerate(architectures.get_blocks(short[0].auto_model)):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    short.encode(SENTENCES[:2])
    assert sorted(set(calls)) == [0, 1]
    full = st.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(full, tiny_model.encode(SENTENCES), atol=1e-5)
    np.testing.assert_allclose(short.encode(SENTENCES, normalize_embeddings=True),
                               tiny_model.encode(SENTENCES, layer=2), atol=1e-5)


def test_bf16_records_report_their_distance_to_fp32(tiny_model, monkeypatch):
    monkeypatch.setattr(benchmark, "dtype_problem", lambda name, device: None)  # run bf16 even if emulated
    settings = BenchmarkSettings(layers=[2], dims=[8, 32], batch_sizes=[4], dtypes=["fp32", "bf16"], repeats=1,
                                 warmup=0)
    result = run_benchmark(tiny_model, SENTENCES, settings)
    assert sorted({r["layer"] for r in result.records}) == [2, 4]  # full depth is always timed
    assert {r["dim"] for r in result.records} == {8, 32}
    assert {r["attn_implementation"] for r in result.find(dtype="fp32")} == {"sdpa"}
    assert {r["attn_implementation"] for r in result.find(dtype="bf16")} == {"eager"}  # faster in bf16 on CPU
    for r in result.find(dtype="bf16"):
        assert 0.99 < r["cosine_to_fp32_mean"] <= 1.0 + 1e-9 and r["cosine_to_fp32_min"] <= r["cosine_to_fp32_mean"]
    assert tiny_model.backbone.dtype == torch.float32  # the benchmark times copies, never the caller's model


def test_bf16_model_pools_in_float32(tiny_model):
    reference = tiny_model.encode(SENTENCES, layer=3)
    fast = tiny_model.to(torch.bfloat16)
    out = fast(fast.tokenize(SENTENCES[:2]), layers=(3,))
    assert out[3].dtype == torch.float32
    emb = fast.encode(SENTENCES, layer=3)
    assert emb.dtype == np.float32
    assert (emb * reference).sum(1).min() > 0.99


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batches_are_padded_like_tokenize(tiny_model, side):
    tiny_model.tokenizer.padding_side = side
    rows = np.array([4, 0, 5, 3])
    texts = [SENTENCES[i] for i in rows]
    collated = tokenize_unpadded(tiny_model.tokenizer, SENTENCES, tiny_model.max_seq_length).collate(rows)
    expected = tiny_model.tokenize(texts)
    assert set(collated) == set(expected) - {"num_truncated"}
    for key, value in collated.items():
        assert torch.equal(torch.from_numpy(value), expected[key]), key


def test_cli_writes_json_and_plot(tiny_dir, sentence_file, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "speed.png"
    rc = main(["-q", "bench", str(tiny_dir), "--sentences", str(sentence_file), "--layers", "1,2",
               "--batch-sizes", "2,4", "--repeats", "1", "--warmup", "0", "--output", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["layer"] for r in data["records"]} == {1, 2, 4} and {r["batch_size"] for r in data["records"]} == {2, 4}
    assert data["meta"]["command"].startswith(f"m2d bench {tiny_dir}") and data["targets"] and data["targets_cpu"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| batch | impl | dtype | layer |" in printed
    assert "goal" not in printed and "MISSED" not in printed  # the project's goals only with --targets
    assert main(["-q", "bench", str(tiny_dir), "--sentences", str(sentence_file), "--layers", "1", "--batch-sizes",
                 "2", "--repeats", "1", "--warmup", "0", "--targets"]) == 0
    printed = capsys.readouterr().out
    assert "speed goals, medians over 1 timed round (few rounds: a noisy look" in printed and "MISSED" not in printed
    assert main(["bench", str(tiny_dir), "--sentences", str(sentence_file), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "fp8"], "unknown dtype 'fp8'; valid dtypes: fp32, bf16, fp16"),
        (["--dtype", "fp32,bf16"], "dtype bf16 cannot run on cpu: (pretend) no bf16 here; pass --dtype fp32, or "
                                   "--allow-fallback"),
        (["--peer", "faiss"], "unknown peer 'faiss'; valid peers: sentence-transformers"),
        (["--repeats", "0"], "repeats 0 must be an integer >= 1"),
        (["--layers", "9"], "layer 9 is out of range 1..4"),
        (["--batch-sizes", "0"], "batch size 0 is out of range"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tiny_dir, sentence_file, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(benchmark, "dtype_problem", lambda name, device: None if name == "fp32" else
                        "(pretend) no bf16 here")
    assert main(["bench", str(tiny_dir), "--sentences", str(sentence_file), *extra]) == 2
    assert message in capsys.readouterr().err


def test_unsupported_dtype_falls_back_only_when_asked(tiny_dir, sentence_file, tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "dtype_problem", lambda name, device: None if name == "fp32" else "no bf16")
    out = tmp_path / "b.json"
    assert main(["-q", "bench", str(tiny_dir), "--sentences", str(sentence_file), "--layers", "4", "--dtype", "bf16",
                 "--allow-fallback", "--repeats", "1", "--warmup", "0", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["dtypes"] == [{"requested": "bf16", "used": "fp32"}]
    assert {r["dtype"] for r in data["records"]} == {"fp32"}


def test_missing_peer_library_names_the_install(tiny_dir, sentence_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    assert main(["bench", str(tiny_dir), "--sentences", str(sentence_file), "--peer", "sentence-transformers"]) == 2
    hint = "needs the sentence-transformers library: pip install -e '.[st]' in the matryoshka2d repository"
    assert hint in capsys.readouterr().err


def test_empty_sentence_file_exits_2(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["bench", str(tiny_dir), "--sentences", str(empty)]) == 2
    assert "file is empty" in capsys.readouterr().err


def test_dtype_support_is_checked_per_device():
    assert benchmark.dtype_problem("fp32", "cpu") is None
    flags = set(benchmark.cpu_info()["flags"])
    assert (benchmark.dtype_problem("bf16", "cpu") is None) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_loaded_model_is_untouched_by_a_run(tiny_dir):
    model = MatryoshkaEncoder.from_pretrained(tiny_dir)
    before = model.encode(SENTENCES)
    run_benchmark(model, SENTENCES[:3], BenchmarkSettings(layers=[1], batch_sizes=[2], repeats=1, warmup=0))
    assert model.num_layers == 4
    np.testing.assert_array_equal(model.encode(SENTENCES), before)


def test_the_table_of_ours_never_lists_a_peer():
    from matryoshka2d.bench.result import PEER, BenchmarkResult

    meta = {"num_layers": 4, "hidden_size": 8, "batch_sizes": [16], "peer": PEER}
    rates = {"sentences_per_s_min": 9.0, "sentences_per_s_max": 13.0, "speedup_vs_full": 1.0, "ideal_speedup": 1.0}
    records = [_rec(OURS, "fp32", 4, sentences_per_s=10.0, **rates),
               _rec(f"{PEER}:onnx", "fp32", 4, sentences_per_s=12.0, **rates)]
    table = BenchmarkResult(meta, records).to_markdown()
    assert f"| {OURS} |" in table and ":onnx" not in table


def _rec(impl, dtype, layer, **extra):
    return {"impl": impl, "dtype": dtype, "layer": layer, "dim": 8, "batch_size": 16, **extra}


def test_targets_use_the_best_mode_that_keeps_quality():
    from matryoshka2d.bench.result import COMPILED, BenchmarkResult

    meta = {"num_layers": 4, "hidden_size": 8, "batch_sizes": [16]}
    records = [
        _rec(OURS, "fp32", 4, ratio_vs_peer=1.1, speedup_vs_full=1.0),
        _rec(OURS, "fp32", 2, speedup_vs_full=1.95),
        _rec(OURS, "fp32", 1, speedup_vs_full=3.0),
        _rec(OURS, "bf16", 4, ratio_vs_peer_fp32=2.6, cosine_to_fp32_mean=0.9995, stsb_spearman_delta=-0.1,
             speedup_vs_full=1.0),
        _rec(COMPILED, "bf16", 4, ratio_vs_peer_fp32=3.0, cosine_to_fp32_mean=0.99, stsb_spearman_delta=-0.1),
    ]
    targets = {t["target"]: t for t in BenchmarkResult(meta, records).targets()}
    assert targets["full depth fp32: ours / ST fp32"]["met"] is True
    # the compiled mode is faster but loses too much cosine, so the eager bf16 mode is the one that counts
    best = targets["best mode (matryoshka2d bf16): ours / ST fp32"]
    assert best["value"] == 2.6 and best["met"] is True
    assert targets["early exit n=2 (fp32): speedup vs full"]["met"] is True
    assert targets["early exit n=1 (fp32): speedup vs full"] == {
        "target": "early exit n=1 (fp32): speedup vs full", "batch_size": 16, "metric": "wall", "value": 3.0,
        "goal": 3.2, "met": False}
