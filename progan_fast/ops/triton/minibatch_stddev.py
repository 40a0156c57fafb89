"""Triton kernels of minibatch_stddev (see :mod:`progan_fast.ops.minibatch_stddev`).

F = C*H*W features per sample, statistics in float32 (float64 for float64 input); group m holds
the samples ``i = g*M + m`` (G members, M groups).

Layouts (the constexpr ``CL``): ``x`` and ``dx`` are dense NCHW or dense NHWC and every kernel walks
a sample's F features in MEMORY order, ``k = c*P + p`` in NCHW and ``k = p*C + c`` in NHWC, so the
loads of ``x`` are contiguous in both (in NHWC, over channels) and the statistic is the same sum in
another order. The output rows (and the output gradient's) hold F + P values: feature ``k`` sits at
``k`` in NCHW and at ``k + k // C`` in NHWC (each pixel's C features, then its stat value), the stat
value of pixel ``p`` at ``F + p`` in NCHW and at ``p*(C+1) + C`` in NHWC.

Forward, two kernels, one read of ``x`` from DRAM:

1. one program per (group m, block of BLOCK_F features): walks the group's G members, copying
   ``x[i]`` into ``out[i, :C]`` as it goes and summing for the mean, then walks them again (from
   cache) for the biased variance, and writes the block's sums of ``sqrt(var + eps)`` into a small
   ``[M, ceil(F / 256)]`` scratch buffer -- one slot per 256 features whatever BLOCK_F autotuning
   picks, each slot written by exactly one program, so there are no atomics and the result is
   deterministic;
2. one program per group: adds the group's partial sums, divides by F and writes the value to the
   last channel of its G members.

Backward, two kernels: ``ds_m`` (the upstream gradient of group m's value) is the sum of
``grad[i, C, :, :]`` over the group's members (kernel 1, one program per group); kernel 2, one
program per (group, block of features), recomputes each feature's group mean and stddev from ``x``
and writes ``dx[i, f] = grad[i, f] + ds_m * (x[i, f] - mean_f) / (G * F * sqrt(var_f + eps))``.
"""

from __future__ import annotations

import torch

from . import aot_specs_for_configs, compute_dtype, on_interpreter, tl, triton

#: Granularity of the forward's partial sums: kernel 1 writes one float per PART features of a
#: group, whatever its (autotuned) BLOCK_F, so the partial buffer's layout -- and what kernel 2
#: reduces -- does not depend on the configuration autotuning picks.
_PART = 256

if triton is not None:

    @triton.jit
    def _out_feature(k, C, CL: tl.constexpr):
        # Offset in an output row of the input feature at memory position k (see the module docstring).
        if CL:
            return k + k // C
        else:
            return k

    @triton.jit
    def _out_stat(p, F, C, CL: tl.constexpr):
        # Offset in an output row of pixel p's stat value.
        if CL:
            return p * (C + 1) + C
        else:
            return F + p

    @triton.jit
    def _mbstd_fwd_kernel(x_ptr, out_ptr, part_ptr, F, P, C, M, G, NB, eps,
                          BLOCK_F: tl.constexpr, PART: tl.constexpr, ACC: tl.constexpr, CL: tl.constexpr):
        # Program (m, b): features [b*BLOCK_F, (b+1)*BLOCK_F) of group m, i.e. of samples g*M + m.
        m = tl.program_id(0)
        blk = tl.program_id(1)
        f = blk * BLOCK_F + tl.arange(0, BLOCK_F)
        f_mask = f < F
        fo = _out_feature(f, C, CL)
        total = tl.zeros([BLOCK_F], dtype=ACC)
        for g in range(0, G):
            i = (g * M + m).to(tl.int64)
            xv = tl.load(x_ptr + i * F + f, mask=f_mask, other=0.0)
            tl.store(out_ptr + i * (F + P) + fo, xv, mask=f_mask)    # out[i, :C] = x[i]
            total += xv.to(ACC)
        mean = total / G
        var = tl.zeros([BLOCK_F], dtype=ACC)
        for g in range(0, G):                                         # second read: from cache
            i = (g * M + m).to(tl.int64)
            d = tl.load(x_ptr + i * F + f, mask=f_mask, other=0.0).to(ACC) - mean
            var += d * d
        sd = tl.where(f_mask, tl.sqrt(var / G + eps), 0.0)
        parts = tl.sum(tl.reshape(sd, [BLOCK_F // PART, PART]), axis=1)
        slot = blk * (BLOCK_F // PART) + tl.arange(0, BLOCK_F // PART)
        tl.store(part_ptr + m.to(tl.int64) * NB + slot, parts, mask=slot < NB)

    @triton.jit
    def _mbstd_stat_kernel(part_ptr, out_ptr, F, P, C, M, G, NB, BLOCK: tl.constexpr, ACC: tl.constexpr,
                           CL: tl.constexpr):
        # Program m: stat = mean over the F features of group m's stddevs (the sum of its partials / F),
        # written to out[i, C, :, :] for the G members i = g*M + m.
        m = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for b0 in range(0, NB, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + m.to(tl.int64) * NB + b, mask=b < NB, other=0.0)
        stat = tl.sum(acc, axis=0) / F
        vals = (tl.zeros([BLOCK], dtype=ACC) + stat).to(out_ptr.dtype.element_ty)
        for g in range(0, G):
            base = (g * M + m).to(tl.int64) * (F + P)
            for p0 in range(0, P, BLOCK):
                p = p0 + tl.arange(0, BLOCK)
                tl.store(out_ptr + base + _out_stat(p, F, C, CL), vals, mask=p < P)

    @triton.jit
    def _mbstd_gsum_kernel(grad_ptr, gs_ptr, F, P, C, M, G, BLOCK: tl.constexpr, ACC: tl.constexpr,
                           CL: tl.constexpr):
        # Program m: gs[m] = sum of grad[i, C, :, :] over the members i = g*M + m of group m.
        m = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            base = (g * M + m).to(tl.int64) * (F + P)
            for p0 in range(0, P, BLOCK):
                p = p0 + tl.arange(0, BLOCK)
                acc += tl.load(grad_ptr + base + _out_stat(p, F, C, CL), mask=p < P, other=0.0).to(ACC)
        tl.store(gs_ptr + m, tl.sum(acc, axis=0))

    @triton.jit
    def _mbstd_bwd_kernel(grad_ptr, x_ptr, gs_ptr, dx_ptr, F, P, C, M, G, eps,
                          BLOCK_F: tl.constexpr, ACC: tl.constexpr, CL: tl.constexpr):
        # dx[i, f] = grad[i, f] + gs[m] * (x[i, f] - mean_f) / (G * F * sqrt(var_f + eps)).
        m = tl.program_id(0)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        f_mask = f < F
        fo = _out_feature(f, C, CL)
        total = tl.zeros([BLOCK_F], dtype=ACC)
        for g in range(0, G):
            i = (g * M + m).to(tl.int64)
            total += tl.load(x_ptr + i * F + f, mask=f_mask, other=0.0).to(ACC)
        mean = total / G
        var = tl.zeros([BLOCK_F], dtype=ACC)
        for g in range(0, G):
            i = (g * M + m).to(tl.int64)
            d = tl.load(x_ptr + i * F + f, mask=f_mask, other=0.0).to(ACC) - mean
            var += d * d
        gs = tl.load(gs_ptr + m)
        coef = (gs / G / F) / tl.sqrt(var / G + eps)
        for g in range(0, G):
            i = (g * M + m).to(tl.int64)
            xv = tl.load(x_ptr + i * F + f, mask=f_mask, other=0.0).to(ACC)
            gv = tl.load(grad_ptr + i * (F + P) + fo, mask=f_mask, other=0.0).to(ACC)
            tl.store(dx_ptr + i * F + f, (gv + coef * (xv - mean)).to(dx_ptr.dtype.element_ty), mask=f_mask)

    # Feature-block kernels (fwd kernel 1, bwd elementwise): BLOCK_F is a multiple of _PART.
    _GPU_CONFIGS_F = [
        triton.Config({"BLOCK_F": bf}, num_warps=w)
        for bf, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]
    ]
    # The forward at most 4 features a thread: with 8 (1024 on 4 warps, 2048 on 8), compiled with
    # the launch's divisibility-16 specialization, fp32 NCHW needs a 16-byte stack frame on sm_80
    # (triton 3.9); with twice the warps it needs none.
    _GPU_CONFIGS_F_FWD = [
        triton.Config({"BLOCK_F": bf}, num_warps=w)
        for bf, w in [(256, 2), (512, 4), (1024, 8), (2048, 16)]
    ]
    # Small reductions over the partials / over the last-channel gradient.
    _GPU_CONFIGS_R = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(128, 1), (512, 4)]]
    _mbstd_fwd_tuned = triton.autotune(_GPU_CONFIGS_F_FWD, key=["F", "M", "G", "CL"])(_mbstd_fwd_kernel)
    _mbstd_stat_tuned = triton.autotune(_GPU_CONFIGS_R, key=["P", "M", "G", "NB", "CL"])(_mbstd_stat_kernel)
    _mbstd_gsum_tuned = triton.autotune(_GPU_CONFIGS_R, key=["P", "M", "G", "CL"])(_mbstd_gsum_kernel)
    _mbstd_bwd_tuned = triton.autotune(_GPU_CONFIGS_F, key=["F", "M", "G", "CL"])(_mbstd_bwd_kernel)

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    #: Each once per layout (CL False: NCHW, True: NHWC).
    _I = {"F": "i32", "P": "i32", "C": "i32", "M": "i32"}
    AOT_SPECS = [
        spec
        for cl in (False, True)
        for spec in (
            aot_specs_for_configs(
                "mbstd_fwd", _mbstd_fwd_kernel,
                {"x_ptr": "*T", "out_ptr": "*T", "part_ptr": "*fp32", **_I, "G": "i32", "NB": "i32", "eps": "fp32"},
                _GPU_CONFIGS_F_FWD, {"PART": _PART, "CL": cl})
            + aot_specs_for_configs(
                "mbstd_stat", _mbstd_stat_kernel,
                {"part_ptr": "*fp32", "out_ptr": "*T", **_I, "G": "i32", "NB": "i32"},
                _GPU_CONFIGS_R, {"CL": cl})
            + aot_specs_for_configs(
                "mbstd_gsum", _mbstd_gsum_kernel, {"grad_ptr": "*T", "gs_ptr": "*fp32", **_I, "G": "i32"},
                _GPU_CONFIGS_R, {"CL": cl})
            + aot_specs_for_configs(
                "mbstd_bwd", _mbstd_bwd_kernel,
                {"grad_ptr": "*T", "x_ptr": "*T", "gs_ptr": "*fp32", "dx_ptr": "*T",
                 **_I, "G": "i32", "eps": "fp32"},
                _GPU_CONFIGS_F, {"CL": cl})
        )
    ]
else:
    AOT_SPECS = []


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _interp_block_f(f: int) -> int:
    return max(_PART, min(4096, triton.next_power_of_2(f)))


def _interp_block(k: int) -> int:
    return min(1024, triton.next_power_of_2(max(1, k)))


def minibatch_stddev_forward(x: torch.Tensor, out: torch.Tensor, g: int, eps: float, channels_last: bool) -> None:
    """``out`` ``[N, C + 1, H, W]`` for ``x`` ``[N, C, H, W]`` in groups of ``g`` (which divides N), both
    dense NCHW or both dense NHWC (``channels_last``); C*H*W > 0 and ``out`` non-empty."""
    n, c, h, w = x.shape
    p, m = h * w, n // g
    f = c * p
    nb = triton.cdiv(f, _PART)
    part = torch.empty(m, nb, device=x.device, dtype=_acc_dtype(x))
    acc = compute_dtype(x)
    cl = bool(channels_last)
    if on_interpreter(x):
        bf = _interp_block_f(f)
        _mbstd_fwd_kernel[(m, triton.cdiv(f, bf))](x, out, part, f, p, c, m, g, nb, eps,
                                                   BLOCK_F=bf, PART=_PART, ACC=acc, CL=cl)
        _mbstd_stat_kernel[(m,)](part, out, f, p, c, m, g, nb, BLOCK=_interp_block(max(nb, p)), ACC=acc, CL=cl)
    else:
        _mbstd_fwd_tuned[lambda meta: (m, triton.cdiv(f, meta["BLOCK_F"]))](
            x, out, part, f, p, c, m, g, nb, eps, PART=_PART, ACC=acc, CL=cl)
        _mbstd_stat_tuned[(m,)](part, out, f, p, c, m, g, nb, ACC=acc, CL=cl)


def minibatch_stddev_backward(grad: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, g: int, eps: float,
                              channels_last: bool) -> None:
    """``dx`` (like ``x``) for the output gradient ``grad`` ``[N, C + 1, H, W]``; all three dense NCHW or
    all dense NHWC (``channels_last``), non-empty."""
    n, c, h, w = x.shape
    p, m = h * w, n // g
    f = c * p
    gs = torch.empty(m, device=x.device, dtype=_acc_dtype(x))
    acc = compute_dtype(x)
    cl = bool(channels_last)
    if on_interpreter(x):
        bf = _interp_block_f(f)
        _mbstd_gsum_kernel[(m,)](grad, gs, f, p, c, m, g, BLOCK=_interp_block(p), ACC=acc, CL=cl)
        _mbstd_bwd_kernel[(m, triton.cdiv(f, bf))](grad, x, gs, dx, f, p, c, m, g, eps, BLOCK_F=bf, ACC=acc, CL=cl)
    else:
        _mbstd_gsum_tuned[(m,)](grad, gs, f, p, c, m, g, ACC=acc, CL=cl)
        _mbstd_bwd_tuned[lambda meta: (m, triton.cdiv(f, meta["BLOCK_F"]))](
            grad, x, gs, dx, f, p, c, m, g, eps, ACC=acc, CL=cl)
