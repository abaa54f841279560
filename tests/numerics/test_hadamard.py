"""Tests for dsv4.numerics.hadamard."""

import math

import pytest
import torch

from dsv4.numerics import hadamard_transform


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_matches_sylvester_matrix(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g)
    h = _sylvester(n)
    ref = (x.double() @ h.T) / math.sqrt(n)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-6)
    # integer inputs with scale 1 are exact
    xi = torch.randint(-50, 50, (4, n), generator=g).float()
    assert torch.equal(hadamard_transform(xi, scale=1.0).double(), xi.double() @ h.T)
    assert torch.equal(hadamard_transform(xi, scale=0.5).double(), (xi.double() @ h.T) * 0.5)


def test_explicit_small_matrix_and_identity_rows():
    assert torch.equal(hadamard_transform(torch.eye(4), 1.0), _sylvester(4).float())
    assert _sylvester(2).tolist() == [[1, 1], [1, -1]]


def test_orthonormal_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, generator=g)
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert torch.allclose(hadamard_transform(y), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_bf16_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 128, generator=g).bfloat16()
    y = hadamard_transform(x)
    assert y.dtype == torch.bfloat16
    ref = hadamard_transform(x.float())  # same float32 computation, then a single rounding
    assert torch.equal(y, ref.bfloat16())
    assert torch.allclose(y.float(), (x.double() @ _sylvester(128).T / math.sqrt(128)).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [0, 3, 12, 96])
def test_non_power_of_two_rejected(n):
    with pytest.raises(ValueError, match=str(n)):
        hadamard_transform(torch.zeros(2, n))
