"""The one truncation (prefix, then L2-normalise) and the one cosine, on numpy and torch alike."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from matryoshka2d.truncation import cosine, truncate


def test_numpy_truncate_is_prefix_then_unit_norm_float32_contiguous():
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float64)
    x[2] = 0.0
    out = truncate(x, 8)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(out[[0, 1, 3, 4]], axis=1), 1.0, rtol=1e-6)
    assert not out[2].any()  # a zero row stays zero, no NaN
    np.testing.assert_allclose(out[0], x[0, :8] / np.linalg.norm(x[0, :8]), rtol=1e-6)
    np.testing.assert_allclose(truncate(x), truncate(x, 16))


def test_torch_truncate_equals_functional_normalize_bit_for_bit():
    x = torch.randn(4, 32)
    assert torch.equal(truncate(x, 12), F.normalize(x[:, :12], dim=-1))
    assert torch.equal(truncate(x), F.normalize(x, dim=-1))
    np.testing.assert_allclose(truncate(x.numpy(), 12), truncate(x, 12).numpy(), rtol=1e-6)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine(a, b), [1.0, -1.0, 0.0])
    assert cosine(a, b).dtype == np.float64
