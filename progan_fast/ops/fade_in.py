"""Fade-in between resolutions (ProGAN paper, section 3 and figure 2).

While a new resolution fades in, the generator's image is ``up2x(toRGB_prev(x_prev))`` blended
with the new block's ``toRGB(x)`` by ``alpha`` (0 -> old path only, 1 -> new path only); the
discriminator blends ``fromRGB_prev(down2x(img))`` with the new block's output the same way, and
real images are faded between resolutions as the official code does, so D never sees a sharper
real than fake.

``alpha`` is a Python float or a 0-dim tensor (a device tensor for CUDA graphs, where the value
changes in place between replays). The blend is ``torch.lerp``: the same ``a + (b - a) * alpha``,
but exact at both ends (alpha 0 gives ``a`` and alpha 1 gives ``b`` bit for bit), which the plain
formula is not in floating point.

Three ops live here because they are one family (G's upsample-blend, D's blend, and the 2x
average pool D uses for its input image and after each block):

- :func:`fade_in` ``(low, high, alpha)``: nearest-upsample ``low`` 2x, blend with ``high``.
- :func:`blend` ``(old, new, alpha)``: same-resolution blend (D side).
- :func:`downsample2x` ``(x)``: 2x2 average pool (the official ``downscale2d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend

Alpha = float | torch.Tensor


def upsample2x_reference(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsample of an ``[N, C, H, W]`` tensor."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def fade_in_reference(low: torch.Tensor, high: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return torch.lerp(upsample2x_reference(low), high, alpha)


def blend_reference(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return torch.lerp(old, new, alpha)


def downsample2x_reference(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2)


FADE_IN_IMPLEMENTATIONS = {"reference": fade_in_reference}
BLEND_IMPLEMENTATIONS = {"reference": blend_reference}
DOWNSAMPLE_IMPLEMENTATIONS = {"reference": downsample2x_reference}


def fade_in(low: torch.Tensor, high: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``low`` ``[N, C, H, W]``, ``high`` ``[N, C, 2H, 2W]`` -> ``lerp(up2x(low), high, alpha)``."""
    if high.shape[-2:] != (2 * low.shape[-2], 2 * low.shape[-1]):
        raise ValueError(f"fade_in: high {tuple(high.shape)} is not twice low {tuple(low.shape)}")
    return _backend.resolve("fade_in", FADE_IN_IMPLEMENTATIONS, backend)(low, high, alpha)


def blend(old: torch.Tensor, new: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``lerp(old, new, alpha)`` for two tensors of the same shape (the discriminator's fade)."""
    return _backend.resolve("blend", BLEND_IMPLEMENTATIONS, backend)(old, new, alpha)


def downsample2x(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """2x2 average pool of an ``[N, C, H, W]`` tensor with even H and W."""
    return _backend.resolve("downsample2x", DOWNSAMPLE_IMPLEMENTATIONS, backend)(x)
