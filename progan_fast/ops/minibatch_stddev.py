"""Minibatch standard deviation layer (ProGAN paper, section 3; official ``minibatch_stddev_layer``).

The batch is split into groups; for each group the stddev of every feature over the group's
samples is averaged over channels and pixels into one number, which is appended to each sample
of that group as a constant extra feature map. It lets D see the variety of a batch, which
discourages mode collapse.

Grouping follows the official code: the batch is reshaped to ``[G, M, C, H, W]`` (G = group
size, M = N / G groups), so sample ``i`` belongs to group ``i mod M``.
The official code requires N to be divisible by the group size. Here the group shrinks to the
largest size <= ``group_size`` that divides N (so batch 6 uses groups of 3, a prime batch groups of
1, whose stddev is ``sqrt(eps)``): a user's batch never fails in D.
"""

from __future__ import annotations

import torch

from . import _backend


def effective_group_size(batch: int, group_size: int = 4) -> int:
    """The largest group size <= ``group_size`` that divides ``batch``."""
    g = max(1, min(group_size, batch))
    while batch % g:
        g -= 1
    return g


def reference(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Eager reference. Statistics are computed in float32 (or float64 for float64 input)."""
    n, c, h, w = x.shape
    g = effective_group_size(n, group_size)
    y = x.reshape(g, n // g, c, h, w)
    y = y.to(torch.promote_types(x.dtype, torch.float32))
    y = y - y.mean(dim=0)                        # [G, M, C, H, W] deviation from the group mean
    y = (y.square().mean(dim=0) + eps).sqrt()    # [M, C, H, W] stddev over the group
    y = y.mean(dim=(1, 2, 3))                    # [M] averaged over features and pixels
    y = y.to(x.dtype).reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


IMPLEMENTATIONS = {"reference": reference}


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, backend: str | None = None) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` -> ``[N, C + 1, H, W]`` with the group stddev as the last channel."""
    return _backend.resolve("minibatch_stddev", IMPLEMENTATIONS, backend)(x, group_size)
