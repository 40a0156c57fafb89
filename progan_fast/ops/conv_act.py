"""Equalized-learning-rate convolution + bias + leaky-ReLU (ProGAN paper, section 4.1).

Weights are stored ~N(0, 1) and scaled at run time by ``scale = gain / sqrt(fan_in)``, so Adam's
per-parameter step size acts on every layer at the same dynamic range. One call computes a whole
layer: ``y = conv(x, w) * scale + b``, then leaky-ReLU(0.2) when ``activation``.

Options that later fused kernels compute without writing intermediate tensors, given here so the
networks call one op per layer and a fused backend slots in without touching them:

- ``upsample=True``: nearest 2x upsample of ``x`` first (the generator block's first conv);
- ``pixel_norm=True``: pixelwise normalization of the result (every generator conv).

A 1x1 kernel on an ``[N, C, 1, 1]`` input is a dense layer; the networks use it that way.
Padding is "same" (``k // 2``) for odd kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from .fade_in import upsample2x_reference
from .pixel_norm import reference as pixel_norm_reference

NEGATIVE_SLOPE = 0.2


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    activation: bool = True,
    upsample: bool = False,
    pixel_norm: bool = False,
) -> torch.Tensor:
    """Eager reference. Scaling the (small) weight instead of the (large) output is the same math
    and what the official code does."""
    if upsample:
        x = upsample2x_reference(x)
    y = F.conv2d(x, weight * scale, bias, padding=weight.shape[-1] // 2)
    if activation:
        y = F.leaky_relu(y, NEGATIVE_SLOPE)
    if pixel_norm:
        y = pixel_norm_reference(y)
    return y


IMPLEMENTATIONS = {"reference": reference}


def conv2d_bias_lrelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    activation: bool = True,
    upsample: bool = False,
    pixel_norm: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``x`` ``[N, Cin, H, W]``, ``weight`` ``[Cout, Cin, k, k]`` (k odd), ``bias`` ``[Cout]`` or None."""
    if weight.shape[-1] % 2 == 0 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"conv2d_bias_lrelu: kernel must be square and odd, got {tuple(weight.shape)}")
    impl = _backend.resolve("conv2d_bias_lrelu", IMPLEMENTATIONS, backend)
    return impl(x, weight, bias, scale, activation, upsample, pixel_norm)
