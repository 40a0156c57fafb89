"""Triton kernels of fade_in and fade_reals (see :mod:`progan_fast.ops.fade_in`).

- ``fade_in``: reads ``low`` once and ``high`` once, writes the output once; nothing upsampled is
  ever written. Its backward (``fade_in_backward``) makes one pass over the incoming gradient and
  writes ``d_high = g * alpha`` and ``d_low = (1 - alpha) * sum of g over the 2x2 block``.
- ``fade_reals``: reads each 2x2 block once, averages it, blends each of its pixels with the
  average and writes them once. The op is its own adjoint, so it needs no backward kernel.

Both blend with ``_lerp`` (torch.lerp's formula, see :mod:`.elementwise`) and load ``alpha``
from a 0-dim tensor, so a CUDA graph replays with whatever the tensor holds.

Layouts (``ops/common.py``): every tensor of a launch is dense NCHW, or every one dense NHWC. An
index ``i`` runs over the low-resolution tensor in its memory order, and ``CS``, the element
stride of a pixel, is a plain int: 1 in NCHW (``i`` is ``(plane, row, column)``, ``plane = n * C +
c``) and ``C`` in NHWC (``i`` is ``(n, row, column, c)``). The full-resolution offsets are the
NCHW formula in pixels times ``CS`` plus the channel, so in NHWC neighbouring lanes load and store
neighbouring channels, contiguous. Triton specializes an int argument equal to 1, so the NCHW
compilation does no channel arithmetic.
"""

from __future__ import annotations

import torch

from . import aot_specs_for_configs, tl, triton
from .elementwise import GPU_CONFIGS_2X2, _lerp, autotune, launch

if triton is not None:

    @triton.jit
    def _fade_in_fwd_kernel(low_ptr, high_ptr, alpha_ptr, out_ptr, n_low, Wl, CS, BLOCK: tl.constexpr,
                            ACC: tl.constexpr):
        # out[2r + dy, 2w + dx] = lerp(low[r, w], high[2r + dy, 2w + dx], alpha), r = (n, c, h) flattened
        # (NCHW) or r = (n, h) with the channel i % CS innermost (NHWC).
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_low
        j = tl.arange(0, 2)
        W = 2 * Wl
        q = i // CS  # the low-resolution pixel (with its plane in NCHW)
        top = ((q // Wl) * (2 * W) + (q % Wl) * 2) * CS + i % CS
        offs = top[:, None] + j[None, :] * CS
        mask2 = mask[:, None] & (j[None, :] < 2)
        alpha = tl.load(alpha_ptr).to(ACC)
        lo = tl.load(low_ptr + i, mask=mask, other=0.0).to(ACC)[:, None]
        h0 = tl.load(high_ptr + offs, mask=mask2, other=0.0).to(ACC)
        h1 = tl.load(high_ptr + offs + W * CS, mask=mask2, other=0.0).to(ACC)
        tl.store(out_ptr + offs, _lerp(lo, h0, alpha).to(out_ptr.dtype.element_ty), mask=mask2)
        tl.store(out_ptr + offs + W * CS, _lerp(lo, h1, alpha).to(out_ptr.dtype.element_ty), mask=mask2)

    @triton.jit
    def _fade_in_bwd_kernel(g_ptr, alpha_ptr, dlow_ptr, dhigh_ptr, n_low, Wl, CS, BLOCK: tl.constexpr,
                            ACC: tl.constexpr):
        # d_high = g * alpha; d_low = (sum of g over the 2x2 block) * (1 - alpha).
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_low
        j = tl.arange(0, 2)
        W = 2 * Wl
        q = i // CS  # the low-resolution pixel (with its plane in NCHW)
        top = ((q // Wl) * (2 * W) + (q % Wl) * 2) * CS + i % CS
        offs = top[:, None] + j[None, :] * CS
        mask2 = mask[:, None] & (j[None, :] < 2)
        alpha = tl.load(alpha_ptr).to(ACC)
        g0 = tl.load(g_ptr + offs, mask=mask2, other=0.0).to(ACC)
        g1 = tl.load(g_ptr + offs + W * CS, mask=mask2, other=0.0).to(ACC)
        tl.store(dhigh_ptr + offs, (g0 * alpha).to(dhigh_ptr.dtype.element_ty), mask=mask2)
        tl.store(dhigh_ptr + offs + W * CS, (g1 * alpha).to(dhigh_ptr.dtype.element_ty), mask=mask2)
        dlow = (tl.sum(g0, axis=1) + tl.sum(g1, axis=1)) * (1.0 - alpha)
        tl.store(dlow_ptr + i, dlow.to(dlow_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fade_reals_kernel(x_ptr, alpha_ptr, out_ptr, n_low, Wl, CS, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # out = lerp(mean of the 2x2 block, x, alpha) for every pixel of each block: one read, one write.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_low
        j = tl.arange(0, 2)
        W = 2 * Wl
        q = i // CS  # the low-resolution pixel (with its plane in NCHW)
        top = ((q // Wl) * (2 * W) + (q % Wl) * 2) * CS + i % CS
        offs = top[:, None] + j[None, :] * CS
        mask2 = mask[:, None] & (j[None, :] < 2)
        alpha = tl.load(alpha_ptr).to(ACC)
        x0 = tl.load(x_ptr + offs, mask=mask2, other=0.0).to(ACC)
        x1 = tl.load(x_ptr + offs + W * CS, mask=mask2, other=0.0).to(ACC)
        mean = ((tl.sum(x0, axis=1) + tl.sum(x1, axis=1)) * 0.25)[:, None]
        tl.store(out_ptr + offs, _lerp(mean, x0, alpha).to(out_ptr.dtype.element_ty), mask=mask2)
        tl.store(out_ptr + offs + W * CS, _lerp(mean, x1, alpha).to(out_ptr.dtype.element_ty), mask=mask2)

    _fade_in_fwd_tuned = autotune(_fade_in_fwd_kernel, "n_low", GPU_CONFIGS_2X2)
    _fade_in_bwd_tuned = autotune(_fade_in_bwd_kernel, "n_low", GPU_CONFIGS_2X2)
    _fade_reals_tuned = autotune(_fade_reals_kernel, "n_low", GPU_CONFIGS_2X2)

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    AOT_SPECS = (
        aot_specs_for_configs("fade_in_fwd", _fade_in_fwd_kernel,
                              {"low_ptr": "*T", "high_ptr": "*T", "alpha_ptr": "*fp32", "out_ptr": "*T",
                               "n_low": "i32", "Wl": "i32", "CS": "i32"}, GPU_CONFIGS_2X2)
        + aot_specs_for_configs("fade_in_bwd", _fade_in_bwd_kernel,
                                {"g_ptr": "*T", "alpha_ptr": "*fp32", "dlow_ptr": "*T", "dhigh_ptr": "*T",
                                 "n_low": "i32", "Wl": "i32", "CS": "i32"}, GPU_CONFIGS_2X2)
        + aot_specs_for_configs("fade_reals", _fade_reals_kernel,
                                {"x_ptr": "*T", "alpha_ptr": "*fp32", "out_ptr": "*T", "n_low": "i32", "Wl": "i32",
                                 "CS": "i32"}, GPU_CONFIGS_2X2)
    )
else:
    AOT_SPECS = []


def _pixel_stride(t: torch.Tensor, channels_last: bool) -> int:
    return t.shape[1] if channels_last else 1


def fade_in_forward(low: torch.Tensor, high: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
                    channels_last: bool = False) -> None:
    """``out = lerp(up2x(low), high, alpha)``: tensors all dense NCHW, or all dense NHWC with
    ``channels_last``; ``alpha`` 0-dim."""
    launch(_fade_in_fwd_kernel, _fade_in_fwd_tuned,
           (low, high, alpha, out, low.numel(), low.shape[-1], _pixel_stride(low, channels_last)), low.numel(), high)


def fade_in_backward(grad: torch.Tensor, alpha: torch.Tensor, d_low: torch.Tensor, d_high: torch.Tensor,
                     channels_last: bool = False) -> None:
    """``d_high = grad * alpha`` and ``d_low = (1 - alpha) * (sum of grad over each 2x2 block)``, all
    in one layout (``channels_last``)."""
    launch(_fade_in_bwd_kernel, _fade_in_bwd_tuned,
           (grad, alpha, d_low, d_high, d_low.numel(), d_low.shape[-1], _pixel_stride(grad, channels_last)),
           d_low.numel(), grad)


def fade_reals_forward(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor, channels_last: bool = False) -> None:
    """``out = lerp(up2x(down2x(x)), x, alpha)``: even H and W, ``x`` and ``out`` both dense NCHW, or
    both dense NHWC with ``channels_last``."""
    n_low = x.numel() // 4
    launch(_fade_reals_kernel, _fade_reals_tuned,
           (x, alpha, out, n_low, x.shape[-1] // 2, _pixel_stride(x, channels_last)), n_low, x)
