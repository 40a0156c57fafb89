"""Types and eager references shared by several op modules.

- :data:`Alpha`: the fade weight every fading op takes (``fade_in``, ``blend``, ``fade_reals``),
  also used by the networks and the training step; :func:`alpha_tensor` turns it into the 0-dim
  tensor the Triton and native kernels load, and :func:`alpha_grad` is the weight's gradient in
  those ops' autograd.
- :func:`upsample2x_reference` and :func:`downsample2x_reference`: ProGAN's 2x resampling (the
  official ``upscale2d`` and ``downscale2d``). The fade-in references build on them, and so does
  ``conv_act`` (its ``upsample`` option); ``downsample2x_reference`` is also the ``downsample2x``
  op's reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: A fade weight: a Python float, or a 0-dim tensor (a device tensor for CUDA graphs, where the
#: value changes in place between replays).
Alpha = float | torch.Tensor


def alpha_tensor(alpha: Alpha, like: torch.Tensor) -> torch.Tensor:
    """``alpha`` (a Python number or a 0-dim tensor) as a 0-dim float32 tensor on ``like``'s device,
    for kernels that load it from memory (so a CUDA graph can change it in place between replays).
    A float64 ``like`` gets float64 so gradcheck sees exact arithmetic."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a number or a 0-dim tensor, got shape {tuple(alpha.shape)}")
        return alpha.to(device=like.device, dtype=dtype)
    return torch.full((), float(alpha), device=like.device, dtype=dtype)


def alpha_grad(grad: torch.Tensor, b_minus_a: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The gradient wrt ``alpha`` of ``lerp(a, b, alpha)``: ``sum(grad * (b - a))``, accumulated in
    float32 (float64 for float64), as a 0-dim tensor of ``alpha``'s dtype. Torch ops, so it stays
    differentiable."""
    acc = torch.promote_types(torch.float64 if grad.dtype == torch.float64 else torch.float32, alpha.dtype)
    return (grad.to(acc) * b_minus_a.to(acc)).sum().to(alpha.dtype)


def upsample2x_reference(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsample of an ``[N, C, H, W]`` tensor."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def downsample2x_reference(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool of an ``[N, C, H, W]`` tensor (an odd last row/column is ignored)."""
    return F.avg_pool2d(x, kernel_size=2)
