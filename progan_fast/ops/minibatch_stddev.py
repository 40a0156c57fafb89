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

Backends:

- ``reference``: eager PyTorch.
- ``triton``: the custom ops ``progan_fast::minibatch_stddev`` and
  ``progan_fast::minibatch_stddev_backward`` (kernels in ``ops/triton/minibatch_stddev.py``: two
  kernels each way, deterministic per-256-feature partial sums, no atomics).
- ``cpu`` / ``cuda``: the native library's ``progan_fast_native::`` twins, the same algorithm
  (kernels/cuda/minibatch_stddev.cu, kernels/cpu/minibatch_stddev.cpp), same autograd.

Memory formats (see :mod:`progan_fast.ops.common`): ``x`` dense NCHW or dense NHWC (channels-last);
the output comes out in the same layout, with no copy of ``x`` on the way (other strides are copied
to NCHW first). In NHWC the output's extra channel is interleaved: each pixel holds its C + 1 values
contiguously, the statistic last. The kernels read ``x`` in memory order -- the statistic is a sum
over all features, whose order does not matter (only its rounding may differ between the two
layouts) -- so in NHWC the feature reduction reads contiguous channels; feature ``k = p * C + c`` of
a sample lands at ``k + p`` in its output row (``k`` in NCHW), the statistic at ``p * (C + 1) + C``
(``C * P + p`` in NCHW). The backward reads the output gradient through the same offsets and writes
``dx`` in ``x``'s layout; a gradient in the other layout is brought to ``x``'s first (a copy of the
gradient, not of an activation the op saved). The eager reference keeps the layout too: for NHWC
``x`` it concatenates the NHWC views along their last dimension (a plain ``torch.cat`` along C
would return NCHW, since the stat channel's strides do not suggest channels-last).

Autograd: the op sits inside the WGAN-GP gradient penalty, so the backward op has its own
autograd: its derivative (the second derivative of the layer) comes from differentiating the
reference's first derivative in eager PyTorch (tiny at 4x4, where D uses the layer).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import _backend, _native
from .common import dense_layout, is_channels_last, memory_format, to_layout
from . import triton as triton_backend
from .triton import minibatch_stddev as kernels

# ----- reference ----------------------------------------------------------------------------------


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
    if is_channels_last(x):
        # torch.cat([x, y], 1) returns channels-last only when y's strides suggest it too, which an
        # [N, 1, H, W] (ambiguous, or expanded) need not: concatenate the NHWC views along their last
        # dimension instead, a dense [N, H, W, C + 1], seen as NCHW-shaped channels-last.
        return torch.cat([x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)], dim=3).permute(0, 3, 1, 2)
    return torch.cat([x, y], dim=1)


# ----- custom ops: Triton's progan_fast:: ops, and fake tensors for the native ones --------------

def _dims(x: torch.Tensor, group_size: int):
    if x.dim() != 4:
        raise ValueError(f"minibatch_stddev expects an [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    g = effective_group_size(n, group_size)
    # Offsets within a sample's output row ((C + 1) * H * W) and its feature index are int32.
    triton_backend.check_index_count("minibatch_stddev", (c + 1) * h * w, f"one output row of {tuple(x.shape)}")
    return n, c, h * w, g, n // g


@torch.library.custom_op("progan_fast::minibatch_stddev", mutates_args=(), device_types=("cpu", "cuda"))
def _mbstd_op(x: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    triton_backend.check_device("minibatch_stddev", x)
    n, c, p, g, _ = _dims(x, group_size)
    x, channels_last = dense_layout(x)
    out = _new_output(x, n, c, channels_last)
    if out.numel() == 0:
        return out
    if c * p == 0:  # no features: the mean over none is NaN, as in the reference
        return out.fill_(float("nan"))
    kernels.minibatch_stddev_forward(x, out, g, eps, channels_last)
    return out


def _new_output(x: torch.Tensor, n: int, c: int, channels_last: bool) -> torch.Tensor:
    """The uninitialized ``[N, C + 1, H, W]`` output in ``x``'s layout."""
    return torch.empty((n, c + 1, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(channels_last))


@_mbstd_op.register_fake
def _mbstd_op_fake(x, group_size, eps):
    n, c, _, _, _ = _dims(x, group_size)
    return _new_output(x, n, c, is_channels_last(x))  # what dense_layout decides, without the copy


@torch.library.custom_op("progan_fast::minibatch_stddev_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _mbstd_backward_op(grad: torch.Tensor, x: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    triton_backend.check_device("minibatch_stddev_backward", grad, x)
    n, c, _, g, _ = _dims(x, group_size)
    if grad.shape != (n, c + 1, x.shape[2], x.shape[3]):
        raise ValueError(
            f"minibatch_stddev_backward: grad shape {tuple(grad.shape)} does not match x {tuple(x.shape)}")
    x, channels_last = dense_layout(x)
    grad = to_layout(grad, channels_last)
    dx = torch.empty_like(x, memory_format=memory_format(channels_last))
    if dx.numel() == 0:
        return dx
    kernels.minibatch_stddev_backward(grad, x, dx, g, eps, channels_last)
    return dx


@_mbstd_backward_op.register_fake
def _mbstd_backward_op_fake(grad, x, group_size, eps):
    return torch.empty_like(x, memory_format=memory_format(is_channels_last(x)))


TRITON = SimpleNamespace(minibatch_stddev=_mbstd_op, minibatch_stddev_backward=_mbstd_backward_op)

if _native.available():
    NATIVE = SimpleNamespace(minibatch_stddev=_native.ops.minibatch_stddev.default,
                             minibatch_stddev_backward=_native.ops.minibatch_stddev_backward.default)
    torch.library.register_fake(NATIVE.minibatch_stddev, _mbstd_op_fake)
    torch.library.register_fake(NATIVE.minibatch_stddev_backward, _mbstd_backward_op_fake)


# ----- autograd (first and second order, shared by the Triton and the native ops) ---------------

def _setup(ctx, inputs, output):
    x, group_size, eps = inputs
    ctx.save_for_backward(x)
    ctx.group_size, ctx.eps = group_size, eps


def _backward(k, ctx, grad):
    (x,) = ctx.saved_tensors
    return k.minibatch_stddev_backward(grad, x, ctx.group_size, ctx.eps), None, None


def _setup_bwd(ctx, inputs, output):
    grad, x, group_size, eps = inputs
    ctx.save_for_backward(grad, x)
    ctx.group_size, ctx.eps = group_size, eps


def _backward_of_backward(ctx, ggrad_x):
    # d/d(grad, x) of <ggrad_x, dx(grad, x)>: differentiate the reference's first derivative.
    grad, x = ctx.saved_tensors
    with torch.enable_grad():
        grad_, x_ = grad.detach().requires_grad_(), x.detach().requires_grad_()
        (dx,) = torch.autograd.grad(reference(x_, ctx.group_size, ctx.eps), x_, grad_, create_graph=True)
        g_grad, g_x = torch.autograd.grad(dx, (grad_, x_), ggrad_x, allow_unused=True)
    if g_grad is None:
        g_grad = torch.zeros_like(grad)
    if g_x is None:
        g_x = torch.zeros_like(x)
    return g_grad, g_x, None, None


def _register_autograd(k) -> None:
    """First and second derivatives of one set of ops (Triton's or the native library's)."""
    torch.library.register_autograd(k.minibatch_stddev, functools.partial(_backward, k), setup_context=_setup)
    torch.library.register_autograd(k.minibatch_stddev_backward, _backward_of_backward, setup_context=_setup_bwd)


_register_autograd(TRITON)
if _native.available():
    _register_autograd(NATIVE)


# ----- backends and the public function -----------------------------------------------------------

def triton_impl(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    return _mbstd_op(x, group_size, eps)


def native_impl(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    return NATIVE.minibatch_stddev(x, group_size, eps)


IMPLEMENTATIONS = {"reference": reference}
if triton_backend.available():
    IMPLEMENTATIONS["triton"] = triton_impl
_native.register(IMPLEMENTATIONS, native_impl)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, backend: str | None = None) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` -> ``[N, C + 1, H, W]`` with the group stddev as the last channel."""
    return _backend.dispatch("minibatch_stddev", IMPLEMENTATIONS, backend, x, group_size)
