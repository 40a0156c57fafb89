"""Pixelwise feature vector normalization (ProGAN paper, section 4.2).

``b[n, :, h, w] = a[n, :, h, w] / sqrt(mean_c(a[n, c, h, w]**2) + eps)``: every pixel's feature
vector is scaled to unit root-mean-square, which keeps the generator's signal magnitudes from
escalating. ``eps`` is 1e-8 as in the official code.

Backends:

- ``reference``: eager PyTorch.
- ``triton``: the custom ops ``progan_fast::pixel_norm`` and ``progan_fast::pixel_norm_backward``
  (kernels in ``ops/triton/pixel_norm.py``: per pixel, two walks over the channels in each
  direction). ``conv_act`` runs this op (:func:`triton_impl`) after the convolutions too wide to
  fuse pixel norm into.
- ``cpu`` / ``cuda``: the native library's ``progan_fast_native::`` twins, the same algorithm
  (kernels/cuda/pixel_norm.cu, kernels/cpu/pixel_norm.cpp), same autograd.

Layouts: every backend takes ``x`` dense NCHW or dense NHWC (channels-last) and returns ``y`` (and
the backward ``dx``) in ``x``'s layout without copying it (:mod:`progan_fast.ops.common`, "Memory
formats"); the kernels address both through strides, and in NHWC their reduction over channels
reads contiguous memory. Other strides are copied to NCHW first.

Autograd: the backward is an op of its own; its derivative (the second derivative, which training
never needs: pixel norm is in G only, outside the gradient penalty) comes from differentiating the
reference.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import _backend, _native
from . import triton as triton_backend
from .common import dense_layout, memory_format, to_layout
from .triton import pixel_norm as kernels

# ----- reference ----------------------------------------------------------------------------------


def reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eager reference: the normalization is over dim 1 (channels) of an ``[N, C, ...]`` tensor.

    fp16 and bf16 inputs are computed in float32 and rounded once, as the kernels do: in fp16 the
    square of a value below about 1.7e-4 and the eps itself (1e-8, under fp16's smallest subnormal,
    6e-8) round to zero, and a pixel of small features would be divided by zero.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        wide = x.float()
        return (wide * torch.rsqrt(wide.square().mean(dim=1, keepdim=True) + eps)).to(x.dtype)
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


# ----- custom ops: Triton's progan_fast:: ops, and fake tensors for the native ones --------------

def _check_sample_size(op: str, x: torch.Tensor) -> None:
    """The kernels' offsets within a sample (and its pixel index) are int32; the sample offset is int64."""
    if x.dim() >= 2 and x.shape[0]:
        triton_backend.check_index_count(op, x.numel() // x.shape[0], f"one sample of {tuple(x.shape)}")


@torch.library.custom_op("progan_fast::pixel_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _pixel_norm_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    triton_backend.check_device("pixel_norm", x)
    _check_sample_size("pixel_norm", x)
    x, cl = dense_layout(x)
    y = torch.empty_like(x, memory_format=memory_format(cl))
    if y.numel():
        kernels.pixel_norm_forward(x, y, eps, cl)
    return y


@_pixel_norm_op.register_fake
def _pixel_norm_op_fake(x, eps):
    _, cl = dense_layout(x)
    return torch.empty_like(x, memory_format=memory_format(cl))


@torch.library.custom_op("progan_fast::pixel_norm_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _pixel_norm_backward_op(grad: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    triton_backend.check_device("pixel_norm_backward", grad, x)
    _check_sample_size("pixel_norm_backward", x)
    x, cl = dense_layout(x)
    grad = to_layout(grad, cl)
    dx = torch.empty_like(x, memory_format=memory_format(cl))
    if dx.numel():
        kernels.pixel_norm_backward(grad, x, dx, eps, cl)
    return dx


@_pixel_norm_backward_op.register_fake
def _pixel_norm_backward_op_fake(grad, x, eps):
    _, cl = dense_layout(x)
    return torch.empty_like(x, memory_format=memory_format(cl))


TRITON = SimpleNamespace(pixel_norm=_pixel_norm_op, pixel_norm_backward=_pixel_norm_backward_op)

if _native.available():
    NATIVE = SimpleNamespace(pixel_norm=_native.ops.pixel_norm.default,
                             pixel_norm_backward=_native.ops.pixel_norm_backward.default)
    torch.library.register_fake(NATIVE.pixel_norm, _pixel_norm_op_fake)
    torch.library.register_fake(NATIVE.pixel_norm_backward, _pixel_norm_backward_op_fake)


# ----- autograd (first and second order, shared by the Triton and the native ops) ---------------

def _setup(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _backward(k, ctx, grad):
    (x,) = ctx.saved_tensors
    return k.pixel_norm_backward(grad, x, ctx.eps), None


def _setup_bwd(ctx, inputs, output):
    grad, x, eps = inputs
    ctx.save_for_backward(grad, x)
    ctx.eps = eps


def _backward_of_backward(ctx, ggrad_x):
    # d/d(grad, x) of <ggrad_x, dx(grad, x)>: differentiate the reference's first derivative.
    grad, x = ctx.saved_tensors
    with torch.enable_grad():
        grad_, x_ = grad.detach().requires_grad_(), x.detach().requires_grad_()
        (dx,) = torch.autograd.grad(reference(x_, ctx.eps), x_, grad_, create_graph=True)
        g_grad, g_x = torch.autograd.grad(dx, (grad_, x_), ggrad_x, allow_unused=True)
    return g_grad, g_x, None


def _register_autograd(k) -> None:
    """First and second derivatives of one set of ops (Triton's or the native library's)."""
    torch.library.register_autograd(k.pixel_norm, functools.partial(_backward, k), setup_context=_setup)
    torch.library.register_autograd(k.pixel_norm_backward, _backward_of_backward, setup_context=_setup_bwd)


_register_autograd(TRITON)
if _native.available():
    _register_autograd(NATIVE)


# ----- backends and the public function -----------------------------------------------------------

def triton_impl(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return _pixel_norm_op(x, eps)


def native_impl(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return NATIVE.pixel_norm(x, eps)


IMPLEMENTATIONS = {"reference": reference}
if triton_backend.available():
    IMPLEMENTATIONS["triton"] = triton_impl
_native.register(IMPLEMENTATIONS, native_impl)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8, backend: str | None = None) -> torch.Tensor:
    return _backend.dispatch("pixel_norm", IMPLEMENTATIONS, backend, x, eps)
