"""Pixelwise feature vector normalization (ProGAN paper, section 4.2).

``b[n, :, h, w] = a[n, :, h, w] / sqrt(mean_c(a[n, c, h, w]**2) + eps)``: every pixel's feature
vector is scaled to unit root-mean-square, which keeps the generator's signal magnitudes from
escalating. ``eps`` is 1e-8 as in the official code.

Backends:

- ``reference``: eager PyTorch.
- ``triton``: ``progan_fast::pixel_norm``, one program per (sample, block of pixels) that walks
  the channels twice (sum of squares, then scale); the backward walks them twice too
  (``sum(x^2)`` and ``sum(dy * x)``, then ``dx = r * dy - x * r^3 * sum(dy * x) / C`` with
  ``r = rsqrt(mean(x^2) + eps)``). Its second derivative, which training never needs (pixel norm
  is in G only, outside the gradient penalty), comes from differentiating the reference.
"""

from __future__ import annotations

import torch

import functools
from types import SimpleNamespace

from . import _backend, _native, _triton
from ._triton import tl, triton


def reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eager reference: the normalization is over dim 1 (channels) of an ``[N, C, ...]`` tensor."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


IMPLEMENTATIONS = {"reference": reference}


def pixel_norm(x: torch.Tensor, eps: float = 1e-8, backend: str | None = None) -> torch.Tensor:
    return _backend.dispatch("pixel_norm", IMPLEMENTATIONS, backend, x, eps)


# ----- Triton backend ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _pixel_norm_fwd_kernel(x_ptr, y_ptr, C, P, eps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                               ACC: tl.constexpr):
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        base = n.to(tl.int64) * C * P
        acc = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * P + p[None, :]
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            acc += tl.sum(x * x, axis=0)
        r = 1.0 / tl.sqrt(acc / C + eps)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * P + p[None, :]
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(y_ptr + offs, (x * r[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pixel_norm_bwd_kernel(dy_ptr, x_ptr, dx_ptr, C, P, eps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                               ACC: tl.constexpr):
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        base = n.to(tl.int64) * C * P
        sum_xx = tl.zeros([BLOCK_P], dtype=ACC)
        sum_dyx = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * P + p[None, :]
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            sum_xx += tl.sum(x * x, axis=0)
            sum_dyx += tl.sum(dy * x, axis=0)
        r = 1.0 / tl.sqrt(sum_xx / C + eps)
        k = r * r * r * sum_dyx / C
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * P + p[None, :]
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            dx = r[None, :] * dy - x * k[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    _GPU_CONFIGS = [
        triton.Config({"BLOCK_C": bc, "BLOCK_P": bp}, num_warps=w)
        for bc, bp, w in [(16, 64, 2), (32, 64, 4), (16, 128, 4), (32, 128, 4), (8, 256, 4), (16, 256, 8)]
    ]
    _pixel_norm_fwd_tuned = triton.autotune(_GPU_CONFIGS, key=["C", "P"])(_pixel_norm_fwd_kernel)
    _pixel_norm_bwd_tuned = triton.autotune(_GPU_CONFIGS, key=["C", "P"])(_pixel_norm_bwd_kernel)

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    _SIG = {"C": "i32", "P": "i32", "eps": "fp32"}
    AOT_SPECS = _triton.aot_specs_for_configs(
        "pixel_norm_fwd", _pixel_norm_fwd_kernel, {"x_ptr": "*T", "y_ptr": "*T", **_SIG}, _GPU_CONFIGS
    ) + _triton.aot_specs_for_configs(
        "pixel_norm_bwd", _pixel_norm_bwd_kernel, {"dy_ptr": "*T", "x_ptr": "*T", "dx_ptr": "*T", **_SIG}, _GPU_CONFIGS
    )
else:
    AOT_SPECS = []


def _launch(kernel, tuned, tensors, c: int, p: int, n: int, eps: float, acc_like: torch.Tensor) -> None:
    acc = _triton.compute_dtype(acc_like)
    if _triton.INTERPRETER and acc_like.device.type == "cpu":
        block_c = min(64, triton.next_power_of_2(c))
        block_p = min(triton.next_power_of_2(p), 1024)
        kernel[(n, triton.cdiv(p, block_p))](*tensors, c, p, eps, BLOCK_C=block_c, BLOCK_P=block_p, ACC=acc)
    else:
        tuned[lambda meta: (n, triton.cdiv(p, meta["BLOCK_P"]))](*tensors, c, p, eps, ACC=acc)


@torch.library.custom_op("progan_fast::pixel_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _pixel_norm_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    _triton.check_device("pixel_norm", x)
    x = x.contiguous()
    y = torch.empty_like(x)
    n, c = x.shape[0], x.shape[1]
    p = x.numel() // max(1, n * c)
    if y.numel():
        _launch(_pixel_norm_fwd_kernel, _pixel_norm_fwd_tuned, (x, y), c, p, n, eps, x)
    return y


@_pixel_norm_op.register_fake
def _pixel_norm_op_fake(x, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("progan_fast::pixel_norm_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _pixel_norm_backward_op(grad: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    _triton.check_device("pixel_norm_backward", grad, x)
    grad, x = grad.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    n, c = x.shape[0], x.shape[1]
    p = x.numel() // max(1, n * c)
    if dx.numel():
        _launch(_pixel_norm_bwd_kernel, _pixel_norm_bwd_tuned, (grad, x, dx), c, p, n, eps, x)
    return dx


@_pixel_norm_backward_op.register_fake
def _pixel_norm_backward_op_fake(grad, x, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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


def triton_impl(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return _pixel_norm_op(x, eps)


def _register_autograd(k) -> None:
    """First and second derivatives of one set of ops (Triton's or the native library's)."""
    torch.library.register_autograd(k.pixel_norm, functools.partial(_backward, k), setup_context=_setup)
    torch.library.register_autograd(k.pixel_norm_backward, _backward_of_backward, setup_context=_setup_bwd)


_register_autograd(SimpleNamespace(pixel_norm=_pixel_norm_op, pixel_norm_backward=_pixel_norm_backward_op))

if _triton.available():
    IMPLEMENTATIONS["triton"] = triton_impl


# ----- native backend (progan_fast._C: C++ CPU twin, CUDA kernel) --------------------------------
#
# ``progan_fast_native::pixel_norm`` / ``pixel_norm_backward``: the Triton kernels' algorithm (per
# pixel, two walks over the channels) in kernels/cuda/pixel_norm.cu and its CPU twin
# kernels/cpu/pixel_norm.cpp; autograd and fake tensors as for the Triton ops above.

if _native.available():
    NATIVE = SimpleNamespace(pixel_norm=_native.ops.pixel_norm.default,
                             pixel_norm_backward=_native.ops.pixel_norm_backward.default)
    torch.library.register_fake(NATIVE.pixel_norm, _pixel_norm_op_fake)
    torch.library.register_fake(NATIVE.pixel_norm_backward, _pixel_norm_backward_op_fake)
    _register_autograd(NATIVE)


def native_impl(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return NATIVE.pixel_norm(x, eps)


_native.register(IMPLEMENTATIONS, native_impl)
