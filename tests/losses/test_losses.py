"""Base losses on hand-made tensors: values, orderings, the AnglE sum, bad input."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from matryoshka2d.losses.base import (
    BASE_LOSSES,
    AnglELoss,
    AngleLoss,
    CoSENTLoss,
    InBatchNegativesLoss,
    angle_difference,
    build_base_loss,
    pair_cosine,
)


def unit_pairs(cosines: list[float]) -> list[torch.Tensor]:
    """Pairs (x_i, y_i) of 2-d vectors with cos(x_i, y_i) = cosines[i] (and lengths != 1)."""
    angles = torch.tensor([math.acos(c) for c in cosines])
    x = torch.tensor([[3.0, 0.0]]).repeat(len(cosines), 1)
    y = 0.5 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return [x, y]


def complex_vec(values: list[complex]) -> torch.Tensor:
    """A real vector holding complex numbers as (real parts, imaginary parts)."""
    return torch.tensor([v.real for v in values] + [v.imag for v in values])


# ----------------------------------------------------------------------------------------- CoSENT
def test_cosent_exact_value_and_ordering():
    loss = CoSENTLoss()
    scores = torch.tensor([5.0, 1.0])
    ordered = loss(unit_pairs([0.9, 0.1]), scores)
    reversed_ = loss(unit_pairs([0.1, 0.9]), scores)
    assert ordered.item() == pytest.approx(math.log1p(math.exp(20 * (0.1 - 0.9))), rel=1e-4)
    assert reversed_.item() == pytest.approx(math.log1p(math.exp(20 * (0.9 - 0.1))), rel=1e-4)
    assert ordered < reversed_


def test_cosent_many_pairs_perfect_beats_shuffled_and_only_order_of_scores_matters():
    torch.manual_seed(0)
    scores = torch.tensor([0.0, 1.0, 2.5, 3.0, 4.2, 5.0])
    perfect = unit_pairs([-0.5, -0.1, 0.2, 0.4, 0.7, 0.95])
    shuffled = unit_pairs([0.7, -0.1, 0.95, -0.5, 0.2, 0.4])
    loss = CoSENTLoss()
    assert loss(perfect, scores) < loss(shuffled, scores)
    assert loss(perfect, scores).item() == pytest.approx(loss(perfect, scores * 7 - 3).item())


def test_cosent_equal_scores_give_zero_and_gradients_are_finite():
    x, y = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    assert CoSENTLoss()([x, y], torch.ones(4)).item() == 0.0
    out = CoSENTLoss(scale=5.0)([x, y], torch.arange(4.0))
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cosent_bad_input():
    pair = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(ValueError, match="cosent needs graded scores .* use the 'ibn' loss"):
        CoSENTLoss()(pair, None)
    with pytest.raises(ValueError, match="got 2 scores for a batch of 3 pairs"):
        CoSENTLoss()(pair, torch.ones(2))
    with pytest.raises(ValueError, match="scores contain NaN or inf"):
        CoSENTLoss()(pair, torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="cosent needs exactly 2 input columns, got 3"):
        CoSENTLoss()([*pair, pair[0]], torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        CoSENTLoss()([pair[0], torch.randn(2, 4)], torch.ones(3))
    with pytest.raises(ValueError, match="scale must be a finite number > 0, got -1"):
        CoSENTLoss(scale=-1)


# ----------------------------------------------------------------------------------------- in-batch negatives
def test_ibn_exact_value_on_orthonormal_pairs():
    batch = 4
    eye = torch.eye(batch)
    loss = InBatchNegativesLoss()([eye * 2, eye * 0.3], None)  # norms do not matter (cosines)
    assert loss.item() == pytest.approx(math.log1p((batch - 1) * math.exp(-20)), abs=1e-7)


def test_ibn_identical_pairs_beat_random_pairs():
    torch.manual_seed(0)
    anchors = torch.randn(16, 32)
    identical = InBatchNegativesLoss()([anchors, anchors.clone()], None)
    random_ = InBatchNegativesLoss()([anchors, torch.randn(16, 32)], None)
    assert identical < 0.1 < math.log(16) / 2 < random_


def test_ibn_hard_negatives_are_negatives():
    batch = 3
    eye = torch.eye(batch)
    # the hard negative of each row equals its positive: the target shares the top logit with it
    loss = InBatchNegativesLoss()([eye, eye, eye], None)
    assert loss.item() == pytest.approx(math.log(2 + (2 * batch - 2) * math.exp(-20)), rel=1e-5)
    far = InBatchNegativesLoss()([eye, eye, -eye], None)
    assert far < loss


def test_ibn_batch_of_one():
    with pytest.raises(ValueError, match=r"batch of 1 pair and no hard negatives.*batch size >= 2"):
        InBatchNegativesLoss()([torch.randn(1, 8), torch.randn(1, 8)], None)
    # with a hard negative there is something to contrast with
    assert torch.isfinite(InBatchNegativesLoss()([torch.randn(1, 8)] * 3, None))


def test_ibn_rejects_scores():
    with pytest.raises(ValueError, match="ibn .* unscored .* for scored pairs use 'cosent' or 'angle'"):
        InBatchNegativesLoss()([torch.randn(3, 8), torch.randn(3, 8)], torch.ones(3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per = x.shape[0] // world
        xs = x[rank * per : (rank + 1) * per].clone().requires_grad_(True)
        ys = y[rank * per : (rank + 1) * per].clone().requires_grad_(True)
        loss = InBatchNegativesLoss()([xs, ys], None)
        loss.backward()
        out[rank] = (loss.item(), xs.grad.clone(), ys.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ibn_gathers_negatives_across_processes():
    """Two gloo processes with 4 rows each see all 8 candidates: the mean loss equals one batch of 8."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, y, out), nprocs=2, join=True)
    xf, yf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    full = InBatchNegativesLoss()([xf, yf], None)
    full.backward()
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    # DDP averages gradients over processes: the average of the per-process grads is the full-batch grad
    gx = torch.cat([out[0][1], out[1][1]])
    gy = torch.cat([out[0][2], out[1][2]])
    assert torch.allclose(gx / 2, xf.grad, atol=1e-6)
    assert torch.allclose(gy / 2, yf.grad, atol=1e-6)


# ----------------------------------------------------------------------------------------- Angle
def test_angle_difference_on_hand_made_complex_vectors():
    phi = 0.7
    u = complex_vec([1 + 0j, 0 + 1j])
    rot = complex(math.cos(phi), math.sin(phi))
    v = complex_vec([1 * rot, 1j * rot])
    both = torch.stack([u, u, u, u])
    others = torch.stack([u, v, -u, 5 * v])
    assert angle_difference(both, others).tolist() == pytest.approx([0.0, phi, math.pi, phi], abs=1e-5)
    # the real-valued cosine cannot see this: u and i*u are orthogonal as real vectors, a quarter turn here
    iu = complex_vec([0 + 1j, -1 + 0j])
    assert pair_cosine(u[None], iu[None]).item() == pytest.approx(0.0, abs=1e-6)
    assert angle_difference(u[None], iu[None]).item() == pytest.approx(math.pi / 2, abs=1e-5)


def test_angle_degenerate_inner_product_has_finite_gradient():
    u = complex_vec([1 + 0j, 0j])[None].requires_grad_(True)
    w = complex_vec([0j, 1 + 0j])[None]  # <u, w> = 0: no defined angle
    out = angle_difference(u, w)
    out.sum().backward()
    assert out.item() == pytest.approx(math.pi / 2)
    assert torch.isfinite(u.grad).all()


def test_angle_loss_exact_value_and_ordering():
    u = complex_vec([1 + 0j, 1 + 0j])
    small, large = 0.2, 1.1
    v_small = complex_vec([complex(math.cos(small), math.sin(small))] * 2)
    v_large = complex_vec([complex(math.cos(large), math.sin(large))] * 2)
    x = torch.stack([u, u])
    scores = torch.tensor([3.0, 1.0])
    ordered = AngleLoss()([x, torch.stack([v_small, v_large])], scores)
    reversed_ = AngleLoss()([x, torch.stack([v_large, v_small])], scores)
    assert ordered.item() == pytest.approx(math.log1p(math.exp(20 * (small - large))), rel=1e-4)
    assert reversed_.item() == pytest.approx(math.log1p(math.exp(20 * (large - small))), rel=1e-4)


def test_angle_needs_even_dims_and_scores():
    with pytest.raises(ValueError, match="dim must be even, got 3"):
        AngleLoss()([torch.randn(2, 3), torch.randn(2, 3)], torch.ones(2))
    with pytest.raises(ValueError, match="angle needs graded scores"):
        AngleLoss()([torch.randn(2, 4), torch.randn(2, 4)], None)
    assert AngleLoss.requires_even_dim and AngleLoss.requires_scores


# ----------------------------------------------------------------------------------------- AnglE
def test_angle_total_is_the_weighted_sum_on_scored_pairs(caplog):
    torch.manual_seed(1)
    pair, scores = [torch.randn(6, 8), torch.randn(6, 8)], torch.rand(6) * 5
    total = AnglELoss(w_cos=0.5, w_ibn=3.0, w_angle=2.0, cos_scale=10.0, angle_scale=5.0)
    with caplog.at_level("WARNING"):
        value = total(pair, scores)
    expected = 0.5 * CoSENTLoss(10.0)(pair, scores) + 2.0 * AngleLoss(5.0)(pair, scores)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "ibn term (w_ibn=3) is skipped on scored pairs" in caplog.text
    assert set(total.parts(pair, scores)) == {"cos", "angle"}


def test_angle_total_on_triplets_ranks_positive_above_negative():
    torch.manual_seed(2)
    a, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    total = AnglELoss(w_cos=1.0, w_ibn=2.0, w_angle=0.5)
    parts = total.parts([a, p, n], None)
    pairs = [torch.cat([a, a]), torch.cat([p, n])]
    binary = torch.cat([torch.ones(5), torch.zeros(5)])
    assert parts["ibn"].item() == pytest.approx(2.0 * InBatchNegativesLoss()([a, p, n], None).item(), rel=1e-6)
    assert parts["cos"].item() == pytest.approx(CoSENTLoss()(pairs, binary).item(), rel=1e-6)
    assert parts["angle"].item() == pytest.approx(0.5 * AngleLoss()(pairs, binary).item(), rel=1e-6)
    assert total([a, p, n], None).item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    # unscored plain pairs: only the ibn term applies
    assert set(total.parts([a, p], None)) == {"ibn"}


def test_angle_total_bad_weights():
    with pytest.raises(ValueError, match="w_cos, w_ibn and w_angle are all 0"):
        AnglELoss(0, 0, 0)
    with pytest.raises(ValueError, match="w_ibn must be a finite number >= 0, got -1"):
        AnglELoss(w_ibn=-1)
    only_ibn = AnglELoss(w_cos=0, w_ibn=1, w_angle=0)
    assert not only_ibn.requires_even_dim
    with pytest.raises(ValueError, match="no term applies .* scored pairs need w_cos or w_angle > 0"):
        only_ibn([torch.randn(3, 4), torch.randn(3, 4)], torch.ones(3))


# ----------------------------------------------------------------------------------------- registry
def test_build_base_loss():
    assert BASE_LOSSES == ("cosent", "ibn", "angle", "angle-total")
    assert isinstance(build_base_loss("cosent", scale=10.0), CoSENTLoss)
    assert isinstance(build_base_loss("infonce"), InBatchNegativesLoss)
    loss = build_base_loss("angle-total", w_cos=0.0, w_ibn=20.0, w_angle=1.0)
    assert loss.config_dict()["w_ibn"] == 20.0 and loss.name == "angle-total"
    with pytest.raises(ValueError, match="unknown base loss 'mnrl'; choose one of cosent, ibn, angle, angle-total"):
        build_base_loss("mnrl")
    with pytest.raises(ValueError, match="base loss 'cosent' does not take tau; it takes scale"):
        build_base_loss("cosent", tau=20)


def test_losses_accept_half_precision_embeddings():
    x, y = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    for loss, labels in ((CoSENTLoss(), torch.arange(4.0)), (AngleLoss(), torch.arange(4.0)),
                         (InBatchNegativesLoss(), None)):
        out = loss([x, y], labels)
        assert out.dtype == torch.float32 and torch.isfinite(out)


def test_ibn_matches_cross_entropy_definition():
    torch.manual_seed(3)
    a, p, n = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    cand = F.normalize(torch.cat([p, n]), dim=-1)
    logits = 20 * F.normalize(a, dim=-1) @ cand.T
    manual = -(logits.log_softmax(-1)[torch.arange(4), torch.arange(4)]).mean()
    assert InBatchNegativesLoss()([a, p, n], None).item() == pytest.approx(manual.item(), rel=1e-5)
