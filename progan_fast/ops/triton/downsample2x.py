"""Triton kernels of downsample2x (see :mod:`progan_fast.ops.downsample2x`).

The forward is one pass over the input, reading each 2x2 block as two rows of adjacent pairs (an
odd last row/column is ignored, as ``avg_pool2d`` does); the backward (``downsample2x_backward``)
is one pass writing each input pixel's ``grad / 4`` (a nearest upsample; 0 in an odd last
row/column).

Layouts (``ops/common.py``): input and output are both dense NCHW or both dense NHWC. The kernels
index in the output's (forward) or ``dx``'s (backward) memory order, with ``CS``, the element
stride of a pixel, as a plain int: 1 in NCHW (an index is ``(plane, row, column)``, ``plane = n * C
+ c``) and ``C`` in NHWC (an index is ``(n, row, column, c)``, so neighbouring lanes load
neighbouring channels, contiguous). Triton specializes an int argument equal to 1, so the NCHW
compilation does no channel arithmetic.
"""

from __future__ import annotations

import torch

from . import aot_specs_for_configs, tl, triton
from .elementwise import GPU_CONFIGS, GPU_CONFIGS_2X2, autotune, launch

if triton is not None:

    @triton.jit
    def _downsample_fwd_kernel(x_ptr, y_ptr, n_out, Ho, Wo, H, W, CS, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # y[plane, ho, wo] = mean of x[plane, 2ho:2ho+2, 2wo:2wo+2]; an odd last row/column of x is
        # unused. NCHW: CS = 1, plane = (n, c). NHWC: CS = C, plane = n, and the channel c = i % CS
        # is the innermost index of both tensors.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_out
        j = tl.arange(0, 2)
        c = i % CS
        q = i // CS
        r = q // Wo
        top = (((r // Ho) * H + (r % Ho) * 2) * W + (q % Wo) * 2) * CS + c
        offs = top[:, None] + j[None, :] * CS
        mask2 = mask[:, None] & (j[None, :] < 2)
        x0 = tl.load(x_ptr + offs, mask=mask2, other=0.0).to(ACC)
        x1 = tl.load(x_ptr + offs + W * CS, mask=mask2, other=0.0).to(ACC)
        y = (tl.sum(x0, axis=1) + tl.sum(x1, axis=1)) * 0.25
        tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _downsample_bwd_kernel(g_ptr, dx_ptr, n_in, Ho, Wo, H, W, CS, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # dx[plane, h, w] = g[plane, h // 2, w // 2] / 4 (0 in an odd last row/column), one pass over
        # dx in its memory order; CS as in the forward.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_in
        c = i % CS
        q = i // CS
        w = q % W
        r = q // W
        h = r % H
        src = (((r // H) * Ho + h // 2) * Wo + w // 2) * CS + c
        valid = mask & (h < 2 * Ho) & (w < 2 * Wo)
        g = tl.load(g_ptr + src, mask=valid, other=0.0).to(ACC)
        tl.store(dx_ptr + i, (g * 0.25).to(dx_ptr.dtype.element_ty), mask=mask)

    _downsample_fwd_tuned = autotune(_downsample_fwd_kernel, "n_out", GPU_CONFIGS_2X2)
    _downsample_bwd_tuned = autotune(_downsample_bwd_kernel, "n_in", GPU_CONFIGS)

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    _SIZES = {"Ho": "i32", "Wo": "i32", "H": "i32", "W": "i32", "CS": "i32"}
    AOT_SPECS = (
        aot_specs_for_configs("downsample2x_fwd", _downsample_fwd_kernel,
                              {"x_ptr": "*T", "y_ptr": "*T", "n_out": "i32", **_SIZES}, GPU_CONFIGS_2X2)
        + aot_specs_for_configs("downsample2x_bwd", _downsample_bwd_kernel,
                                {"g_ptr": "*T", "dx_ptr": "*T", "n_in": "i32", **_SIZES}, GPU_CONFIGS)
    )
else:
    AOT_SPECS = []


def _pixel_stride(t: torch.Tensor, channels_last: bool) -> int:
    return t.shape[1] if channels_last else 1


def downsample2x_forward(x: torch.Tensor, y: torch.Tensor, channels_last: bool = False) -> None:
    """``y`` ``[N, C, H // 2, W // 2]``: the 2x2 means of ``x`` ``[N, C, H, W]`` (both dense NCHW, or
    both dense NHWC with ``channels_last``)."""
    h, w = x.shape[-2:]
    cs = _pixel_stride(x, channels_last)
    launch(_downsample_fwd_kernel, _downsample_fwd_tuned, (x, y, y.numel(), h // 2, w // 2, h, w, cs), y.numel(), x)


def downsample2x_backward(grad: torch.Tensor, dx: torch.Tensor, channels_last: bool = False) -> None:
    """``dx`` ``[N, C, H, W]``: ``grad / 4`` upsampled 2x, nearest (both dense NCHW, or both dense
    NHWC with ``channels_last``)."""
    ho, wo = grad.shape[-2:]
    height, width = dx.shape[-2:]
    cs = _pixel_stride(dx, channels_last)
    launch(_downsample_bwd_kernel, _downsample_bwd_tuned, (grad, dx, dx.numel(), ho, wo, height, width, cs),
           dx.numel(), grad)
