"""Fade-in between resolutions (ProGAN paper, section 3 and figure 2): the generator's fade and the
faded real images.

While a new resolution fades in, the generator's image is ``up2x(toRGB_prev(x_prev))`` blended
with the new block's ``toRGB(x)`` by ``alpha`` (0 -> old path only, 1 -> new path only), and real
images are faded between resolutions as the official code does, so D never sees a sharper real
than fake. (D's own fade is :mod:`.blend`, its 2x average pool :mod:`.downsample2x`.)

- :func:`fade_in` ``(low, high, alpha)``: nearest-upsample ``low`` 2x, blend with ``high``.
- :func:`fade_reals` ``(x, alpha)``: ``fade_in(downsample2x(x), x, alpha)``, the real images during
  a fade (D's twin of G's fade), as one op.

Layouts: the activations are dense NCHW or dense NHWC (channels-last), and every output comes out
in the layout of the op's first input (``low``; ``x``; the incoming gradient for the backward),
with no copy: ``high`` is brought to ``low``'s layout (a copy only if it differs), and the kernels
index through that layout's strides, in NHWC with the channel innermost (``ops/common.py``). Any
other strides are copied to NCHW first; a ``low`` dense in both layouts (``C == 1`` or 1x1) counts
as NCHW.

``alpha`` is a Python float or a 0-dim tensor (a device tensor for CUDA graphs, where the value
changes in place between replays). The blend is ``torch.lerp``: the same ``a + (b - a) * alpha``,
but exact at both ends (alpha 0 gives ``a`` and alpha 1 gives ``b`` bit for bit), which the plain
formula is not in floating point.

Backends:

- ``reference``: eager PyTorch (``torch.lerp``, reshape/expand, ``avg_pool2d``).
- ``triton``: the custom ops ``progan_fast::fade_in``, ``progan_fast::fade_in_backward`` and
  ``progan_fast::fade_reals``, each one pass over memory (kernels in ``ops/triton/fade_in.py``).
  The blend is torch.lerp's formula with its fused multiply-adds, so it is exact at alpha 0 and 1
  and equals ``torch.lerp`` bit for bit in float32 wherever ``tl.fma`` rounds once (on GPUs and
  under triton 3.9's interpreter; 3.6's computes it as a multiply then an add). ``alpha`` is loaded by the kernels
  from a 0-dim float32 tensor (float64 for float64 inputs), never passed by value, so a CUDA
  graph replays with whatever the tensor holds.
- ``cpu`` / ``cuda``: the native library's ``progan_fast_native::`` twins of those ops, same
  signatures and algorithms (kernels/cuda/fade_in.cu, kernels/cpu/fade_in.cpp), same autograd.

Autograd: ``d_alpha`` is computed only when alpha requires a gradient (never in training):
``sum(g * (high - up))`` with torch ops on the saved inputs, where ``up`` is the fade_in op at
alpha 0 (exactly ``up2x(low)``), so it stays differentiable. Second derivatives use the custom
ops themselves: ``fade_in_backward`` is linear in the incoming gradient and its adjoint is
``fade_in``; ``fade_reals`` is self-adjoint (``(1 - alpha) * P + alpha * I`` with ``P`` the
symmetric block-averaging projection), so its backward is ``fade_reals`` of the gradient. Terms in
``alpha`` use torch ops as above.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import _backend, _native
from . import triton as triton_backend
from .common import (Alpha, alpha_grad, alpha_tensor, dense_layout, downsample2x_reference, is_channels_last,
                     memory_format, to_layout, upsample2x_reference)
from .triton import elementwise
from .triton import fade_in as kernels

# ----- reference ----------------------------------------------------------------------------------


def fade_in_reference(low: torch.Tensor, high: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return torch.lerp(upsample2x_reference(low), high, alpha)


def fade_reals_reference(x: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """Real images during a fade: ``lerp(up2x(down2x(x)), x, alpha)``."""
    return fade_in_reference(downsample2x_reference(x), x, alpha)


# ----- custom ops: Triton's progan_fast:: ops, and fake tensors for the native ones --------------

def _empty(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format(channels_last))


@torch.library.custom_op("progan_fast::fade_in", mutates_args=(), device_types=("cpu", "cuda"))
def _fade_in_op(low: torch.Tensor, high: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    triton_backend.check_device("fade_in", low, high, alpha)
    elementwise.check_size("fade_in", high)
    low, channels_last = dense_layout(low)
    high = to_layout(high, channels_last)
    out = _empty(high.shape, high, channels_last)
    kernels.fade_in_forward(low, high, alpha, out, channels_last)
    return out


@_fade_in_op.register_fake
def _fade_in_op_fake(low, high, alpha):
    return _empty(high.shape, high, is_channels_last(low))


@torch.library.custom_op("progan_fast::fade_in_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _fade_in_backward_op(grad: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` ``[N, C, 2H, 2W]`` -> ``(d_low [N, C, H, W], d_high)`` for a given alpha, in ``grad``'s layout."""
    triton_backend.check_device("fade_in_backward", grad, alpha)
    elementwise.check_size("fade_in_backward", grad)
    grad, channels_last = dense_layout(grad)
    n, c, h2, w2 = grad.shape
    d_low = _empty((n, c, h2 // 2, w2 // 2), grad, channels_last)
    d_high = _empty(grad.shape, grad, channels_last)
    kernels.fade_in_backward(grad, alpha, d_low, d_high, channels_last)
    return d_low, d_high


@_fade_in_backward_op.register_fake
def _fade_in_backward_op_fake(grad, alpha):
    n, c, h2, w2 = grad.shape
    channels_last = is_channels_last(grad)
    return _empty((n, c, h2 // 2, w2 // 2), grad, channels_last), _empty(grad.shape, grad, channels_last)


@torch.library.custom_op("progan_fast::fade_reals", mutates_args=(), device_types=("cpu", "cuda"))
def _fade_reals_op(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    triton_backend.check_device("fade_reals", x, alpha)
    elementwise.check_size("fade_reals", x)
    x, channels_last = dense_layout(x)
    out = _empty(x.shape, x, channels_last)
    kernels.fade_reals_forward(x, alpha, out, channels_last)
    return out


@_fade_reals_op.register_fake
def _fade_reals_op_fake(x, alpha):
    return _empty(x.shape, x, is_channels_last(x))


TRITON = SimpleNamespace(fade_in=_fade_in_op, fade_in_backward=_fade_in_backward_op, fade_reals=_fade_reals_op)

if _native.available():
    NATIVE = SimpleNamespace(fade_in=_native.ops.fade_in.default,
                             fade_in_backward=_native.ops.fade_in_backward.default,
                             fade_reals=_native.ops.fade_reals.default)
    torch.library.register_fake(NATIVE.fade_in, _fade_in_op_fake)
    torch.library.register_fake(NATIVE.fade_in_backward, _fade_in_backward_op_fake)
    torch.library.register_fake(NATIVE.fade_reals, _fade_reals_op_fake)


# ----- autograd (first and second order, shared by the Triton and the native ops) ---------------

def _fade_in_setup(ctx, inputs, output):
    low, high, alpha = inputs
    ctx.save_for_backward(alpha, *((low, high) if ctx.needs_input_grad[2] else ()))


def _fade_in_backward(k, ctx, grad):
    alpha, *saved = ctx.saved_tensors
    d_low = d_high = d_alpha = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        d_low, d_high = k.fade_in_backward(grad, alpha)
    if ctx.needs_input_grad[2]:
        low, high = saved
        up = k.fade_in(low, high, torch.zeros_like(alpha))  # alpha 0 is up2x(low) exactly
        d_alpha = alpha_grad(grad, high - up, alpha)
    return d_low, d_high, d_alpha


def _fade_in_backward_setup(ctx, inputs, output):
    grad, alpha = inputs
    ctx.save_for_backward(alpha, *((grad,) if ctx.needs_input_grad[1] else ()))


def _fade_in_backward_backward(k, ctx, gg_low, gg_high):
    # (d_low, d_high) = ((1 - alpha) * blocksum(grad), alpha * grad) is linear in grad; its adjoint
    # maps (gg_low, gg_high) to (1 - alpha) * up2x(gg_low) + alpha * gg_high: fade_in itself.
    alpha, *saved = ctx.saved_tensors
    if gg_low is None:  # zeros in the other's layout, so fade_in below copies nothing
        n, c, h2, w2 = gg_high.shape
        gg_low = _empty((n, c, h2 // 2, w2 // 2), gg_high, is_channels_last(gg_high)).zero_()
    if gg_high is None:
        n, c, h, w = gg_low.shape
        gg_high = _empty((n, c, 2 * h, 2 * w), gg_low, is_channels_last(gg_low)).zero_()
    g_grad = g_alpha = None
    if ctx.needs_input_grad[0]:
        g_grad = k.fade_in(gg_low, gg_high, alpha)
    if ctx.needs_input_grad[1]:
        (grad,) = saved
        g_alpha = alpha_grad(grad, gg_high - k.fade_in(gg_low, gg_high, torch.zeros_like(alpha)), alpha)
    return g_grad, g_alpha


def _fade_reals_setup(ctx, inputs, output):
    x, alpha = inputs
    ctx.save_for_backward(alpha, *((x,) if ctx.needs_input_grad[1] else ()))


def _fade_reals_backward(k, ctx, grad):
    # y = (1 - alpha) * P x + alpha * x with P = up2x(down2x(.)), the block-averaging projection,
    # which is symmetric: the op is its own adjoint, so dx = fade_reals(grad) (and so on, any order).
    alpha, *saved = ctx.saved_tensors
    d_x = k.fade_reals(grad, alpha) if ctx.needs_input_grad[0] else None
    d_alpha = None
    if ctx.needs_input_grad[1]:
        (x,) = saved
        d_alpha = alpha_grad(grad, x - k.fade_reals(x, torch.zeros_like(alpha)), alpha)
    return d_x, d_alpha


def _register_autograd(k) -> None:
    """First and second derivatives of one set of ops (Triton's or the native library's): ``k`` has
    ``fade_in``, ``fade_in_backward`` and ``fade_reals``."""
    reg = torch.library.register_autograd
    reg(k.fade_in, functools.partial(_fade_in_backward, k), setup_context=_fade_in_setup)
    reg(k.fade_in_backward, functools.partial(_fade_in_backward_backward, k), setup_context=_fade_in_backward_setup)
    reg(k.fade_reals, functools.partial(_fade_reals_backward, k), setup_context=_fade_reals_setup)


_register_autograd(TRITON)
if _native.available():
    _register_autograd(NATIVE)


# ----- backends and the public functions ----------------------------------------------------------

def fade_in_triton(low: torch.Tensor, high: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    if low.dim() != 4 or high.shape != (*low.shape[:2], 2 * low.shape[2], 2 * low.shape[3]):
        raise ValueError(f"fade_in: high {tuple(high.shape)} is not twice low {tuple(low.shape)}")
    if low.dtype != high.dtype:
        raise TypeError(f"fade_in: low is {low.dtype} but high is {high.dtype}")
    return _fade_in_op(low, high, alpha_tensor(alpha, high))


def fade_reals_triton(x: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"fade_reals: needs [N, C, H, W] with even H and W, got {tuple(x.shape)}")
    return _fade_reals_op(x, alpha_tensor(alpha, x))


def fade_in_native(low: torch.Tensor, high: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return NATIVE.fade_in(low, high, alpha_tensor(alpha, high))


def fade_reals_native(x: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return NATIVE.fade_reals(x, alpha_tensor(alpha, x))


FADE_IN_IMPLEMENTATIONS = {"reference": fade_in_reference}
FADE_REALS_IMPLEMENTATIONS = {"reference": fade_reals_reference}
if triton_backend.available():
    FADE_IN_IMPLEMENTATIONS["triton"] = fade_in_triton
    FADE_REALS_IMPLEMENTATIONS["triton"] = fade_reals_triton
_native.register(FADE_IN_IMPLEMENTATIONS, fade_in_native)
_native.register(FADE_REALS_IMPLEMENTATIONS, fade_reals_native)


def fade_in(low: torch.Tensor, high: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``low`` ``[N, C, H, W]``, ``high`` ``[N, C, 2H, 2W]`` -> ``lerp(up2x(low), high, alpha)``."""
    if high.shape[-2:] != (2 * low.shape[-2], 2 * low.shape[-1]):
        raise ValueError(f"fade_in: high {tuple(high.shape)} is not twice low {tuple(low.shape)}")
    return _backend.dispatch("fade_in", FADE_IN_IMPLEMENTATIONS, backend, low, high, alpha)


def fade_reals(x: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` (even H, W) -> ``lerp(up2x(down2x(x)), x, alpha)`` (the reals during a fade)."""
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"fade_reals: needs [N, C, H, W] with even H and W, got {tuple(x.shape)}")
    return _backend.dispatch("fade_reals", FADE_REALS_IMPLEMENTATIONS, backend, x, alpha)
