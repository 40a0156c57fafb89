"""The discriminator's fade (ProGAN paper, section 3 and figure 2): ``lerp(old, new, alpha)``.

While a new resolution fades in, D blends ``fromRGB_prev(down2x(img))`` with the new block's
output by ``alpha`` (0 -> old path only, 1 -> new path only). Both tensors have the same shape.

Layouts: the op is elementwise, so in one dense layout it is a flat loop. ``old`` decides: dense
NCHW or dense NHWC (channels-last) is used as it is, ``new`` is brought to the same layout (a copy
only if it differs) and the output is allocated there; the backward's outputs take the incoming
gradient's layout (``ops/common.py``). Any other strides are copied to NCHW first.
``alpha`` is a Python float or a 0-dim tensor; the blend is ``torch.lerp``, exact at both ends
(see :mod:`.fade_in`, G's side of the fade).

Backends:

- ``reference``: ``torch.lerp``.
- ``triton``: the custom ops ``progan_fast::blend`` and ``progan_fast::blend_backward``, one pass
  each (kernels in ``ops/triton/blend.py``), with torch.lerp's formula and ``alpha`` loaded from a
  0-dim tensor, as for :mod:`.fade_in`.
- ``cpu`` / ``cuda``: the native library's ``progan_fast_native::`` twins, same autograd.

Autograd: ``d_alpha = sum(g * (new - old))`` with torch ops, only when alpha requires a gradient.
blend sits inside the gradient penalty, so its second derivative matters: ``blend_backward`` is
linear in the incoming gradient and its adjoint is ``blend`` itself.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import _backend, _native
from . import triton as triton_backend
from .common import Alpha, alpha_grad, alpha_tensor, dense_layout, is_channels_last, memory_format, to_layout
from .triton import blend as kernels
from .triton import elementwise

# ----- reference ----------------------------------------------------------------------------------


def reference(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return torch.lerp(old, new, alpha)


# ----- custom ops: Triton's progan_fast:: ops, and fake tensors for the native ones --------------

@torch.library.custom_op("progan_fast::blend", mutates_args=(), device_types=("cpu", "cuda"))
def _blend_op(old: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    triton_backend.check_device("blend", old, new, alpha)
    elementwise.check_size("blend", new)
    old, channels_last = dense_layout(old)
    new = to_layout(new, channels_last)
    out = torch.empty_like(old, memory_format=memory_format(channels_last))
    kernels.blend_forward(old, new, alpha, out)
    return out


@_blend_op.register_fake
def _blend_op_fake(old, new, alpha):
    return torch.empty_like(old, memory_format=memory_format(is_channels_last(old)))


@torch.library.custom_op("progan_fast::blend_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _blend_backward_op(grad: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` -> ``(grad * (1 - alpha), grad * alpha)`` in one pass, in ``grad``'s layout."""
    triton_backend.check_device("blend_backward", grad, alpha)
    elementwise.check_size("blend_backward", grad)
    grad, channels_last = dense_layout(grad)
    fmt = memory_format(channels_last)
    d_old, d_new = torch.empty_like(grad, memory_format=fmt), torch.empty_like(grad, memory_format=fmt)
    kernels.blend_backward(grad, alpha, d_old, d_new)
    return d_old, d_new


@_blend_backward_op.register_fake
def _blend_backward_op_fake(grad, alpha):
    fmt = memory_format(is_channels_last(grad))
    return torch.empty_like(grad, memory_format=fmt), torch.empty_like(grad, memory_format=fmt)


TRITON = SimpleNamespace(blend=_blend_op, blend_backward=_blend_backward_op)

if _native.available():
    NATIVE = SimpleNamespace(blend=_native.ops.blend.default, blend_backward=_native.ops.blend_backward.default)
    torch.library.register_fake(NATIVE.blend, _blend_op_fake)
    torch.library.register_fake(NATIVE.blend_backward, _blend_backward_op_fake)


# ----- autograd (first and second order, shared by the Triton and the native ops) ---------------

def _blend_setup(ctx, inputs, output):
    old, new, alpha = inputs
    ctx.save_for_backward(alpha, *((old, new) if ctx.needs_input_grad[2] else ()))


def _blend_backward(k, ctx, grad):
    alpha, *saved = ctx.saved_tensors
    d_old = d_new = d_alpha = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        d_old, d_new = k.blend_backward(grad, alpha)
    if ctx.needs_input_grad[2]:
        old, new = saved
        d_alpha = alpha_grad(grad, new - old, alpha)
    return d_old, d_new, d_alpha


def _blend_backward_setup(ctx, inputs, output):
    grad, alpha = inputs
    ctx.save_for_backward(alpha, *((grad,) if ctx.needs_input_grad[1] else ()))


def _blend_backward_backward(k, ctx, gg_old, gg_new):
    # The adjoint of grad -> ((1 - alpha) * grad, alpha * grad) is blend itself.
    alpha, *saved = ctx.saved_tensors
    if gg_old is None:
        gg_old = torch.zeros_like(gg_new)
    if gg_new is None:
        gg_new = torch.zeros_like(gg_old)
    g_grad = k.blend(gg_old, gg_new, alpha) if ctx.needs_input_grad[0] else None
    g_alpha = alpha_grad(saved[0], gg_new - gg_old, alpha) if ctx.needs_input_grad[1] else None
    return g_grad, g_alpha


def _register_autograd(k) -> None:
    """First and second derivatives of one pair of ops (Triton's or the native library's)."""
    reg = torch.library.register_autograd
    reg(k.blend, functools.partial(_blend_backward, k), setup_context=_blend_setup)
    reg(k.blend_backward, functools.partial(_blend_backward_backward, k), setup_context=_blend_backward_setup)


_register_autograd(TRITON)
if _native.available():
    _register_autograd(NATIVE)


# ----- backends and the public function -----------------------------------------------------------

def triton_impl(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    if old.shape != new.shape:
        raise ValueError(f"blend: old {tuple(old.shape)} and new {tuple(new.shape)} differ in shape")
    if old.dtype != new.dtype:
        raise TypeError(f"blend: old is {old.dtype} but new is {new.dtype}")
    return _blend_op(old, new, alpha_tensor(alpha, new))


def native_impl(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return NATIVE.blend(old, new, alpha_tensor(alpha, new))


IMPLEMENTATIONS = {"reference": reference}
if triton_backend.available():
    IMPLEMENTATIONS["triton"] = triton_impl
_native.register(IMPLEMENTATIONS, native_impl)


def blend(old: torch.Tensor, new: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``lerp(old, new, alpha)`` for two tensors of the same shape (the discriminator's fade)."""
    return _backend.dispatch("blend", IMPLEMENTATIONS, backend, old, new, alpha)
