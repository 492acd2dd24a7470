"""The 2D Matryoshka objective on the tiny model: one pass per column, sampling, formulas, gradients, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from matryoshka2d.encoder import architectures
from matryoshka2d.encoder.model import matryoshka_dims
from matryoshka2d.losses.base import CoSENTLoss, InBatchNegativesLoss, build_base_loss
from matryoshka2d.losses.objective import TwoDMatryoshkaLoss, pca_target
from matryoshka2d.losses.options import default_starbucks_pairs, depth_weight
from matryoshka2d.vocab import STRATEGIES

LEFT = ["a man is playing the guitar", "the dog runs in the park", "two children are eating food",
        "a woman reads a book", "the cat sits on the car", "people walk near the river"]
RIGHT = ["a man plays the guitar", "a dog is running outside", "the children eat", "the old house is red",
         "a cat sits on a blue car", "a group of people walk by the water"]
SCORES = torch.tensor([4.8, 3.5, 3.9, 0.2, 4.1, 3.0])


@pytest.fixture()
def batch(tiny_model):
    return [tiny_model.tokenize(LEFT), tiny_model.tokenize(RIGHT)]


def count_backbone_calls(model) -> list[int]:
    calls = [0]
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def grads_of_blocks(model) -> list[float]:
    return [sum(float(p.grad.abs().sum()) for p in b.parameters() if p.grad is not None)
            for b in architectures.get_blocks(model.backbone)]


def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Reference KL(softmax(t) || softmax(s)) per row, averaged, in float64."""
    p_t, log_s = F.softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)
    return (p_t * (p_t.log() - log_s)).sum(-1).mean()


# ----------------------------------------------------------------------------------------- one pass
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_backbone_forward_per_column_per_step(tiny_model, batch, strategy):
    model = tiny_model.truncate(2) if strategy == "separate" else tiny_model
    loss = TwoDMatryoshkaLoss(model, CoSENTLoss(), strategy=strategy, n_layers_per_step="all",
                              n_dims_per_step="all")
    calls = count_backbone_calls(model)
    for step in range(3):
        out = loss(batch, SCORES)
        out["loss"].backward()
        assert calls[0] == 2 * (step + 1), f"{strategy}: {calls[0]} backbone calls after {step + 1} steps"


def test_one_backbone_forward_per_column_with_triplets(tiny_model):
    cols = [tiny_model.tokenize(LEFT), tiny_model.tokenize(RIGHT), tiny_model.tokenize(RIGHT[::-1])]
    loss = TwoDMatryoshkaLoss(tiny_model, InBatchNegativesLoss())
    calls = count_backbone_calls(tiny_model)
    loss(cols)["loss"].backward()
    assert calls[0] == 3


# ----------------------------------------------------------------------------------------- sampling
def test_seeded_sequence_is_reproducible_and_resumable(tiny_model, batch):
    a = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), seed=7)
    b = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), seed=7)
    c = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), seed=8)
    seq_a = [a.sample() for _ in range(30)]
    assert seq_a == [b.sample() for _ in range(30)]
    assert seq_a != [c.sample() for _ in range(30)]
    state = a.sampler_state()
    after = [a.sample() for _ in range(10)]
    a.set_sampler_state(state)
    assert [a.sample() for _ in range(10)] == after
    # forward draws from the same sampler and records what it drew
    b.set_sampler_state(state)
    b(batch, SCORES)
    assert b.last_sample == after[0]


def test_layer_zero_never_sampled_and_last_shallow_layer_is(tiny_model):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), seed=0)
    draws = [loss.sample() for _ in range(300)]
    layers = {n for s in draws for n in s["layers"]}
    dims = {d for s in draws for d in s["dims"]}
    assert layers == {1, 2, 3}  # N = 4: shallow exits 1..N-1, never 0, N-1 included
    assert dims == {8, 16}  # dims below D = 32
    assert all(len(s["layers"]) == 1 and len(s["dims"]) == 1 for s in draws)


def test_several_layers_and_dims_per_step(tiny_model):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), n_layers_per_step=2, n_dims_per_step=-1)
    for _ in range(20):
        s = loss.sample()
        assert len(set(s["layers"])) == 2 and set(s["layers"]) <= {1, 2, 3} and s["dims"] == [8, 16]
    assert loss.n_layers_per_step == 2 and loss.n_dims_per_step == 2
    pool = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), layer_pool=[2], dims=[16, 32])
    assert pool.sample() == {"layers": [2], "dims": [16]}


def test_sampler_state_bad_input(tiny_model):
    with pytest.raises(ValueError, match="sampler state must be the uint8 tensor from sampler_state"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss()).set_sampler_state([1, 2])


# ----------------------------------------------------------------------------------------- formulas
def test_2dmse_formula(tiny_model, batch):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), seed=3, kl_temperature=0.5)
    out = loss(batch, SCORES)
    (n,), (d,) = loss.last_sample["layers"], loss.last_sample["dims"]
    emb = [tiny_model(f, layers=(n, 4)) for f in batch]

    def base(layer, dim):
        return CoSENTLoss()([e[layer][:, :dim] for e in emb], SCORES).item()

    assert out["loss/last"].item() == pytest.approx(base(4, 32) + base(4, d), rel=1e-5)
    assert out["loss/prior"].item() == pytest.approx(base(n, 32) + base(n, d), rel=1e-5)
    expected_kl = sum(kl(e[4] / 0.5, e[n] / 0.5).item() for e in emb) / 2
    # a KL of near-equal softmaxes is a float32 difference of close logs: its rounding is absolute (~1e-7)
    assert out["loss/kl"].item() == pytest.approx(expected_kl, rel=1e-4, abs=2e-7)
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("loss/last", "loss/prior", "loss/kl")))
    assert out["loss"].requires_grad and not out["loss/last"].requires_grad


def test_weights_and_depth_weighting(tiny_model, batch):
    kwargs = dict(layer_pool=[2], seed=0)
    plain = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), **kwargs)(batch, SCORES)
    linear = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), depth_weighting="linear", **kwargs)(batch, SCORES)
    log = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), depth_weighting="log", **kwargs)(batch, SCORES)
    weighted = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), last_weight=2.0, prior_weight=0.5, kl_weight=3.0,
                                  **kwargs)(batch, SCORES)
    prior = plain["loss/prior"].item()
    assert linear["loss/prior"].item() == pytest.approx(prior / 2, rel=1e-5)
    assert log["loss/prior"].item() == pytest.approx(prior / (1 + math.log(2)), rel=1e-5)
    assert weighted["loss/last"].item() == pytest.approx(2 * plain["loss/last"].item(), rel=1e-5)
    assert weighted["loss/prior"].item() == pytest.approx(0.5 * prior, rel=1e-5)
    assert weighted["loss/kl"].item() == pytest.approx(3 * plain["loss/kl"].item(), rel=1e-5)
    assert [depth_weight(n, "none") for n in (1, 2, 4)] == [1.0, 1.0, 1.0]
    assert [depth_weight(n, "linear") for n in (1, 2, 4)] == [1.0, 0.5, 0.25]
    assert depth_weight(1, "log") == 1.0 and depth_weight(4, "log") == pytest.approx(1 / (1 + math.log(4)))
    assert [depth_weight(n, "rising", 6) for n in range(1, 6)] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3])
    assert sum(depth_weight(n, "rising", 12) for n in range(1, 12)) == pytest.approx(11)  # mean 1 over 1..N-1
    with pytest.raises(ValueError, match="'rising' needs the model's depth N"):
        depth_weight(2, "rising")
    rising = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), depth_weighting="rising", **kwargs)(batch, SCORES)
    assert rising["loss/prior"].item() == pytest.approx(prior * 2 * 2 / tiny_model.num_layers, rel=1e-5)


def test_baseline_strategies_have_the_right_parts(tiny_model, batch):
    def parts(strategy, **kw):
        loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy=strategy, **kw)
        return loss, loss(batch, SCORES)

    _, full = parts("full")
    assert set(full) == {"loss", "loss/last"}
    mrl, out = parts("mrl")
    emb = [tiny_model(f) for f in batch]
    d = mrl.last_sample["dims"][0]
    expected = sum(CoSENTLoss()([e[4][:, :dim] for e in emb], SCORES).item() for dim in (32, d))
    assert set(out) == {"loss", "loss/last"} and out["loss"].item() == pytest.approx(expected, rel=1e-5)
    layers, out = parts("layers")
    assert set(out) == {"loss", "loss/last", "loss/prior", "loss/kl"} and layers.last_sample["dims"] == []
    assert out["loss/last"].item() == pytest.approx(full["loss"].item(), rel=1e-6)
    _, out = parts("2dmse", kl_weight=0.0)
    assert "loss/kl" not in out


def test_starbucks_formula(tiny_model, batch):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="starbucks", kl_temperature=0.1)
    assert loss.starbucks_pairs == ((2, 8), (3, 16), (4, 32))
    out = loss(batch, SCORES)
    emb = [tiny_model(f, layers=(2, 3, 4)) for f in batch]

    def base(layer, dim):
        return CoSENTLoss()([e[layer][:, :dim] for e in emb], SCORES).item()

    assert out["loss/last"].item() == pytest.approx(base(4, 32) / 3, rel=1e-5)
    assert out["loss/prior"].item() == pytest.approx((base(2, 8) + base(3, 16)) / 3, rel=1e-5)
    expected_kl = sum(kl(e[4] / 0.1, e[n] / 0.1).item() for n in (2, 3) for e in emb) / 4
    assert out["loss/kl"].item() == pytest.approx(expected_kl, rel=1e-4)
    assert loss.last_sample["pairs"] == [[2, 8], [3, 16], [4, 32]]
    custom = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="starbucks", starbucks_pairs=[(4, 32), (1, 4)])
    assert custom.starbucks_pairs == ((1, 4), (4, 32)) and custom.trained_layers == (1, 4)


def test_starbucks_default_pairs():
    assert default_starbucks_pairs(12, 768) == ((2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768))
    assert default_starbucks_pairs(4, 32) == ((2, 8), (3, 16), (4, 32))
    assert default_starbucks_pairs(6, 384) == ((1, 16), (2, 32), (3, 64), (4, 128), (5, 256), (6, 384))
    assert default_starbucks_pairs(2, 768) == ((1, 512), (2, 768))
    assert matryoshka_dims(768) == [8, 16, 32, 64, 128, 256, 512, 768]
    assert matryoshka_dims(384) == [8, 16, 32, 64, 128, 256, 384]
    assert matryoshka_dims(4) == [4]


# ----------------------------------------------------------------------------------------- gradients
def test_gradient_reaches_block_one_and_stops_at_the_exit(tiny_model, batch):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="layers", layer_pool=[1], last_weight=0.0,
                              kl_weight=0.0)
    calls = count_backbone_calls(tiny_model)
    loss(batch, SCORES)["loss"].backward()
    grads = grads_of_blocks(tiny_model)
    assert grads[0] > 0 and grads[1:] == [0.0, 0.0, 0.0]  # only block 1 ran: the exit is layer 1
    assert calls[0] == 2


@pytest.mark.parametrize("detach", [True, False])
def test_kl_teacher_detached_by_default(tiny_model, batch, detach):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="layers", layer_pool=[1], last_weight=0.0,
                              prior_weight=0.0, kl_temperature=0.05, detach_teacher=detach)
    out = loss(batch, SCORES)
    assert set(out) == {"loss", "loss/kl"} and out["loss"] > 0
    out["loss"].backward()
    grads = grads_of_blocks(tiny_model)
    assert grads[0] > 0  # the student (layer 1) always learns
    if detach:
        assert grads[1:] == [0.0, 0.0, 0.0]  # blocks 2..4 only feed the teacher
    else:
        assert all(g > 0 for g in grads[1:])


@pytest.mark.parametrize("kl_space", ["coordinates", "batch"])
def test_dense_is_2dmse_on_every_shallow_exit_with_full_weight(tiny_model, batch, kl_space):
    """'dense' = every shallow layer every step, each weighted like 2dmse's one sampled layer: the same as
    2dmse with n_layers_per_step='all' and the prior and KL weights multiplied by the number of layers."""
    dense = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="dense", seed=5, kl_space=kl_space,
                               kl_temperature=0.1)
    same = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="2dmse", n_layers_per_step="all", prior_weight=3.0,
                              kl_weight=3.0, seed=5, kl_space=kl_space, kl_temperature=0.1)
    for _ in range(3):  # the same (layer, dim) draws step after step
        a, b = dense(batch, SCORES), same(batch, SCORES)
        assert dense.last_sample == same.last_sample and dense.last_sample["layers"] == [1, 2, 3]
        for key in ("loss", "loss/last", "loss/prior", "loss/kl"):
            assert a[key].item() == pytest.approx(b[key].item(), rel=1e-5), key
    assert dense.trained_layers == (1, 2, 3, 4) and dense.config_dict()["n_layers_per_step"] == 3
    pool = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="dense", layer_pool=[2], seed=0)
    assert pool(batch, SCORES) and pool.last_sample["layers"] == [2]


def test_batch_kl_distils_in_batch_similarity_distributions(tiny_model, batch):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="layers", layer_pool=[1], last_weight=0.0,
                              prior_weight=0.0, kl_space="batch", kl_temperature=0.05)
    out = loss(batch, SCORES)
    emb = [tiny_model(f, layers=(1, 4)) for f in batch]

    def log_probs(x):  # reference: each row's softmax over its cosines to the OTHER rows, float64
        x = F.normalize(x.double(), dim=-1)
        sims = x @ x.T / 0.05
        off = ~torch.eye(len(x), dtype=torch.bool)
        return F.log_softmax(sims[off].view(len(x), -1), -1)

    t, s = (log_probs(torch.cat([e[k] for e in emb])) for k in (4, 1))
    expected = (t.exp() * (t - s)).sum(-1).mean()
    assert out["loss/kl"].item() == pytest.approx(expected.item(), rel=5e-3) and expected > 0
    out["loss"].backward()
    grads = grads_of_blocks(tiny_model)
    assert grads[0] > 0 and grads[1:] == [0.0, 0.0, 0.0]  # teacher detached: only the student's block learns
    same = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), kl_space="batch")._kl_batch(emb[0][4], emb[0][4])
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # identical distributions: zero
    assert loss.config_dict()["kl_space"] == "batch"


def hand_made_features(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """A tokenized batch built from token ids (independent of the tiny tokenizer's vocabulary)."""
    width = max(len(r) for r in rows) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row) + 2] = torch.tensor([2, *row, 3])  # [CLS] row [SEP]
        mask[i, : len(row) + 2] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def synthetic_scored_pairs() -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Patterns of two tokens; the partner has k flipped positions and the score is -k."""
    gen = torch.Generator().manual_seed(0)
    left, right, scores = [], [], []
    for i in range(8):
        a = (torch.randint(0, 2, (6,), generator=gen) * 3 + 1).tolist()  # ids 1 and 4
        k = i % 4
        left.append(a)
        right.append([5 - t if j < k else t for j, t in enumerate(a)])
        scores.append(-float(k))
    return [hand_made_features(left), hand_made_features(right)], torch.tensor(scores)


def test_training_20_steps_lowers_the_loss(tiny_model):
    batch, scores = synthetic_scored_pairs()
    torch.manual_seed(0)
    train = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), seed=0)
    every_exit = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), n_layers_per_step="all", n_dims_per_step="all",
                                    kl_weight=0.0)
    with torch.no_grad():
        before = every_exit(batch, scores)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        train(batch, scores)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = every_exit(batch, scores)
    assert after["loss"] < 0.75 * before["loss"], (before, after)
    # both the full exit and the shallow/narrow exits improved
    assert after["loss/last"] < before["loss/last"] and after["loss/prior"] < before["loss/prior"]


# ----------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"strategy": "3d"}, "unknown strategy '3d'; choose one of full, mrl, layers, 2dmse, starbucks, separate"),
    ({"depth_weighting": "exp"}, "unknown depth_weighting 'exp'; choose one of none, linear, log, rising"),
    ({"dims": [8, 64]}, r"dims has \[64\] outside the allowed range 1..32 .* embeddings have 32 dims"),
    ({"dims": []}, r"dims must be a non-empty list of integers, got \[\]"),
    ({"dims": [32], "strategy": "mrl"}, r"dims \[32\] has no dim below D=32; strategy 'mrl' samples d"),
    ({"layer_pool": [0, 1]}, r"layer_pool has \[0\] below 1 .*layer 0 is never an exit"),
    ({"layer_pool": [4]}, r"layer_pool has \[4\] outside the allowed range 1..3"),
    ({"n_layers_per_step": 0}, "n_layers_per_step must be a positive integer or 'all', got 0"),
    ({"n_layers_per_step": 4}, "n_layers_per_step must be 1..3 or 'all', got 4"),
    ({"n_layers_per_step": "some"}, "n_layers_per_step must be a positive integer or 'all', got 'some'"),
    ({"n_dims_per_step": 3}, "n_dims_per_step must be 1..2 or 'all', got 3"),
    ({"last_weight": -1.0}, "last_weight must be a finite number >= 0, got -1.0"),
    ({"prior_weight": float("nan")}, "prior_weight must be a finite number >= 0, got nan"),
    ({"kl_weight": "1"}, "kl_weight must be a finite number >= 0, got '1'"),
    ({"kl_temperature": 0}, "kl_temperature must be a finite number > 0, got 0; pass e.g. 1"),
    ({"detach_teacher": "yes"}, "detach_teacher must be True or False, got 'yes'"),
    ({"kl_space": "tokens"}, "unknown kl_space 'tokens'; choose one of coordinates, batch"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"last_weight": 0, "strategy": "full"}, "every term of strategy 'full' has weight 0"),
    ({"last_weight": 0, "prior_weight": 0, "kl_weight": 0}, "every term of strategy '2dmse' has weight 0"),
    ({"strategy": "starbucks", "starbucks_pairs": [(5, 8)]}, r"starbucks_pairs has \(5, 8\), outside layers 1..4"),
    ({"strategy": "starbucks", "starbucks_pairs": [(2, 33)]}, r"starbucks_pairs has \(2, 33\), outside .* x dims"),
    ({"strategy": "starbucks", "starbucks_pairs": [(2, 8), (2, 8)]}, "starbucks_pairs has duplicates"),
    ({"strategy": "starbucks", "starbucks_pairs": []}, "starbucks_pairs must be a non-empty list"),
    ({"strategy": "starbucks", "starbucks_pairs": [3, 8]}, "starbucks_pairs has 3, not a .layer, dim. pair"),
])
def test_bad_options(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), **kwargs)


def test_bad_model_or_loss_combinations(tiny_model):
    with pytest.raises(ValueError, match="strategy '2dmse' needs a model with at least 2 layers .* use 'full'"):
        TwoDMatryoshkaLoss(tiny_model.truncate(1), CoSENTLoss())
    TwoDMatryoshkaLoss(tiny_model.truncate(1), CoSENTLoss(), strategy="separate")  # fine
    with pytest.raises(ValueError, match="base_loss must be a matryoshka2d BaseLoss, got MSELoss"):
        TwoDMatryoshkaLoss(tiny_model, torch.nn.MSELoss())
    with pytest.raises(ValueError, match=r"base loss 'angle' needs even dims .* trains dims \[7\]"):
        TwoDMatryoshkaLoss(tiny_model, build_base_loss("angle"), dims=[7, 16])


def test_ignored_options_warn(tiny_model, caplog):
    with caplog.at_level("WARNING"):
        loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="mrl", layer_pool=[1],
                                  starbucks_pairs=[(1, 8)])
    assert "layer_pool=[1] is ignored by strategy 'mrl'" in caplog.text
    assert "starbucks_pairs=[(1, 8)] is ignored" in caplog.text
    assert loss.starbucks_pairs == ()


def test_bad_batches(tiny_model, batch):
    with pytest.raises(ValueError, match="base loss 'cosent' needs a score per pair .* use the 'ibn' loss"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss())(batch, None)
    with pytest.raises(ValueError, match="ibn .* unscored"):
        TwoDMatryoshkaLoss(tiny_model, InBatchNegativesLoss())(batch, SCORES)
    with pytest.raises(ValueError, match=r"every column must hold the same number of rows, got \[2, 6\]"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss())([batch[0], tiny_model.tokenize(RIGHT[:2])], SCORES)
    with pytest.raises(ValueError, match="got 5 labels for a batch of 6 rows"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss())(batch, SCORES[:5])
    with pytest.raises(ValueError, match="features must be a non-empty list of tokenized batches"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss())(batch[0], SCORES)


def test_config_dict_rebuilds_the_same_objective(tiny_model):
    loss = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(scale=10.0), strategy="starbucks", depth_weighting="log",
                              kl_temperature=0.3, seed=5)
    config = loss.config_dict()
    assert config["base_loss"] == {"name": "cosent", "scale": 10.0}
    assert config["starbucks_pairs"] == [[2, 8], [3, 16], [4, 32]] and config["dims"] == [8, 16, 32]
    base = config.pop("base_loss")
    again = TwoDMatryoshkaLoss(tiny_model, build_base_loss(**base), **config)
    assert again.config_dict() == loss.config_dict()
    assert loss.trained_layers == (2, 3, 4) and loss.trained_dims == (8, 16, 32)
    full = TwoDMatryoshkaLoss(tiny_model, CoSENTLoss())
    assert full.trained_layers == (1, 2, 3, 4) and full.trained_dims == (8, 16, 32)


# ----------------------------------------------------------------------------------------- ese
def reference_distance(pooled: torch.Tensor, k: int, temp: float = 1.0) -> torch.Tensor:
    """MSE(x, y) + T * KL(softmax(y/T) || softmax(x/T)) in float64, x = the first k dims, y = the PCA target."""
    target = pca_target(pooled, k).double()
    x = pooled[:, :k].double()
    return ((x - target) ** 2).mean() + temp * kl(target / temp, x / temp)


def test_ese_is_the_authors_objective(tiny_model, batch):
    """method.md section 7: L_last = B(N) + B(N, :k) + Dist(N); L_shallow = mean over n of
    [B(n, :k) + Dist(n)] / (1 + ln(1 + n)); every shallow layer every step, no shallow-to-last KL."""
    k, base = 8, CoSENTLoss()
    loss = TwoDMatryoshkaLoss(tiny_model, base, strategy="ese", compression_dim=k, kl_temperature=0.5)
    out = loss(batch, SCORES)
    assert loss.last_sample["layers"] == [1, 2, 3] and "loss/kl" not in out
    assert loss.trained_layers == (1, 2, 3, 4) and loss.trained_dims == (k, 32)
    assert loss.config_dict()["compression_dim"] == k
    with torch.no_grad():
        emb = [tiny_model(f, layers=(1, 2, 3, 4)) for f in batch]

    def dist(n: int) -> float:  # averaged over the two columns
        return sum(float(reference_distance(e[n], k, 0.5)) for e in emb) / len(emb)

    last = base([e[4] for e in emb], SCORES) + base([e[4][:, :k] for e in emb], SCORES) + dist(4)
    prior = sum((base([e[n][:, :k] for e in emb], SCORES) + dist(n)) / (1 + math.log(1 + n)) for n in (1, 2, 3)) / 3
    assert out["loss/last"].item() == pytest.approx(float(last), rel=1e-4)
    assert out["loss/prior"].item() == pytest.approx(float(prior), rel=1e-4)
    assert out["loss"].item() == pytest.approx(float(last + prior), rel=1e-4)
    out["loss"].backward()
    assert all(g > 0 for g in grads_of_blocks(tiny_model))


def test_pca_target_is_the_top_k_of_the_softmax_gram_matrix_and_leaves_the_global_rng_alone():
    h = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    target = pca_target(h, 24)  # q = min(k + 8, D) = D: the randomized SVD is exact
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(target, pca_target(h, 24))  # the same target on a rerun
    u, s, _ = torch.linalg.svd(torch.softmax(h.T @ h / math.sqrt(32), dim=-1).double())
    exact = h.double() @ (u[:, :24] * s[:24])
    torch.testing.assert_close(target.double().abs(), exact.abs(), atol=1e-4, rtol=1e-3)  # columns: up to sign
    assert target.shape == (12, 24) and not target.requires_grad


def test_ese_compression_dim_default_and_range(tiny_model):
    assert TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="ese").compression_dim == 16  # min(128, D // 2)
    with pytest.raises(ValueError, match=r"compression_dim must be in 1\.\.31 \(below the model's 32 dims\), got 32"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="ese", compression_dim=32)
    with pytest.raises(ValueError, match=r"compression_dim must be a positive integer, got 0"):
        TwoDMatryoshkaLoss(tiny_model, CoSENTLoss(), strategy="ese", compression_dim=0)
