"""Pixelwise feature vector normalization (ProGAN paper, section 4.2).

``b[n, :, h, w] = a[n, :, h, w] / sqrt(mean_c(a[n, c, h, w]**2) + eps)``: every pixel's feature
vector is scaled to unit root-mean-square, which keeps the generator's signal magnitudes from
escalating. ``eps`` is 1e-8 as in the official code.
"""

from __future__ import annotations

import torch

from . import _backend


def reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eager reference: the normalization is over dim 1 (channels) of an ``[N, C, ...]`` tensor."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


IMPLEMENTATIONS = {"reference": reference}


def pixel_norm(x: torch.Tensor, eps: float = 1e-8, backend: str | None = None) -> torch.Tensor:
    return _backend.resolve("pixel_norm", IMPLEMENTATIONS, backend)(x, eps)
