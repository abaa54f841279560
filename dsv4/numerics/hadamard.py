"""Walsh-Hadamard transform in Sylvester (natural) order."""

from __future__ import annotations

import torch

__all__ = ["hadamard_transform"]


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``y = (x @ H_n.T) * scale`` along the last dim, ``H_n`` the Sylvester matrix
    (``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``), n a power of two.

    Same semantics as ``fast_hadamard_transform.hadamard_transform``: computed in float32
    by the iterative butterfly, scaled, then cast back to ``x.dtype``. ``scale`` defaults
    to ``1/sqrt(n)`` (orthonormal, so applying it twice is the identity).
    """
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_transform: last dimension must be a power of two, got {n}")
    if scale is None:
        scale = n ** -0.5
    y = x.to(torch.float32).reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)
        a = pairs[:, :, 0, :]
        b = pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
        h *= 2
    return (y * scale).reshape(x.shape).to(x.dtype)
