"""Query exits in the document space: the loss families, post-hoc alignment (`m2d align`), the query path's
folder format, and search with one full-exit index (method.md section 8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.cli import main
from matryoshka2d.data.beir import BeirSet
from matryoshka2d.evaluation.query_exits import evaluate_query_exits
from matryoshka2d.losses.alignment import cross_exit_infonce, embedding_alignment, score_distillation
from matryoshka2d.training.align import AlignConfig, align_query_exits

TEXTS = ["the dog runs in the park", "a man is playing the guitar", "the cat sits on the red car",
         "two children are eating food near the river", "the woman reads a book under a tree",
         "a woman plays the piano in the house", "who plays music", "a dog in the park"]


def _unit(x: np.ndarray, d: int) -> np.ndarray:
    x = x[:, :d]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("dim", [None, 5])
def test_loss_families_match_float64_formulas(dim: int | None) -> None:
    gen = np.random.default_rng(0)
    q, t, p = (gen.normal(size=(4, 8)) for _ in range(3))
    extra = gen.normal(size=(2, 8))  # hard negatives: more document rows
    d = dim or 8
    qn, tn, pn = _unit(q, d), _unit(t, d), _unit(np.concatenate([p, extra]), d)
    as_t = {k: torch.tensor(v, dtype=torch.float32, requires_grad=k != "t") for k, v in
            {"q": q, "t": t, "p": np.concatenate([p, extra])}.items()}
    # InfoNCE: cross-entropy of tau * cos(q_i, p_j), target j = i
    logits = 20 * qn @ pn.T
    want = -np.mean(_log_softmax(logits)[np.arange(4), np.arange(4)])
    assert float(cross_exit_infonce(as_t["q"], as_t["p"], dim).detach()) == pytest.approx(want, rel=1e-5)
    # alignment: 1 - cos, and MSE of the normalised vectors (= 2 - 2 cos)
    cos = (qn * tn).sum(1)
    assert float(embedding_alignment(as_t["q"], as_t["t"], dim).detach()) == pytest.approx(np.mean(1 - cos), rel=1e-5)
    assert float(embedding_alignment(as_t["q"], as_t["t"], dim, distance="mse").detach()) == pytest.approx(
        np.mean(((qn - tn) ** 2).sum(1)), rel=1e-5)
    # score distillation: KL(softmax(tau cos(t, p)) || softmax(tau cos(q, p))), batchmean
    lt, ls = _log_softmax(20 * tn @ pn.T), _log_softmax(20 * qn @ pn.T)
    want = np.mean((np.exp(lt) * (lt - ls)).sum(1))
    got = score_distillation(as_t["q"], as_t["t"], as_t["p"], dim)
    assert float(got.detach()) == pytest.approx(want, rel=1e-4, abs=1e-7)
    got.backward()  # the teacher and the documents are targets: no gradient reaches them
    assert as_t["q"].grad is not None and as_t["p"].grad is None
    with pytest.raises(ValueError, match="distance 'l1'"):
        embedding_alignment(as_t["q"], as_t["t"], distance="l1")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["head", "lora"])
def test_posthoc_alignment_leaves_the_full_exit_bit_identical(tiny_model: MatryoshkaEncoder, method: str) -> None:
    before = {n: tiny_model.encode(TEXTS, layer=n) for n in (1, 2, 4)}
    weights = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    probe = tiny_model.encode(TEXTS, layer=2, input_type="query")
    result = align_query_exits(tiny_model, TEXTS, AlignConfig(exits=[1, 2], method=method, rank=2, epochs=10,
                                                               batch_size=4, lr=1e-3))
    assert result.stats["loss_last"] < result.stats["loss_first"]
    for n in (1, 2, 4):  # documents (the shared path) and the full exit: bit for bit
        assert np.array_equal(tiny_model.encode(TEXTS, layer=n), before[n])
    assert np.array_equal(tiny_model.encode(TEXTS, layer=4, input_type="query"), before[4])
    assert all(torch.equal(v, weights[k]) for k, v in tiny_model.backbone.state_dict().items())
    moved = tiny_model.encode(TEXTS, layer=2, input_type="query")
    assert not np.allclose(moved, probe)  # the query path was trained
    full = before[4]
    gain = np.mean(np.sum(moved * full, 1)) - np.mean(np.sum(probe * full, 1))
    assert gain > 0  # and moved towards the full exit
    assert tiny_model.document_space == {"document_exit": 4, "query_exits": [1, 2, 4], "query_path": "own"}
    params = result.stats["parameters"]
    assert params[1]["head"] == 32 * 32 + 32 and (params[2]["lora"] > params[1]["lora"] > 0) == (method == "lora")


def test_query_path_round_trips_and_truncates(tiny_model: MatryoshkaEncoder, tmp_path: Path) -> None:
    align_query_exits(tiny_model, TEXTS, AlignConfig(exits=[1, 3], method="lora", rank=2, epochs=1, batch_size=4))
    want = tiny_model.encode(TEXTS, layer=3, input_type="query")
    tiny_model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "matryoshka2d.json").read_text())
    assert meta["query_exits"] == {"layers": [1, 3], "document_exit": 4, "rank": 2, "alpha": 2.0, "head": "linear"}
    back = MatryoshkaEncoder.from_pretrained(tmp_path / "m")
    assert np.array_equal(back.encode(TEXTS, layer=3, input_type="query"), want)
    assert back.document_space["query_exits"] == [1, 3, 4]
    assert back.truncate(4).document_space == back.document_space
    assert back.truncate(3).query_path is None  # the document exit is gone: nothing to be aligned to
    (tmp_path / "m" / "query_exits.safetensors").unlink()
    with pytest.raises(ValueError, match="query_exits.safetensors \\(missing\\)"):  # the manifest sees it first
        MatryoshkaEncoder.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="query_exits.safetensors is missing"):
        MatryoshkaEncoder.from_pretrained(tmp_path / "m")


def test_separate_baseline_is_a_standalone_query_encoder(tiny_model: MatryoshkaEncoder) -> None:
    result = align_query_exits(tiny_model, TEXTS * 2, AlignConfig(exits=[2], method="separate", epochs=2,
                                                                   batch_size=4, lr=1e-3))
    sub = result.separate[2]
    assert sub.num_layers == 2 and tiny_model.query_path is None
    assert result.stats["loss_last"] < result.stats["loss_first"]
    assert result.stats["parameters"][2] == sum(p.numel() for p in sub.parameters())


def test_search_with_one_full_exit_index(tiny_model: MatryoshkaEncoder) -> None:
    data = BeirSet("toy", [f"d{i}" for i in range(6)], TEXTS[:6], ["q1", "q2"], TEXTS[6:],
                   {"q1": {"d0": 1}, "q2": {"d1": 1, "d5": 1}})
    result = evaluate_query_exits(tiny_model, {"toy": data}, dims=[16, 32])
    assert result.layers == [1, 2, 3, 4] and result.metadata["doc_layer"] == 4
    docs = tiny_model.encode(data.doc_texts, layer=4, normalize=False)
    given = evaluate_query_exits(tiny_model, {"toy": data}, dims=[16, 32], doc_vectors={"toy": docs})
    assert [r["ndcg@10"] for r in given.records] == pytest.approx([r["ndcg@10"] for r in result.records])
    assert given.metadata["timings"]["toy"]["doc_vectors_given"] is True
    with pytest.raises(ValueError, match="doc_vectors"):
        evaluate_query_exits(tiny_model, {"toy": data}, dims=[16], doc_vectors={"toy": docs[:3]})


def test_align_cli_and_its_bad_inputs(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "aligned"
    args = ["align", str(tiny_dir), "--texts", str(texts), "--exits", "1,2", "--method", "head", "--epochs", "2"]
    assert main([*args, "--output", str(out)]) == 0
    assert "aligned query exits [1, 2] to exit 4 (head)" in capsys.readouterr().out
    assert MatryoshkaEncoder.from_pretrained(out).document_space["query_path"] == "own"
    assert main(["info", str(out)]) == 0
    assert "built at layer 4 can be searched with queries at layers [1, 2, 4]" in capsys.readouterr().out
    for kind in ("query", "document"):
        assert main(["encode", str(out), "--layer", "2", "--input", str(texts), "--input-type", kind,
                     "--output", str(tmp_path / f"{kind}.npy")]) == 2  # the file ends with a blank line
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for kind in ("query", "document"):
        assert main(["encode", str(out), "--layer", "2", "--input", str(lines), "--input-type", kind,
                     "--output", str(tmp_path / f"{kind}.npy")]) == 0
    aligned = MatryoshkaEncoder.from_pretrained(out)
    np.testing.assert_allclose(np.load(tmp_path / "query.npy"), aligned.encode(TEXTS, layer=2, input_type="query"),
                               atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "document.npy"), aligned.encode(TEXTS, layer=2), atol=1e-6)
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("", encoding="utf-8")
    blank.write_text("\n  \n", encoding="utf-8")
    cases = [
        (["align", str(tiny_dir), "--exits", "1", "--output", str(tmp_path / "a")], "--texts"),
        ([*args[:3], str(empty), *args[4:], "--output", str(tmp_path / "b")], "empty"),
        ([*args[:3], str(blank), *args[4:], "--output", str(tmp_path / "c")], "blank"),
        ([*args[:5], "9", *args[6:], "--output", str(tmp_path / "d")], "9"),
        ([*args[:5], "4", *args[6:], "--output", str(tmp_path / "e")], "below the document exit 4"),
        ([*args, "--output", str(out)], "exists"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in err


# ----------------------------------------------------------------------------------- shared-space training
LEFT = ["a man is playing the guitar", "the dog runs in the park", "two children are eating food",
        "a woman reads a book"]
RIGHT = ["a man plays the guitar", "a dog is running outside", "the children eat", "the old house is red"]


def test_document_space_terms_of_the_objective(tiny_model: MatryoshkaEncoder) -> None:
    from matryoshka2d.losses.base import InBatchNegativesLoss
    from matryoshka2d.losses.objective import TwoDMatryoshkaLoss

    batch = [tiny_model.tokenize(LEFT), tiny_model.tokenize(RIGHT)]
    extra = tiny_model.tokenize(TEXTS)
    loss = TwoDMatryoshkaLoss(tiny_model, InBatchNegativesLoss(), strategy="dense", dims=[16, 32],
                              n_dims_per_step="all", cross_weight=1.0, align_weight=2.0, score_kd_weight=0.5)
    calls = [0]
    tiny_model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = loss(batch, unlabelled=extra)
    assert calls[0] == 3  # one pass per column, one for the unlabelled batch
    parts = {k: float(v) for k, v in out.items() if k != "loss"}
    assert set(parts) == {"loss/last", "loss/prior", "loss/kl", "loss/cross", "loss/align", "loss/score_kd"}
    assert float(out["loss"]) == pytest.approx(sum(parts.values()), rel=1e-5)
    # the parts are the formulas, averaged over the step's shallow exits (n, d) and scaled by the layer count
    with torch.no_grad():
        cols = [tiny_model(f, layers=[1, 2, 3, 4]) for f in [*batch, extra]]
    exits = [(n, d) for n in (1, 2, 3) for d in (32, 16)]
    cross = np.mean([float(cross_exit_infonce(cols[0][n], cols[1][4], d)) for n, d in exits]) * 3
    kd = np.mean([float(score_distillation(cols[0][n], cols[0][4], cols[1][4], d)) for n, d in exits]) * 3
    align = np.mean([float(embedding_alignment(c[n], c[4], d)) for c in cols for n, d in exits]) * 3
    assert parts["loss/cross"] == pytest.approx(cross, rel=1e-4)
    assert parts["loss/score_kd"] == pytest.approx(0.5 * kd, rel=1e-4, abs=1e-6)
    assert parts["loss/align"] == pytest.approx(2.0 * align, rel=1e-4)
    assert loss.config_dict()["cross_weight"] == 1.0
    with pytest.raises(ValueError, match="trains none"):
        TwoDMatryoshkaLoss(tiny_model, InBatchNegativesLoss(), strategy="mrl", align_weight=1.0)


def test_training_with_unlabelled_texts_records_the_document_space(tiny_dir: Path, tmp_path: Path) -> None:
    from matryoshka2d.training.config import load_config
    from matryoshka2d.training.loop import train

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "\n".join(f"{a}\t{b}" for a, b in zip(LEFT * 4, RIGHT * 4,
                                                                                     strict=True)) + "\n")
    texts = tmp_path / "unlabelled.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    base = {"model.name": str(tiny_dir), "data.source": str(pairs), "loss.name": "ibn", "run.output_dir":
            str(tmp_path / "run"), "train.batch_size": 4, "train.max_steps": 3, "run.progress_bar": False,
            "objective.strategy": "dense", "model.exit_heads": "linear", "objective.cross_weight": 1.0,
            "objective.align_weight": 1.0, "data.unlabelled": [str(texts)], "data.unlabelled_batch_size": 3}
    result = train(load_config(overrides=base))
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert all("loss/cross" in r and "loss/align" in r for r in log if "loss" in r)
    model = MatryoshkaEncoder.from_pretrained(result.final_dir)
    assert model.document_space == {"document_exit": 4, "query_exits": [1, 2, 3, 4], "query_path": "shared"}
    assert model.metadata["document_space"]["trained_by"] == ["cross", "align"]
    with pytest.raises(ValueError, match="objective.align_weight is 0"):
        train(load_config(overrides={**base, "objective.align_weight": 0.0, "run.output_dir": str(tmp_path / "b")}))


def test_query_encoder_is_the_query_exit_as_a_standalone_model(tiny_model: MatryoshkaEncoder) -> None:
    tiny_model.add_exit_heads("linear", layers=[2])
    with torch.no_grad():
        tiny_model.exit_heads["2"].weight.mul_(0.5)
    align_query_exits(tiny_model, TEXTS, AlignConfig(exits=[2], method="lora", rank=2, epochs=4, batch_size=4))
    want = tiny_model.encode(TEXTS, layer=2, input_type="query")
    sub = tiny_model.query_encoder(2)
    assert sub.num_layers == 2 and sub.query_path is None
    np.testing.assert_allclose(sub.encode(TEXTS, layer=2), want, atol=2e-6)
    with pytest.raises(ValueError, match="layer 3 has no query path"):
        tiny_model.query_encoder(3)


def test_eval_cli_scores_query_exits_against_one_index(tiny_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    beir = tmp_path / "scifact"  # a named set read from --data-dir
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.tsv").write_text("doc_id\ttitle\ttext\n" + "".join(f"d{i}\t\t{t}\n" for i, t in
                                                                        enumerate(TEXTS[:6])), encoding="utf-8")
    (beir / "queries.tsv").write_text("query_id\ttext\nq1\twho plays music\nq2\ta dog in the park\n", encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query_id\tdoc_id\tscore\nq1\td5\t1\nq2\td0\t1\n", encoding="utf-8")
    out = tmp_path / "r.json"
    argv = ["eval", str(tiny_dir), "--sets", "scifact", "--data-dir", str(tmp_path), "--dims", "16,32"]
    assert main([*argv, "--doc-layer", "4", "--output", str(out)]) == 0
    assert "against one index of documents at layer 4" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["metadata"]["doc_layer"] == 4 and saved["metadata"]["input_type"] == "query"
    assert {r["layer"] for r in saved["results"]} == {1, 2, 3, 4}
    assert main([*argv, "--doc-layer", "7"]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err


def test_search_refuses_unaligned_query_exits_and_takes_aligned_ones(tiny_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    corpus, queries = tmp_path / "corpus.tsv", tmp_path / "queries.tsv"
    corpus.write_text("doc_id\ttitle\ttext\n" + "".join(f"d{i}\t\t{t}\n" for i, t in enumerate(TEXTS[:6])),
                      encoding="utf-8")
    queries.write_text("query_id\ttext\nq1\twho plays music\nq2\ta dog in the park\n", encoding="utf-8")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    idx, aligned = tmp_path / "idx", tmp_path / "aligned"
    assert main(["index", str(tiny_dir), "--corpus", str(corpus), "--layer", "4", "--dims", "8,32",
                 "--output", str(idx)]) == 0
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["document_exit"] == 4 and manifest["document_space"]["query_exits"] == [4]
    assert main(["align", str(tiny_dir), "--texts", str(texts), "--exits", "1,2", "--method", "lora", "--rank", "2",
                 "--output", str(aligned)]) == 0
    search = ["search", str(idx), "--queries", str(queries), "--shortlist-dim", "8", "--top", "3"]
    capsys.readouterr()
    assert main([*search, "--query-layer", "2", "--output", str(tmp_path / "a.trec")]) == 2  # the index's model
    err = capsys.readouterr().err.strip()
    assert "--query-layer 2 is not aligned" in err and "aligned to layer 4 are [4]" in err
    assert len(err.splitlines()) == 1
    # the aligned model searches the unchanged index (same document path: its fingerprint is accepted)
    assert main([*search, "--model", str(aligned), "--query-layer", "2", "--output", str(tmp_path / "b.trec")]) == 0
    assert main([*search, "--model", str(aligned), "--query-layer", "3", "--output", str(tmp_path / "c.trec")]) == 2
    assert "aligned to layer 4 are [1, 2, 4]" in capsys.readouterr().err
    assert main([*search, "--model", str(aligned), "--query-layer", "2", "--input-type", "document",
                 "--output", str(tmp_path / "d.trec")]) == 2  # the shared path of layer 2 is not aligned
    assert main([*search, "--model", str(aligned), "--query-layer", "3", "--force",
                 "--output", str(tmp_path / "e.trec")]) == 0


def test_index_from_encoded_shards_equals_encoding_again(tiny_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from matryoshka2d.search.index import CascadeIndex

    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("doc_id\ttitle\ttext\n" + "".join(f"d{i}\t\t{t}\n" for i, t in enumerate(TEXTS)),
                      encoding="utf-8")
    enc = tmp_path / "enc"
    assert main(["encode", str(tiny_dir), "--input", str(corpus), "--id-column", "doc_id", "--exits", "2:16,4:32",
                 "--output", str(enc)]) == 0
    assert main(["index", str(tiny_dir), "--encoded", str(enc), "--dims", "8,32", "--output", str(tmp_path / "a")]) == 0
    assert main(["index", str(tiny_dir), "--corpus", str(corpus), "--layer", "4", "--dims", "8,32",
                 "--output", str(tmp_path / "b")]) == 0
    a, b = CascadeIndex.load(tmp_path / "a"), CascadeIndex.load(tmp_path / "b")
    assert a.ids == b.ids and a.layer == b.layer == 4
    assert a.manifest["encoded_from"] == {"layer": 4, "dim": 32, "model": str(tiny_dir), "rows": len(TEXTS)}
    queries = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    from matryoshka2d.search.cascade import cascade_search

    ra = cascade_search(a, queries, shortlist_dim=8, k=5, rerank_dim=32, top=3)[1]
    rb = cascade_search(b, queries, shortlist_dim=8, k=5, rerank_dim=32, top=3)[1]
    assert np.array_equal(ra, rb)
    capsys.readouterr()
    bad = [(["--encoded", str(enc), "--layer", "3"], "no exit layer 3"),
           (["--encoded", str(enc), "--layer", "2", "--dims", "8,32"], "beyond the 16 dims")]
    for extra, needle in bad:
        argv = ["index", str(tiny_dir), "--dims", "8,16", *extra, "--output", str(tmp_path / "x")]
        if "--dims" in extra:
            argv = ["index", str(tiny_dir), *extra, "--output", str(tmp_path / "x")]
        assert main(argv) == 2
        assert needle in capsys.readouterr().err
    shard = next((enc / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"damaged!")
    assert main(["index", str(tiny_dir), "--encoded", str(enc), "--dims", "8,32", "--output", str(tmp_path / "y")]) == 2
    assert "differs from manifest.json" in capsys.readouterr().err


def test_small_mode_encode_refuses_blank_lines(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 35's weak pattern: blank .txt lines were embedded silently as rows of the .npy."""
    src = tmp_path / "in.txt"
    src.write_text("hello\n   \nworld\n", encoding="utf-8")
    assert main(["encode", str(tiny_dir), "--input", str(src), "--output", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{src}:2: the text is blank" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.npy").exists()
