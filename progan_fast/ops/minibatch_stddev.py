"""Minibatch standard deviation layer (ProGAN paper, section 3; official ``minibatch_stddev_layer``).

The batch is split into groups; for each group the stddev of every feature over the group's
samples is averaged over channels and pixels into one number, which is appended to each sample
of that group as a constant extra feature map. It lets D see the variety of a batch, which
discourages mode collapse.

Grouping follows the official code: the batch is reshaped to ``[G, M, C, H, W]`` (G = group
size, M = N / G groups), so sample ``i`` belongs to group ``i mod M``.
The official code requires N to be divisible by the group size. Here the group shrinks to the
largest size <= ``group_size`` that divides N (so batch 6 uses groups of 3, a prime batch groups of
1, whose stddev is ``sqrt(eps)``): a user's batch never fails in D.

Backends:

- ``reference``: eager PyTorch.
- ``triton``: ``progan_fast::minibatch_stddev`` (forward) and ``progan_fast::minibatch_stddev_backward``,
  with F = C*H*W features per sample and statistics in float32 (float64 for float64 input).

  Forward, two kernels, one read of ``x`` from DRAM:

  1. one program per (group m, block of BLOCK_F features): walks the group's G members
     ``i = g*M + m``, copying ``x[i]`` into ``out[i, :C]`` as it goes and summing for the mean, then
     walks them again (from cache) for the biased variance, and writes the block's sums of
     ``sqrt(var + eps)`` into a small ``[M, ceil(F / 256)]`` scratch buffer -- one slot per 256
     features whatever BLOCK_F autotuning picks, each slot written by exactly one program, so
     there are no atomics and the result is deterministic;
  2. one program per group: adds the group's partial sums, divides by F and writes the value to the
     last channel of its G members.

  Backward, two kernels: ``ds_m`` (the upstream gradient of group m's value) is the sum of
  ``grad[i, C, :, :]`` over the group's members (kernel 1, one program per group); kernel 2, one
  program per (group, block of features), recomputes each feature's group mean and stddev from
  ``x`` and writes ``dx[i, f] = grad[i, f] + ds_m * (x[i, f] - mean_f) / (G * F * sqrt(var_f + eps))``.

  The op sits inside the WGAN-GP gradient penalty, so the backward op has its own autograd: its
  derivative (the second derivative of the layer) comes from differentiating the reference's
  first derivative in eager PyTorch (tiny at 4x4, where D uses the layer).
"""

from __future__ import annotations

import torch

import functools
from types import SimpleNamespace

from . import _backend, _native, _triton
from ._triton import tl, triton


def effective_group_size(batch: int, group_size: int = 4) -> int:
    """The largest group size <= ``group_size`` that divides ``batch``."""
    g = max(1, min(group_size, batch))
    while batch % g:
        g -= 1
    return g


def reference(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Eager reference. Statistics are computed in float32 (or float64 for float64 input)."""
    n, c, h, w = x.shape
    g = effective_group_size(n, group_size)
    y = x.reshape(g, n // g, c, h, w)
    y = y.to(torch.promote_types(x.dtype, torch.float32))
    y = y - y.mean(dim=0)                        # [G, M, C, H, W] deviation from the group mean
    y = (y.square().mean(dim=0) + eps).sqrt()    # [M, C, H, W] stddev over the group
    y = y.mean(dim=(1, 2, 3))                    # [M] averaged over features and pixels
    y = y.to(x.dtype).reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


IMPLEMENTATIONS = {"reference": reference}


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, backend: str | None = None) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` -> ``[N, C + 1, H, W]`` with the group stddev as the last channel."""
    return _backend.dispatch("minibatch_stddev", IMPLEMENTATIONS, backend, x, group_size)


# ----- Triton backend ---------------------------------------------------------------------------

#: Granularity of the forward's partial sums: kernel 1 writes one float per PART features of a
#: group, whatever its (autotuned) BLOCK_F, so the partial buffer's layout -- and what kernel 2
#: reduces -- does not depend on the configuration autotuning picks.
_PART = 256

if triton is not None:

    @triton.jit
    def _mbstd_fwd_kernel(x_ptr, out_ptr, part_ptr, F, P, M, G, NB, eps,
                          BLOCK_F: tl.constexpr, PART: tl.constexpr, ACC: tl.constexpr):
        # Program (m, b): features [b*BLOCK_F, (b+1)*BLOCK_F) of group m, i.e. of samples g*M + m.
        m = tl.program_id(0)
        blk = tl.program_id(1)
        f = blk * BLOCK_F + tl.arange(0, BLOCK_F)
        f_mask = f < F
        total = tl.zeros([BLOCK_F], dtype=ACC)
        for g in range(0, G):
            i = (g * M + m).to(tl.int64)
            xv = tl.load(x_ptr + i * F + f, mask=f_mask, other=0.0)
            tl.store(out_ptr + i * (F + P) + f, xv, mask=f_mask)     # out[i, :C] = x[i]
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
    def _mbstd_stat_kernel(part_ptr, out_ptr, F, P, M, G, NB, BLOCK: tl.constexpr, ACC: tl.constexpr):
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
            base = (g * M + m).to(tl.int64) * (F + P) + F
            for p0 in range(0, P, BLOCK):
                p = p0 + tl.arange(0, BLOCK)
                tl.store(out_ptr + base + p, vals, mask=p < P)

    @triton.jit
    def _mbstd_gsum_kernel(grad_ptr, gs_ptr, F, P, M, G, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # Program m: gs[m] = sum of grad[i, C, :, :] over the members i = g*M + m of group m.
        m = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            base = (g * M + m).to(tl.int64) * (F + P) + F
            for p0 in range(0, P, BLOCK):
                p = p0 + tl.arange(0, BLOCK)
                acc += tl.load(grad_ptr + base + p, mask=p < P, other=0.0).to(ACC)
        tl.store(gs_ptr + m, tl.sum(acc, axis=0))

    @triton.jit
    def _mbstd_bwd_kernel(grad_ptr, x_ptr, gs_ptr, dx_ptr, F, P, M, G, eps,
                          BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        # dx[i, f] = grad[i, f] + gs[m] * (x[i, f] - mean_f) / (G * F * sqrt(var_f + eps)).
        m = tl.program_id(0)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        f_mask = f < F
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
            gv = tl.load(grad_ptr + i * (F + P) + f, mask=f_mask, other=0.0).to(ACC)
            tl.store(dx_ptr + i * F + f, (gv + coef * (xv - mean)).to(dx_ptr.dtype.element_ty), mask=f_mask)

    # Feature-block kernels (fwd kernel 1, bwd elementwise): BLOCK_F is a multiple of _PART.
    _GPU_CONFIGS_F = [
        triton.Config({"BLOCK_F": bf}, num_warps=w)
        for bf, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]
    ]
    # Small reductions over the partials / over the last-channel gradient.
    _GPU_CONFIGS_R = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(128, 1), (512, 4)]]
    _mbstd_fwd_tuned = triton.autotune(_GPU_CONFIGS_F, key=["F", "M", "G"])(_mbstd_fwd_kernel)
    _mbstd_stat_tuned = triton.autotune(_GPU_CONFIGS_R, key=["P", "M", "G", "NB"])(_mbstd_stat_kernel)
    _mbstd_gsum_tuned = triton.autotune(_GPU_CONFIGS_R, key=["P", "M", "G"])(_mbstd_gsum_kernel)
    _mbstd_bwd_tuned = triton.autotune(_GPU_CONFIGS_F, key=["F", "M", "G"])(_mbstd_bwd_kernel)

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    _I = {"F": "i32", "P": "i32", "M": "i32"}
    AOT_SPECS = (
        _triton.aot_specs_for_configs(
            "mbstd_fwd", _mbstd_fwd_kernel,
            {"x_ptr": "*T", "out_ptr": "*T", "part_ptr": "*fp32", **_I, "G": "i32", "NB": "i32", "eps": "fp32"},
            _GPU_CONFIGS_F, {"PART": _PART})
        + _triton.aot_specs_for_configs(
            "mbstd_stat", _mbstd_stat_kernel, {"part_ptr": "*fp32", "out_ptr": "*T", **_I, "G": "i32", "NB": "i32"},
            _GPU_CONFIGS_R)
        + _triton.aot_specs_for_configs(
            "mbstd_gsum", _mbstd_gsum_kernel, {"grad_ptr": "*T", "gs_ptr": "*fp32", **_I, "G": "i32"},
            _GPU_CONFIGS_R)
        + _triton.aot_specs_for_configs(
            "mbstd_bwd", _mbstd_bwd_kernel,
            {"grad_ptr": "*T", "x_ptr": "*T", "gs_ptr": "*fp32", "dx_ptr": "*T",
             **_I, "G": "i32", "eps": "fp32"},
            _GPU_CONFIGS_F)
    )
else:
    AOT_SPECS = []


def _interp(t: torch.Tensor) -> bool:
    return _triton.INTERPRETER and t.device.type == "cpu"


def _dims(x: torch.Tensor, group_size: int):
    if x.dim() != 4:
        raise ValueError(f"minibatch_stddev expects an [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    g = effective_group_size(n, group_size)
    return n, c, h * w, g, n // g


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _interp_block_f(f: int) -> int:
    return max(_PART, min(4096, triton.next_power_of_2(f)))


def _interp_block(k: int) -> int:
    return min(1024, triton.next_power_of_2(max(1, k)))


@torch.library.custom_op("progan_fast::minibatch_stddev", mutates_args=(), device_types=("cpu", "cuda"))
def _mbstd_op(x: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    _triton.check_device("minibatch_stddev", x)
    x = x.contiguous()
    n, c, p, g, m = _dims(x, group_size)
    out = x.new_empty(n, c + 1, x.shape[2], x.shape[3])
    f = c * p
    if out.numel() == 0:
        return out
    if f == 0:  # no features: the mean over none is NaN, as in the reference
        return out.fill_(float("nan"))
    nb = triton.cdiv(f, _PART)
    part = torch.empty(m, nb, device=x.device, dtype=_acc_dtype(x))
    acc = _triton.compute_dtype(x)
    if _interp(x):
        bf = _interp_block_f(f)
        _mbstd_fwd_kernel[(m, triton.cdiv(f, bf))](x, out, part, f, p, m, g, nb, eps, BLOCK_F=bf, PART=_PART, ACC=acc)
        _mbstd_stat_kernel[(m,)](part, out, f, p, m, g, nb, BLOCK=_interp_block(max(nb, p)), ACC=acc)
    else:
        _mbstd_fwd_tuned[lambda meta: (m, triton.cdiv(f, meta["BLOCK_F"]))](
            x, out, part, f, p, m, g, nb, eps, PART=_PART, ACC=acc)
        _mbstd_stat_tuned[(m,)](part, out, f, p, m, g, nb, ACC=acc)
    return out


@_mbstd_op.register_fake
def _mbstd_op_fake(x, group_size, eps):
    n, c, _, _, _ = _dims(x, group_size)
    return x.new_empty(n, c + 1, x.shape[2], x.shape[3])


@torch.library.custom_op("progan_fast::minibatch_stddev_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _mbstd_backward_op(grad: torch.Tensor, x: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    _triton.check_device("minibatch_stddev_backward", grad, x)
    grad, x = grad.contiguous(), x.contiguous()
    n, c, p, g, m = _dims(x, group_size)
    if grad.shape != (n, c + 1, x.shape[2], x.shape[3]):
        raise ValueError(
            f"minibatch_stddev_backward: grad shape {tuple(grad.shape)} does not match x {tuple(x.shape)}")
    dx = torch.empty_like(x)
    f = c * p
    if dx.numel() == 0:
        return dx
    gs = torch.empty(m, device=x.device, dtype=_acc_dtype(x))
    acc = _triton.compute_dtype(x)
    if _interp(x):
        bf = _interp_block_f(f)
        _mbstd_gsum_kernel[(m,)](grad, gs, f, p, m, g, BLOCK=_interp_block(p), ACC=acc)
        _mbstd_bwd_kernel[(m, triton.cdiv(f, bf))](grad, x, gs, dx, f, p, m, g, eps, BLOCK_F=bf, ACC=acc)
    else:
        _mbstd_gsum_tuned[(m,)](grad, gs, f, p, m, g, ACC=acc)
        _mbstd_bwd_tuned[lambda meta: (m, triton.cdiv(f, meta["BLOCK_F"]))](
            grad, x, gs, dx, f, p, m, g, eps, ACC=acc)
    return dx


@_mbstd_backward_op.register_fake
def _mbstd_backward_op_fake(grad, x, group_size, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, group_size, eps = inputs
    ctx.save_for_backward(x)
    ctx.group_size, ctx.eps = group_size, eps


def _backward(k, ctx, grad):
    (x,) = ctx.saved_tensors
    return k.minibatch_stddev_backward(grad, x, ctx.group_size, ctx.eps), None, None


def _setup_bwd(ctx, inputs, output):
    grad, x, group_size, eps = inputs
    ctx.save_for_backward(grad, x)
    ctx.group_size, ctx.eps = group_size, eps


def _backward_of_backward(ctx, ggrad_x):
    # d/d(grad, x) of <ggrad_x, dx(grad, x)>: differentiate the reference's first derivative.
    grad, x = ctx.saved_tensors
    with torch.enable_grad():
        grad_, x_ = grad.detach().requires_grad_(), x.detach().requires_grad_()
        (dx,) = torch.autograd.grad(reference(x_, ctx.group_size, ctx.eps), x_, grad_, create_graph=True)
        g_grad, g_x = torch.autograd.grad(dx, (grad_, x_), ggrad_x, allow_unused=True)
    if g_grad is None:
        g_grad = torch.zeros_like(grad)
    if g_x is None:
        g_x = torch.zeros_like(x)
    return g_grad, g_x, None, None


def triton_impl(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    return _mbstd_op(x, group_size, eps)


def _register_autograd(k) -> None:
    """First and second derivatives of one set of ops (Triton's or the native library's)."""
    torch.library.register_autograd(k.minibatch_stddev, functools.partial(_backward, k), setup_context=_setup)
    torch.library.register_autograd(k.minibatch_stddev_backward, _backward_of_backward, setup_context=_setup_bwd)


_register_autograd(SimpleNamespace(minibatch_stddev=_mbstd_op, minibatch_stddev_backward=_mbstd_backward_op))

if _triton.available():
    IMPLEMENTATIONS["triton"] = triton_impl


# ----- native backend (progan_fast._C: C++ CPU twin, CUDA kernels) -------------------------------
#
# ``progan_fast_native::minibatch_stddev`` / ``minibatch_stddev_backward``: the Triton algorithm
# (deterministic per-256-feature partial sums, no atomics) in kernels/cuda/minibatch_stddev.cu and
# its CPU twin kernels/cpu/minibatch_stddev.cpp; autograd (second order from the reference, as above).

if _native.available():
    NATIVE = SimpleNamespace(minibatch_stddev=_native.ops.minibatch_stddev.default,
                             minibatch_stddev_backward=_native.ops.minibatch_stddev_backward.default)
    torch.library.register_fake(NATIVE.minibatch_stddev, _mbstd_op_fake)
    torch.library.register_fake(NATIVE.minibatch_stddev_backward, _mbstd_backward_op_fake)
    _register_autograd(NATIVE)


def native_impl(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    return NATIVE.minibatch_stddev(x, group_size, eps)


_native.register(IMPLEMENTATIONS, native_impl)
