"""Types and eager references shared by several op modules.

- :data:`Alpha`: the fade weight every fading op takes (``fade_in``, ``blend``, ``fade_reals``),
  also used by the networks and the training step; :func:`alpha_tensor` turns it into the 0-dim
  tensor the Triton and native kernels load, and :func:`alpha_grad` is the weight's gradient in
  those ops' autograd.
- :func:`upsample2x_reference` and :func:`downsample2x_reference`: ProGAN's 2x resampling (the
  official ``upscale2d`` and ``downscale2d``). The fade-in references build on them, and so does
  ``conv_act`` (its ``upsample`` option); ``downsample2x_reference`` is also the ``downsample2x``
  op's reference.
- :func:`fp32_conv_uses_tf32`: the one fp32 precision policy of every convolution (see there).
- :func:`is_channels_last`, :func:`dense_layout`, :func:`memory_format`, :func:`ncp_strides`: the
  two activation layouts every op's kernels read and write (see "Memory formats" below).

Memory formats. Every op takes 4-d activations in either of two dense layouts, NCHW
(``torch.contiguous_format``) or NHWC (``torch.channels_last``), and returns its outputs in the layout
of its (first) input, with no copy on the way: the kernels index through the strides of an
``[N, C, P]`` view (``P = H * W``), ``(C*P, P, 1)`` for NCHW and ``(P*C, 1, C)`` for NHWC. Any other
strides (a slice, a transpose) are copied to NCHW first, as before. A tensor that is dense in both
layouts (``C == 1`` or ``H * W == 1``) counts as NCHW: both index the same memory the same way.
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


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a dense NHWC (channels-last) tensor that is not also dense NCHW."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def dense_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(x, channels_last)``: ``x`` itself when it is dense NCHW or dense NHWC, else an NCHW copy;
    and which of the two layouts it is in. Every op's wrapper calls this on its first activation
    and brings the others to the same layout (:func:`to_layout`)."""
    if x.is_contiguous():
        return x, False
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the given layout: itself when already there (no copy), else a copy."""
    fmt = memory_format(channels_last and x.dim() == 4)
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


def ncp_strides(c: int, p: int, channels_last: bool) -> tuple[int, int, int]:
    """Element strides ``(sample, channel, pixel)`` of the ``[N, C, P]`` view of a dense tensor."""
    return (p * c, 1, c) if channels_last else (c * p, p, 1)


def upsample2x_reference(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsample of an ``[N, C, H, W]`` tensor, in ``x``'s layout: a dense NHWC
    ``x`` gives an NHWC result (the same reshape/expand on its ``[N, H, W, C]`` view, so the same
    values bit for bit and the same double-differentiable graph); anything else gives NCHW."""
    n, c, h, w = x.shape
    if is_channels_last(x):
        xt = x.permute(0, 2, 3, 1)  # [N, H, W, C], contiguous
        up = xt.reshape(n, h, 1, w, 1, c).expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)
        return up.permute(0, 3, 1, 2)
    return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def downsample2x_reference(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool of an ``[N, C, H, W]`` tensor (an odd last row/column is ignored), in
    ``x``'s layout: ATen's ``avg_pool2d`` keeps channels-last (forward, backward and double
    backward), with the same values as on the NCHW copy."""
    return F.avg_pool2d(x, kernel_size=2)


def fp32_conv_uses_tf32() -> bool:
    """Whether float32 convolutions on CUDA may use TF32 tensor cores: PyTorch's own switch for
    cuDNN, which every backend follows, forward, backward and double backward alike.

    The reference and the native backends run ATen convolutions, so cuDNN applies the switch to
    them; the Triton forward kernel reads it here and picks a TF32 or an exact (IEEE) dot; the
    Triton backward and double backward are ATen convolutions again. So one setting decides every
    fp32 conv of a run: ``torch.backends.cudnn.conv.fp32_precision = "ieee"`` (or the legacy
    ``torch.backends.cudnn.allow_tf32 = False``) makes every conv exact, ``"tf32"`` (PyTorch's
    default) lets every one use TF32. "none" defers, as in PyTorch, to
    ``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision``, and means
    exact when every level says "none". CPU convolutions are always exact.
    """
    for level in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
        value = level.fp32_precision
        if value != "none":
            return value == "tf32"
    return False
