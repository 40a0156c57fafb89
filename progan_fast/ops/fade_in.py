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
- :func:`fade_reals` ``(x, alpha)``: ``fade_in(downsample2x(x), x, alpha)``, the real images during
  a fade (D's twin of G's fade), as one op.

Backends:

- ``reference``: eager PyTorch (``torch.lerp``, reshape/expand, ``avg_pool2d``).
- ``triton``: one ``progan_fast::`` custom op per function, each a single pass over memory, plus
  one custom op per backward; every kernel is elementwise over a flattened index (1D grid). The
  2x kernels index the low-resolution elements and touch each one's 2x2 block of the
  high-resolution tensor as two rows of adjacent pairs, so nothing upsampled is ever written:

  - ``fade_in``: reads ``low`` once and ``high`` once, writes the output once. Backward
    (``fade_in_backward``): one pass over the incoming gradient writes ``d_high = g * alpha`` and
    ``d_low = (1 - alpha) * sum of g over the 2x2 block``.
  - ``blend``: one pass; backward (``blend_backward``) writes both input gradients in one pass.
  - ``downsample2x``: one pass over the input (an odd last row/column is ignored, as
    ``avg_pool2d`` does); backward (``downsample2x_backward``): one pass writing each input pixel's
    ``grad / 4`` (a nearest upsample).
  - ``fade_reals``: reads each 2x2 block once, averages, blends each pixel, writes once.

  The blend is torch.lerp's formula with its fused multiply-adds, so it is exact at alpha 0 and 1
  and equals ``torch.lerp`` bit for bit in float32 wherever ``tl.fma`` rounds once: on GPUs and
  under triton 3.9's interpreter, not under 3.6's, which computes it as a multiply then an add
  (tests/test_triton_fade_in.py checks which). ``alpha`` is loaded by the kernels from a 0-dim
  float32 tensor (float64 for float64 inputs), never passed by value, so a CUDA graph replays
  with whatever the tensor holds. ``d_alpha`` is computed only when alpha requires a
  gradient (never in training): ``sum(g * (high - up))`` with torch ops on the saved inputs, where
  ``up`` is the fade_in op at alpha 0 (exactly ``up2x(low)``), so it stays differentiable.

  Second derivatives (blend and downsample2x sit inside the gradient penalty) use the custom ops
  themselves, in Triton in both orders: each backward is linear in the incoming gradient and its
  adjoint is the forward op (``fade_in_backward``'s is ``fade_in``, ``blend_backward``'s is
  ``blend``, ``downsample2x_backward``'s is ``downsample2x``); ``fade_reals`` is self-adjoint
  (``(1 - alpha) * P + alpha * I`` with ``P`` the symmetric block-averaging projection), so its
  backward is ``fade_reals`` of the gradient. Terms in ``alpha`` use torch ops as above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import functools
from types import SimpleNamespace

from . import _backend, _native, _triton
from ._triton import tl, triton

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


def fade_reals_reference(x: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """Real images during a fade: ``lerp(up2x(down2x(x)), x, alpha)``."""
    return fade_in_reference(downsample2x_reference(x), x, alpha)


FADE_IN_IMPLEMENTATIONS = {"reference": fade_in_reference}
BLEND_IMPLEMENTATIONS = {"reference": blend_reference}
DOWNSAMPLE_IMPLEMENTATIONS = {"reference": downsample2x_reference}
FADE_REALS_IMPLEMENTATIONS = {"reference": fade_reals_reference}


def fade_in(low: torch.Tensor, high: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``low`` ``[N, C, H, W]``, ``high`` ``[N, C, 2H, 2W]`` -> ``lerp(up2x(low), high, alpha)``."""
    if high.shape[-2:] != (2 * low.shape[-2], 2 * low.shape[-1]):
        raise ValueError(f"fade_in: high {tuple(high.shape)} is not twice low {tuple(low.shape)}")
    return _backend.dispatch("fade_in", FADE_IN_IMPLEMENTATIONS, backend, low, high, alpha)


def blend(old: torch.Tensor, new: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``lerp(old, new, alpha)`` for two tensors of the same shape (the discriminator's fade)."""
    return _backend.dispatch("blend", BLEND_IMPLEMENTATIONS, backend, old, new, alpha)


def downsample2x(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """2x2 average pool of an ``[N, C, H, W]`` tensor with even H and W."""
    return _backend.dispatch("downsample2x", DOWNSAMPLE_IMPLEMENTATIONS, backend, x)


def fade_reals(x: torch.Tensor, alpha: Alpha, backend: str | None = None) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` (even H, W) -> ``lerp(up2x(down2x(x)), x, alpha)`` (the reals during a fade)."""
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"fade_reals: needs [N, C, H, W] with even H and W, got {tuple(x.shape)}")
    return _backend.dispatch("fade_reals", FADE_REALS_IMPLEMENTATIONS, backend, x, alpha)


# ----- Triton backend ---------------------------------------------------------------------------
#
# Every kernel is elementwise: a 1D grid over a flattened index space, BLOCK indices per program.
# The 2x kernels index "low-resolution" elements and touch each one's 2x2 block of the
# high-resolution tensor as two rows of horizontally adjacent pairs ([BLOCK, 2] tiles), so every
# high-resolution element is read and/or written exactly once, in contiguous pairs.
# Index arithmetic is int32: the wrappers refuse tensors of 2**31 elements or more.

if triton is not None:

    @triton.jit
    def _lerp(a, b, w):
        # torch.lerp's formula, with its fused multiply-adds (ATen's vectorized CPU kernel uses
        # fmadd/fnmadd, nvcc contracts the CUDA one): a + w * (b - a) for |w| < 0.5, else
        # b - (b - a) * (1 - w). Exact at w == 0 (gives a) and at w == 1 (gives b).
        d = b - a
        return tl.where(tl.abs(w) < 0.5, tl.fma(d, w, a), tl.fma(-d, 1.0 - w, b))

    @triton.jit
    def _fade_in_fwd_kernel(low_ptr, high_ptr, alpha_ptr, out_ptr, n_low, Wl, BLOCK: tl.constexpr,
                            ACC: tl.constexpr):
        # out[2r + dy, 2w + dx] = lerp(low[r, w], high[2r + dy, 2w + dx], alpha), r = (n, c, h) flattened.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_low
        j = tl.arange(0, 2)
        W = 2 * Wl
        top = (i // Wl) * (2 * W) + (i % Wl) * 2
        offs = top[:, None] + j[None, :]
        mask2 = mask[:, None] & (j[None, :] < 2)
        alpha = tl.load(alpha_ptr).to(ACC)
        lo = tl.load(low_ptr + i, mask=mask, other=0.0).to(ACC)[:, None]
        h0 = tl.load(high_ptr + offs, mask=mask2, other=0.0).to(ACC)
        h1 = tl.load(high_ptr + offs + W, mask=mask2, other=0.0).to(ACC)
        tl.store(out_ptr + offs, _lerp(lo, h0, alpha).to(out_ptr.dtype.element_ty), mask=mask2)
        tl.store(out_ptr + offs + W, _lerp(lo, h1, alpha).to(out_ptr.dtype.element_ty), mask=mask2)

    @triton.jit
    def _fade_in_bwd_kernel(g_ptr, alpha_ptr, dlow_ptr, dhigh_ptr, n_low, Wl, BLOCK: tl.constexpr,
                            ACC: tl.constexpr):
        # d_high = g * alpha; d_low = (sum of g over the 2x2 block) * (1 - alpha).
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_low
        j = tl.arange(0, 2)
        W = 2 * Wl
        top = (i // Wl) * (2 * W) + (i % Wl) * 2
        offs = top[:, None] + j[None, :]
        mask2 = mask[:, None] & (j[None, :] < 2)
        alpha = tl.load(alpha_ptr).to(ACC)
        g0 = tl.load(g_ptr + offs, mask=mask2, other=0.0).to(ACC)
        g1 = tl.load(g_ptr + offs + W, mask=mask2, other=0.0).to(ACC)
        tl.store(dhigh_ptr + offs, (g0 * alpha).to(dhigh_ptr.dtype.element_ty), mask=mask2)
        tl.store(dhigh_ptr + offs + W, (g1 * alpha).to(dhigh_ptr.dtype.element_ty), mask=mask2)
        dlow = (tl.sum(g0, axis=1) + tl.sum(g1, axis=1)) * (1.0 - alpha)
        tl.store(dlow_ptr + i, dlow.to(dlow_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _blend_fwd_kernel(old_ptr, new_ptr, alpha_ptr, out_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        alpha = tl.load(alpha_ptr).to(ACC)
        a = tl.load(old_ptr + i, mask=mask, other=0.0).to(ACC)
        b = tl.load(new_ptr + i, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + i, _lerp(a, b, alpha).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _blend_bwd_kernel(g_ptr, alpha_ptr, dold_ptr, dnew_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        alpha = tl.load(alpha_ptr).to(ACC)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(ACC)
        tl.store(dold_ptr + i, (g * (1.0 - alpha)).to(dold_ptr.dtype.element_ty), mask=mask)
        tl.store(dnew_ptr + i, (g * alpha).to(dnew_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _downsample_fwd_kernel(x_ptr, y_ptr, n_out, Ho, Wo, H, W, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # y[nc, ho, wo] = mean of x[nc, 2ho:2ho+2, 2wo:2wo+2]; an odd last row/column of x is unused.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_out
        j = tl.arange(0, 2)
        r = i // Wo
        top = ((r // Ho) * H + (r % Ho) * 2) * W + (i % Wo) * 2
        offs = top[:, None] + j[None, :]
        mask2 = mask[:, None] & (j[None, :] < 2)
        x0 = tl.load(x_ptr + offs, mask=mask2, other=0.0).to(ACC)
        x1 = tl.load(x_ptr + offs + W, mask=mask2, other=0.0).to(ACC)
        y = (tl.sum(x0, axis=1) + tl.sum(x1, axis=1)) * 0.25
        tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _downsample_bwd_kernel(g_ptr, dx_ptr, n_in, Ho, Wo, H, W, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # dx[nc, h, w] = g[nc, h // 2, w // 2] / 4 (0 in an odd last row/column), one pass over dx.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_in
        w = i % W
        r = i // W
        h = r % H
        src = ((r // H) * Ho + h // 2) * Wo + w // 2
        valid = mask & (h < 2 * Ho) & (w < 2 * Wo)
        g = tl.load(g_ptr + src, mask=valid, other=0.0).to(ACC)
        tl.store(dx_ptr + i, (g * 0.25).to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fade_reals_kernel(x_ptr, alpha_ptr, out_ptr, n_low, Wl, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # out = lerp(mean of the 2x2 block, x, alpha) for every pixel of each block: one read, one write.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_low
        j = tl.arange(0, 2)
        W = 2 * Wl
        top = (i // Wl) * (2 * W) + (i % Wl) * 2
        offs = top[:, None] + j[None, :]
        mask2 = mask[:, None] & (j[None, :] < 2)
        alpha = tl.load(alpha_ptr).to(ACC)
        x0 = tl.load(x_ptr + offs, mask=mask2, other=0.0).to(ACC)
        x1 = tl.load(x_ptr + offs + W, mask=mask2, other=0.0).to(ACC)
        mean = ((tl.sum(x0, axis=1) + tl.sum(x1, axis=1)) * 0.25)[:, None]
        tl.store(out_ptr + offs, _lerp(mean, x0, alpha).to(out_ptr.dtype.element_ty), mask=mask2)
        tl.store(out_ptr + offs + W, _lerp(mean, x1, alpha).to(out_ptr.dtype.element_ty), mask=mask2)

    # Kernels that touch a 2x2 block per index do four elements' work per index: smaller blocks.
    _GPU_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(512, 4), (1024, 4), (2048, 8), (4096, 8)]]
    _GPU_CONFIGS_2X2 = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(128, 4), (256, 4), (512, 4), (1024, 8)]]

    _NUMEL_ARG = {
        _fade_in_fwd_kernel: "n_low", _fade_in_bwd_kernel: "n_low", _fade_reals_kernel: "n_low",
        _blend_fwd_kernel: "n", _blend_bwd_kernel: "n", _downsample_fwd_kernel: "n_out", _downsample_bwd_kernel: "n_in",
    }
    _CONFIGS = {
        _fade_in_fwd_kernel: _GPU_CONFIGS_2X2, _fade_in_bwd_kernel: _GPU_CONFIGS_2X2, _fade_reals_kernel: _GPU_CONFIGS_2X2,
        _downsample_fwd_kernel: _GPU_CONFIGS_2X2, _blend_fwd_kernel: _GPU_CONFIGS, _blend_bwd_kernel: _GPU_CONFIGS,
        _downsample_bwd_kernel: _GPU_CONFIGS,
    }
    _TUNED = {k: triton.autotune(_CONFIGS[k], key=[_NUMEL_ARG[k]])(k) for k in _CONFIGS}

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    _SIGNATURES = {
        "fade_in_fwd": (_fade_in_fwd_kernel, {"low_ptr": "*T", "high_ptr": "*T", "alpha_ptr": "*fp32",
                                              "out_ptr": "*T", "n_low": "i32", "Wl": "i32"}),
        "fade_in_bwd": (_fade_in_bwd_kernel, {"g_ptr": "*T", "alpha_ptr": "*fp32", "dlow_ptr": "*T",
                                              "dhigh_ptr": "*T", "n_low": "i32", "Wl": "i32"}),
        "blend_fwd": (_blend_fwd_kernel, {"old_ptr": "*T", "new_ptr": "*T", "alpha_ptr": "*fp32",
                                          "out_ptr": "*T", "n": "i32"}),
        "blend_bwd": (_blend_bwd_kernel, {"g_ptr": "*T", "alpha_ptr": "*fp32", "dold_ptr": "*T",
                                          "dnew_ptr": "*T", "n": "i32"}),
        "downsample2x_fwd": (_downsample_fwd_kernel, {"x_ptr": "*T", "y_ptr": "*T", "n_out": "i32", "Ho": "i32",
                                                      "Wo": "i32", "H": "i32", "W": "i32"}),
        "downsample2x_bwd": (_downsample_bwd_kernel, {"g_ptr": "*T", "dx_ptr": "*T", "n_in": "i32", "Ho": "i32",
                                                      "Wo": "i32", "H": "i32", "W": "i32"}),
        "fade_reals": (_fade_reals_kernel, {"x_ptr": "*T", "alpha_ptr": "*fp32", "out_ptr": "*T",
                                            "n_low": "i32", "Wl": "i32"}),
    }
    AOT_SPECS = [spec for _name, (_kernel, _sig) in _SIGNATURES.items()
                 for spec in _triton.aot_specs_for_configs(_name, _kernel, _sig, _CONFIGS[_kernel])]
else:
    AOT_SPECS = []

_MAX_NUMEL = 2**31 - 1
#: The interpreter's block: one large program per launch (it pays per program); tests lower it
#: to run several programs and the tail mask of the last one.
_INTERPRETER_MAX_BLOCK = 65536


def _launch(kernel, args: tuple, n: int, like: torch.Tensor) -> None:
    """Launch ``kernel`` over ``n`` indices (its first int argument); ``like`` sets the accumulation dtype."""
    if n == 0:
        return
    acc = _triton.compute_dtype(like)
    if _triton.INTERPRETER and like.device.type == "cpu":
        block = min(triton.next_power_of_2(n), _INTERPRETER_MAX_BLOCK)
        kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, ACC=acc)
    else:
        _TUNED[kernel][lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, ACC=acc)


def _check_size(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() > _MAX_NUMEL:
            raise ValueError(f"progan_fast::{op} (triton): {tuple(t.shape)} has 2**31 or more elements")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dot(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` in float32 (float64 for float64), as a 0-dim tensor of ``like``'s dtype (d_alpha)."""
    acc = torch.promote_types(_acc_dtype(a), like.dtype)
    return (a.to(acc) * b.to(acc)).sum().to(like.dtype)


# fade_in ----------------------------------------------------------------------------------------

@torch.library.custom_op("progan_fast::fade_in", mutates_args=(), device_types=("cpu", "cuda"))
def _fade_in_op(low: torch.Tensor, high: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    _triton.check_device("fade_in", low, high, alpha)
    _check_size("fade_in", high)
    low, high = low.contiguous(), high.contiguous()
    out = torch.empty_like(high)
    _launch(_fade_in_fwd_kernel, (low, high, alpha, out, low.numel(), low.shape[-1]), low.numel(), high)
    return out


@_fade_in_op.register_fake
def _fade_in_op_fake(low, high, alpha):
    return torch.empty_like(high, memory_format=torch.contiguous_format)


@torch.library.custom_op("progan_fast::fade_in_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _fade_in_backward_op(grad: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` ``[N, C, 2H, 2W]`` -> ``(d_low [N, C, H, W], d_high)`` for a given alpha."""
    _triton.check_device("fade_in_backward", grad, alpha)
    _check_size("fade_in_backward", grad)
    grad = grad.contiguous()
    n, c, h2, w2 = grad.shape
    d_low = grad.new_empty(n, c, h2 // 2, w2 // 2)
    d_high = torch.empty_like(grad)
    _launch(_fade_in_bwd_kernel, (grad, alpha, d_low, d_high, d_low.numel(), w2 // 2), d_low.numel(), grad)
    return d_low, d_high


@_fade_in_backward_op.register_fake
def _fade_in_backward_op_fake(grad, alpha):
    n, c, h2, w2 = grad.shape
    return grad.new_empty(n, c, h2 // 2, w2 // 2), torch.empty_like(grad, memory_format=torch.contiguous_format)


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
        d_alpha = _dot(grad, high - up, alpha)
    return d_low, d_high, d_alpha


def _fade_in_backward_setup(ctx, inputs, output):
    grad, alpha = inputs
    ctx.save_for_backward(alpha, *((grad,) if ctx.needs_input_grad[1] else ()))


def _fade_in_backward_backward(k, ctx, gg_low, gg_high):
    # (d_low, d_high) = ((1 - alpha) * blocksum(grad), alpha * grad) is linear in grad; its adjoint
    # maps (gg_low, gg_high) to (1 - alpha) * up2x(gg_low) + alpha * gg_high: fade_in itself.
    alpha, *saved = ctx.saved_tensors
    if gg_low is None:
        n, c, h2, w2 = gg_high.shape
        gg_low = gg_high.new_zeros(n, c, h2 // 2, w2 // 2)
    if gg_high is None:
        n, c, h, w = gg_low.shape
        gg_high = gg_low.new_zeros(n, c, 2 * h, 2 * w)
    g_grad = g_alpha = None
    if ctx.needs_input_grad[0]:
        g_grad = k.fade_in(gg_low, gg_high, alpha)
    if ctx.needs_input_grad[1]:
        (grad,) = saved
        g_alpha = _dot(grad, gg_high - k.fade_in(gg_low, gg_high, torch.zeros_like(alpha)), alpha)
    return g_grad, g_alpha


def fade_in_triton(low: torch.Tensor, high: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    if low.dim() != 4 or high.shape != (*low.shape[:2], 2 * low.shape[2], 2 * low.shape[3]):
        raise ValueError(f"fade_in: high {tuple(high.shape)} is not twice low {tuple(low.shape)}")
    if low.dtype != high.dtype:
        raise TypeError(f"fade_in: low is {low.dtype} but high is {high.dtype}")
    return _fade_in_op(low, high, _triton.scalar_tensor(alpha, high))


# blend ------------------------------------------------------------------------------------------

@torch.library.custom_op("progan_fast::blend", mutates_args=(), device_types=("cpu", "cuda"))
def _blend_op(old: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    _triton.check_device("blend", old, new, alpha)
    _check_size("blend", new)
    old, new = old.contiguous(), new.contiguous()
    out = torch.empty_like(new)
    _launch(_blend_fwd_kernel, (old, new, alpha, out, new.numel()), new.numel(), new)
    return out


@_blend_op.register_fake
def _blend_op_fake(old, new, alpha):
    return torch.empty_like(new, memory_format=torch.contiguous_format)


@torch.library.custom_op("progan_fast::blend_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _blend_backward_op(grad: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` -> ``(grad * (1 - alpha), grad * alpha)`` in one pass."""
    _triton.check_device("blend_backward", grad, alpha)
    _check_size("blend_backward", grad)
    grad = grad.contiguous()
    d_old, d_new = torch.empty_like(grad), torch.empty_like(grad)
    _launch(_blend_bwd_kernel, (grad, alpha, d_old, d_new, grad.numel()), grad.numel(), grad)
    return d_old, d_new


@_blend_backward_op.register_fake
def _blend_backward_op_fake(grad, alpha):
    return (torch.empty_like(grad, memory_format=torch.contiguous_format),
            torch.empty_like(grad, memory_format=torch.contiguous_format))


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
        d_alpha = _dot(grad, new - old, alpha)
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
    g_alpha = _dot(saved[0], gg_new - gg_old, alpha) if ctx.needs_input_grad[1] else None
    return g_grad, g_alpha


def blend_triton(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    if old.shape != new.shape:
        raise ValueError(f"blend: old {tuple(old.shape)} and new {tuple(new.shape)} differ in shape")
    if old.dtype != new.dtype:
        raise TypeError(f"blend: old is {old.dtype} but new is {new.dtype}")
    return _blend_op(old, new, _triton.scalar_tensor(alpha, new))


# downsample2x -----------------------------------------------------------------------------------

@torch.library.custom_op("progan_fast::downsample2x", mutates_args=(), device_types=("cpu", "cuda"))
def _downsample2x_op(x: torch.Tensor) -> torch.Tensor:
    _triton.check_device("downsample2x", x)
    _check_size("downsample2x", x)
    x = x.contiguous()
    n, c, h, w = x.shape
    y = x.new_empty(n, c, h // 2, w // 2)
    _launch(_downsample_fwd_kernel, (x, y, y.numel(), h // 2, w // 2, h, w), y.numel(), x)
    return y


@_downsample2x_op.register_fake
def _downsample2x_op_fake(x):
    n, c, h, w = x.shape
    return x.new_empty(n, c, h // 2, w // 2)


@torch.library.custom_op("progan_fast::downsample2x_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _downsample2x_backward_op(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grad`` ``[N, C, H // 2, W // 2]`` -> ``dx`` ``[N, C, H, W]``: nearest 2x upsample of ``grad / 4``."""
    _triton.check_device("downsample2x_backward", grad)
    grad = grad.contiguous()
    n, c, ho, wo = grad.shape
    dx = grad.new_empty(n, c, height, width)
    _check_size("downsample2x_backward", dx)
    _launch(_downsample_bwd_kernel, (grad, dx, dx.numel(), ho, wo, height, width), dx.numel(), grad)
    return dx


@_downsample2x_backward_op.register_fake
def _downsample2x_backward_op_fake(grad, height, width):
    return grad.new_empty(grad.shape[0], grad.shape[1], height, width)


def _downsample2x_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.hw = (x.shape[2], x.shape[3])


def _downsample2x_backward(k, ctx, grad):
    return k.downsample2x_backward(grad, *ctx.hw)


def _downsample2x_backward_backward(k, ctx, gg):
    # The backward is linear in grad and its adjoint is the forward: a 2x2 average pool again.
    return k.downsample2x(gg), None, None


def downsample2x_triton(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"downsample2x: needs [N, C, H, W], got {tuple(x.shape)}")
    return _downsample2x_op(x)


# fade_reals -------------------------------------------------------------------------------------

@torch.library.custom_op("progan_fast::fade_reals", mutates_args=(), device_types=("cpu", "cuda"))
def _fade_reals_op(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    _triton.check_device("fade_reals", x, alpha)
    _check_size("fade_reals", x)
    x = x.contiguous()
    out = torch.empty_like(x)
    n_low = x.numel() // 4
    _launch(_fade_reals_kernel, (x, alpha, out, n_low, x.shape[-1] // 2), n_low, x)
    return out


@_fade_reals_op.register_fake
def _fade_reals_op_fake(x, alpha):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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
        d_alpha = _dot(grad, x - k.fade_reals(x, torch.zeros_like(alpha)), alpha)
    return d_x, d_alpha


def fade_reals_triton(x: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"fade_reals: needs [N, C, H, W] with even H and W, got {tuple(x.shape)}")
    return _fade_reals_op(x, _triton.scalar_tensor(alpha, x))


def _register_autograd(k) -> None:
    """First and second derivatives of one set of ops (Triton's or the native library's): ``k`` has
    ``fade_in``, ``fade_in_backward``, ``blend``, ``blend_backward``, ``downsample2x``,
    ``downsample2x_backward`` and ``fade_reals``."""
    reg = torch.library.register_autograd
    reg(k.fade_in, functools.partial(_fade_in_backward, k), setup_context=_fade_in_setup)
    reg(k.fade_in_backward, functools.partial(_fade_in_backward_backward, k), setup_context=_fade_in_backward_setup)
    reg(k.blend, functools.partial(_blend_backward, k), setup_context=_blend_setup)
    reg(k.blend_backward, functools.partial(_blend_backward_backward, k), setup_context=_blend_backward_setup)
    reg(k.downsample2x, functools.partial(_downsample2x_backward, k), setup_context=_downsample2x_setup)
    reg(k.downsample2x_backward, functools.partial(_downsample2x_backward_backward, k),
        setup_context=lambda ctx, inputs, output: None)
    reg(k.fade_reals, functools.partial(_fade_reals_backward, k), setup_context=_fade_reals_setup)


_register_autograd(SimpleNamespace(
    fade_in=_fade_in_op, fade_in_backward=_fade_in_backward_op, blend=_blend_op, blend_backward=_blend_backward_op,
    downsample2x=_downsample2x_op, downsample2x_backward=_downsample2x_backward_op, fade_reals=_fade_reals_op))

if _triton.available():
    FADE_IN_IMPLEMENTATIONS["triton"] = fade_in_triton
    BLEND_IMPLEMENTATIONS["triton"] = blend_triton
    DOWNSAMPLE_IMPLEMENTATIONS["triton"] = downsample2x_triton
    FADE_REALS_IMPLEMENTATIONS["triton"] = fade_reals_triton


# ----- native backend (progan_fast._C: C++ CPU twins, CUDA kernels) ------------------------------
#
# ``progan_fast_native::`` ops with the Triton ops' signatures and algorithms (one pass each; alpha
# a 0-dim tensor read in-kernel) in kernels/cuda/fade_in.cu and kernels/cpu/fade_in.cpp; autograd,
# second order included, is the Triton ops' (each backward's adjoint is a forward op).

_NATIVE_NAMES = ("fade_in", "fade_in_backward", "blend", "blend_backward", "downsample2x", "downsample2x_backward",
                 "fade_reals")

if _native.available():
    NATIVE = SimpleNamespace(**{name: getattr(_native.ops, name).default for name in _NATIVE_NAMES})
    for _name, _fake in zip(_NATIVE_NAMES, (_fade_in_op_fake, _fade_in_backward_op_fake, _blend_op_fake,
                                            _blend_backward_op_fake, _downsample2x_op_fake,
                                            _downsample2x_backward_op_fake, _fade_reals_op_fake)):
        torch.library.register_fake(getattr(NATIVE, _name), _fake)
    _register_autograd(NATIVE)


def fade_in_native(low: torch.Tensor, high: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return NATIVE.fade_in(low, high, _triton.scalar_tensor(alpha, high))


def blend_native(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return NATIVE.blend(old, new, _triton.scalar_tensor(alpha, new))


def downsample2x_native(x: torch.Tensor) -> torch.Tensor:
    return NATIVE.downsample2x(x)


def fade_reals_native(x: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    return NATIVE.fade_reals(x, _triton.scalar_tensor(alpha, x))


_native.register(FADE_IN_IMPLEMENTATIONS, fade_in_native)
_native.register(BLEND_IMPLEMENTATIONS, blend_native)
_native.register(DOWNSAMPLE_IMPLEMENTATIONS, downsample2x_native)
_native.register(FADE_REALS_IMPLEMENTATIONS, fade_reals_native)
