"""The depth-sorted forward pass: same vectors as ``model.forward`` at each exit, blocks run only as deep as needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matryoshka2d import MatryoshkaEncoder
from matryoshka2d.encoder.architectures import get_blocks
from matryoshka2d.encoder.mixed_depth import forward_mixed_depth
from matryoshka2d.encoder.tokenization import tokenize_unpadded
from tests.conftest import SENTENCES


def _features(model: MatryoshkaEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    tokens = tokenize_unpadded(model.tokenizer, texts, model.max_seq_length)
    return {k: torch.from_numpy(v) for k, v in tokens.collate(np.arange(len(texts))).items()}


@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet"])
@pytest.mark.parametrize("heads", [False, True])
def test_mixed_depth_equals_forward_at_each_exit(tiny_dirs, arch: str, heads: bool) -> None:
    model = MatryoshkaEncoder.from_pretrained(tiny_dirs[arch], pooling="mean").eval()
    if heads:
        model.add_exit_heads("linear")
        torch.manual_seed(1)
        for head in model.exit_heads.values():  # non-identity heads, so a missed head would show
            torch.nn.init.normal_(head.weight, std=0.3)
    texts = SENTENCES * 2
    exits = [1, 4, 2, 4, 3, 1, 2, 3, 4, 1, 1, 2, 3, 2]
    features = _features(model, texts)
    with torch.inference_mode():
        full = model(features, layers=[1, 2, 3, 4])
    got = forward_mixed_depth(model, features, exits)
    assert got.shape == (len(texts), model.hidden_size)
    for i, n in enumerate(exits):
        torch.testing.assert_close(got[i], full[n][i], atol=1e-5, rtol=1e-5)


def test_each_row_runs_only_blocks_up_to_its_exit(tiny_model: MatryoshkaEncoder) -> None:
    texts = SENTENCES
    exits = [2, 4, 1, 2, 4, 3, 1]
    calls: list[tuple[int, int]] = []  # (block number, rows it ran on)
    hooks = [block.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, args[0].shape[0])))
             for n, block in enumerate(get_blocks(tiny_model.backbone), start=1)]
    try:
        forward_mixed_depth(tiny_model, _features(tiny_model, texts), exits)
    finally:
        for h in hooks:
            h.remove()
    # block n runs once, on exactly the rows whose exit is n or deeper
    assert calls == [(n, sum(e >= n for e in exits)) for n in range(1, 5)]
    assert sum(rows for _, rows in calls) == sum(exits)


def test_shallow_only_batch_stops_early(tiny_model: MatryoshkaEncoder) -> None:
    calls: list[int] = []
    hooks = [block.register_forward_hook(lambda mod, args, out, n=n: calls.append(n))
             for n, block in enumerate(get_blocks(tiny_model.backbone), start=1)]
    try:
        out = forward_mixed_depth(tiny_model, _features(tiny_model, ["a dog", "the cat"]), [2, 1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [1, 2]
    expected = tiny_model.encode(["a dog"], layer=2, normalize=False)[0]
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_bad_exits_are_rejected(tiny_model: MatryoshkaEncoder) -> None:
    features = _features(tiny_model, ["a dog", "the cat"])
    with pytest.raises(ValueError, match="one exit per row"):
        forward_mixed_depth(tiny_model, features, [1])
    with pytest.raises(ValueError, match=r"layers 1\.\.4"):
        forward_mixed_depth(tiny_model, features, [1, 5])


def test_on_exit_reports_each_row_once_as_it_leaves(tiny_model: MatryoshkaEncoder) -> None:
    exits = [3, 1, 4, 1, 2, 4, 3]
    seen: list[tuple[list[int], torch.Tensor]] = []
    out = forward_mixed_depth(tiny_model, _features(tiny_model, SENTENCES), exits,
                              on_exit=lambda rows, pooled: seen.append((rows.tolist(), pooled.clone())))
    # shallow rows leave first, each row exactly once, with the vector the pass returns
    assert [sorted(rows) for rows, _ in seen] == [[1, 3], [4], [0, 6], [2, 5]]
    for rows, pooled in seen:
        torch.testing.assert_close(pooled, out[rows])
