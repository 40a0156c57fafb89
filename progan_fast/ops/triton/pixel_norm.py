"""Triton kernels of pixel_norm (see :mod:`progan_fast.ops.pixel_norm`).

One program per (sample, block of pixels) walks the channels twice: the sum of squares, then the
scaling. The backward walks them twice too (``sum(x^2)`` and ``sum(dy * x)``, then
``dx = r * dy - x * r^3 * sum(dy * x) / C`` with ``r = rsqrt(mean(x^2) + eps)``).

Layouts: the kernels address the ``[N, C, P]`` view through its element strides ``(sn, sc, sp)``
(:func:`progan_fast.ops.common.ncp_strides`), passed as plain ints: Triton specializes an int
argument equal to 1, so in NCHW (``sp == 1``) each ``[BLOCK_C, BLOCK_P]`` tile is contiguous
over pixels and in NHWC (``sc == 1``) over channels, and the reduction over channels reads
contiguous memory. Every tensor of one call shares the strides (the wrapper brings them to one
layout). ``AOT_SPECS`` compiles both specializations.
"""

from __future__ import annotations

import torch

from ..common import ncp_strides
from . import aot_specs_for_configs, compute_dtype, on_interpreter, tl, triton

if triton is not None:

    @triton.jit
    def _pixel_norm_fwd_kernel(x_ptr, y_ptr, C, P, sn, sc, sp, eps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                               ACC: tl.constexpr):
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        base = n.to(tl.int64) * sn
        acc = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * sc + p[None, :] * sp
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            acc += tl.sum(x * x, axis=0)
        r = 1.0 / tl.sqrt(acc / C + eps)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * sc + p[None, :] * sp
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(y_ptr + offs, (x * r[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pixel_norm_bwd_kernel(dy_ptr, x_ptr, dx_ptr, C, P, sn, sc, sp, eps, BLOCK_C: tl.constexpr,
                               BLOCK_P: tl.constexpr, ACC: tl.constexpr):
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        base = n.to(tl.int64) * sn
        sum_xx = tl.zeros([BLOCK_P], dtype=ACC)
        sum_dyx = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * sc + p[None, :] * sp
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            sum_xx += tl.sum(x * x, axis=0)
            sum_dyx += tl.sum(dy * x, axis=0)
        r = 1.0 / tl.sqrt(sum_xx / C + eps)
        k = r * r * r * sum_dyx / C
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * sc + p[None, :] * sp
            mask = (c[:, None] < C) & p_mask[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            dx = r[None, :] * dy - x * k[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    _GPU_CONFIGS = [
        triton.Config({"BLOCK_C": bc, "BLOCK_P": bp}, num_warps=w)
        for bc, bp, w in [(16, 64, 2), (32, 64, 4), (16, 128, 4), (32, 128, 4), (8, 256, 4), (16, 256, 8)]
    ]
    # NHWC (channels contiguous): the same tiles less (32, 128, 4 warps), whose backward spills on
    # sm_90 in bf16 (8 bytes) with the channel stride 1.
    _GPU_CONFIGS_CL = [c for c in _GPU_CONFIGS
                       if (c.kwargs["BLOCK_C"], c.kwargs["BLOCK_P"], c.num_warps) != (32, 128, 4)]
    _CONFIGS = {False: _GPU_CONFIGS, True: _GPU_CONFIGS_CL}
    _pixel_norm_fwd_tuned, _pixel_norm_fwd_tuned_cl = (
        triton.autotune(_CONFIGS[cl], key=["C", "P"])(_pixel_norm_fwd_kernel) for cl in (False, True))
    _pixel_norm_bwd_tuned, _pixel_norm_bwd_tuned_cl = (
        triton.autotune(_CONFIGS[cl], key=["C", "P"])(_pixel_norm_bwd_kernel) for cl in (False, True))

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90:
    #: each config of each layout, with the stride that is 1 there a constant, as the JIT
    #: specializes it (NCHW: sp; NHWC "-cl": sc).
    AOT_SPECS = []
    for _tag, _unit, _cl in (("", "sp", False), ("-cl", "sc", True)):
        _SIG = {"C": "i32", "P": "i32", **{s: "i32" for s in ("sn", "sc", "sp") if s != _unit}, "eps": "fp32"}
        AOT_SPECS += aot_specs_for_configs(
            f"pixel_norm_fwd{_tag}", _pixel_norm_fwd_kernel, {"x_ptr": "*T", "y_ptr": "*T", **_SIG}, _CONFIGS[_cl],
            {_unit: 1},
        ) + aot_specs_for_configs(
            f"pixel_norm_bwd{_tag}", _pixel_norm_bwd_kernel, {"dy_ptr": "*T", "x_ptr": "*T", "dx_ptr": "*T", **_SIG},
            _CONFIGS[_cl], {_unit: 1},
        )
else:
    AOT_SPECS = []


def _launch(kernel, tuned, tensors, c: int, p: int, n: int, strides, eps: float, acc_like: torch.Tensor) -> None:
    """Runs ``kernel`` under the interpreter (fixed blocks), else its autotuned version ``tuned``."""
    acc = compute_dtype(acc_like)
    if on_interpreter(acc_like):
        block_c = min(64, triton.next_power_of_2(c))
        block_p = min(triton.next_power_of_2(p), 1024)
        kernel[(n, triton.cdiv(p, block_p))](*tensors, c, p, *strides, eps, BLOCK_C=block_c, BLOCK_P=block_p, ACC=acc)
    else:
        tuned[lambda meta: (n, triton.cdiv(p, meta["BLOCK_P"]))](*tensors, c, p, *strides, eps, ACC=acc)


def _sizes(x: torch.Tensor) -> tuple[int, int, int]:
    """``(N, C, P)``: samples, channels, pixels per channel of an ``[N, C, ...]`` tensor."""
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // max(1, n * c)


def pixel_norm_forward(x: torch.Tensor, y: torch.Tensor, eps: float, channels_last: bool = False) -> None:
    """``y = x * rsqrt(mean_c(x^2) + eps)``: non-empty tensors of the same shape, both dense NCHW
    (contiguous) or both dense NHWC (``channels_last``)."""
    n, c, p = _sizes(x)
    tuned = _pixel_norm_fwd_tuned_cl if channels_last else _pixel_norm_fwd_tuned
    _launch(_pixel_norm_fwd_kernel, tuned, (x, y), c, p, n, ncp_strides(c, p, channels_last), eps, x)


def pixel_norm_backward(grad: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, eps: float,
                        channels_last: bool = False) -> None:
    """``dx``: pixel norm's input gradient for the output gradient ``grad`` (non-empty, all three
    in one dense layout, as in :func:`pixel_norm_forward`)."""
    n, c, p = _sizes(x)
    tuned = _pixel_norm_bwd_tuned_cl if channels_last else _pixel_norm_bwd_tuned
    _launch(_pixel_norm_bwd_kernel, tuned, (grad, x, dx), c, p, n, ncp_strides(c, p, channels_last), eps, x)
