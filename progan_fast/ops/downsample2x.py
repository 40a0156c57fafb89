"""2x2 average pool (the official ``downscale2d``): the discriminator's input image at the
previous resolution during a fade, and the downsampling after each of its blocks.

``[N, C, H, W]`` -> ``[N, C, H // 2, W // 2]``; an odd last row/column is ignored, as
``avg_pool2d`` does.

Layouts: ``x`` dense NCHW or dense NHWC (channels-last); the output, and ``dx`` in the backward,
come out in the layout of the op's input (``x``; the incoming gradient for the backward), with no
copy (``ops/common.py``). Any other strides are copied to NCHW first. A gradient that is dense in
both layouts (``C == 1``, or a 1x1 output) counts as NCHW, so then ``dx`` is NCHW.

Backends:

- ``reference``: ``avg_pool2d`` (:func:`.common.downsample2x_reference`, which ``fade_reals``
  shares).
- ``triton``: the custom ops ``progan_fast::downsample2x`` and ``progan_fast::downsample2x_backward``,
  one pass each (kernels in ``ops/triton/downsample2x.py``).
- ``cpu`` / ``cuda``: the native library's ``progan_fast_native::`` twins, same autograd.

Autograd: the op sits inside the gradient penalty, so its second derivative matters:
``downsample2x_backward`` (a nearest upsample of ``grad / 4``) is linear in the incoming gradient
and its adjoint is ``downsample2x`` itself.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import _backend, _native
from . import triton as triton_backend
from .common import dense_layout, downsample2x_reference, is_channels_last, memory_format
from .triton import downsample2x as kernels
from .triton import elementwise

# ----- reference ----------------------------------------------------------------------------------

reference = downsample2x_reference  # fade_reals' reference uses it too, so it lives in common.py


# ----- custom ops: Triton's progan_fast:: ops, and fake tensors for the native ones --------------

@torch.library.custom_op("progan_fast::downsample2x", mutates_args=(), device_types=("cpu", "cuda"))
def _downsample2x_op(x: torch.Tensor) -> torch.Tensor:
    triton_backend.check_device("downsample2x", x)
    elementwise.check_size("downsample2x", x)
    x, channels_last = dense_layout(x)
    n, c, h, w = x.shape
    y = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, device=x.device, memory_format=memory_format(channels_last))
    kernels.downsample2x_forward(x, y, channels_last)
    return y


@_downsample2x_op.register_fake
def _downsample2x_op_fake(x):
    n, c, h, w = x.shape
    return torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, device=x.device,
                       memory_format=memory_format(is_channels_last(x)))


@torch.library.custom_op("progan_fast::downsample2x_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _downsample2x_backward_op(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grad`` ``[N, C, H // 2, W // 2]`` -> ``dx`` ``[N, C, H, W]``: nearest 2x upsample of ``grad / 4``,
    in ``grad``'s layout."""
    triton_backend.check_device("downsample2x_backward", grad)
    n, c, _, _ = grad.shape
    triton_backend.check_index_count("downsample2x_backward", n * c * height * width,
                                     f"the gradient {(n, c, height, width)}")  # before allocating it
    grad, channels_last = dense_layout(grad)
    dx = torch.empty(n, c, height, width, dtype=grad.dtype, device=grad.device,
                     memory_format=memory_format(channels_last))
    kernels.downsample2x_backward(grad, dx, channels_last)
    return dx


@_downsample2x_backward_op.register_fake
def _downsample2x_backward_op_fake(grad, height, width):
    return torch.empty(grad.shape[0], grad.shape[1], height, width, dtype=grad.dtype, device=grad.device,
                       memory_format=memory_format(is_channels_last(grad)))


TRITON = SimpleNamespace(downsample2x=_downsample2x_op, downsample2x_backward=_downsample2x_backward_op)

if _native.available():
    NATIVE = SimpleNamespace(downsample2x=_native.ops.downsample2x.default,
                             downsample2x_backward=_native.ops.downsample2x_backward.default)
    torch.library.register_fake(NATIVE.downsample2x, _downsample2x_op_fake)
    torch.library.register_fake(NATIVE.downsample2x_backward, _downsample2x_backward_op_fake)


# ----- autograd (first and second order, shared by the Triton and the native ops) ---------------

def _downsample2x_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.hw = (x.shape[2], x.shape[3])


def _downsample2x_backward(k, ctx, grad):
    return k.downsample2x_backward(grad, *ctx.hw)


def _downsample2x_backward_backward(k, ctx, gg):
    # The backward is linear in grad and its adjoint is the forward: a 2x2 average pool again.
    return k.downsample2x(gg), None, None


def _register_autograd(k) -> None:
    """First and second derivatives of one pair of ops (Triton's or the native library's)."""
    reg = torch.library.register_autograd
    reg(k.downsample2x, functools.partial(_downsample2x_backward, k), setup_context=_downsample2x_setup)
    reg(k.downsample2x_backward, functools.partial(_downsample2x_backward_backward, k),
        setup_context=lambda ctx, inputs, output: None)


_register_autograd(TRITON)
if _native.available():
    _register_autograd(NATIVE)


# ----- backends and the public function -----------------------------------------------------------

def triton_impl(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"downsample2x: needs [N, C, H, W], got {tuple(x.shape)}")
    return _downsample2x_op(x)


def native_impl(x: torch.Tensor) -> torch.Tensor:
    return NATIVE.downsample2x(x)


IMPLEMENTATIONS = {"reference": reference}
if triton_backend.available():
    IMPLEMENTATIONS["triton"] = triton_impl
_native.register(IMPLEMENTATIONS, native_impl)


def downsample2x(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """2x2 average pool of an ``[N, C, H, W]`` tensor with even H and W."""
    return _backend.dispatch("downsample2x", IMPLEMENTATIONS, backend, x)
