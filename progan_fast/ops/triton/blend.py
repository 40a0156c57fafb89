"""Triton kernels of blend (see :mod:`progan_fast.ops.blend`).

The forward is one pass with ``_lerp`` (torch.lerp's formula, see :mod:`.elementwise`); the
backward (``blend_backward``) writes both input gradients in one pass. Elementwise over tensors in
one dense layout (NCHW or NHWC, the op brings them there), so a flat loop serves both. ``alpha`` is loaded from a
0-dim tensor, so a CUDA graph replays with whatever the tensor holds.
"""

from __future__ import annotations

import torch

from . import aot_specs_for_configs, tl, triton
from .elementwise import GPU_CONFIGS, _lerp, autotune, launch

if triton is not None:

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

    _blend_fwd_tuned = autotune(_blend_fwd_kernel, "n", GPU_CONFIGS)
    _blend_bwd_tuned = autotune(_blend_bwd_kernel, "n", GPU_CONFIGS)

    #: Every compilation the kernel-report test checks for registers and spills on sm_80 / sm_90.
    AOT_SPECS = (
        aot_specs_for_configs("blend_fwd", _blend_fwd_kernel,
                              {"old_ptr": "*T", "new_ptr": "*T", "alpha_ptr": "*fp32", "out_ptr": "*T", "n": "i32"},
                              GPU_CONFIGS)
        + aot_specs_for_configs("blend_bwd", _blend_bwd_kernel,
                                {"g_ptr": "*T", "alpha_ptr": "*fp32", "dold_ptr": "*T", "dnew_ptr": "*T", "n": "i32"},
                                GPU_CONFIGS)
    )
else:
    AOT_SPECS = []


def blend_forward(old: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> None:
    """``out = lerp(old, new, alpha)``: tensors dense in one same layout (NCHW or NHWC: a flat loop
    either way), ``alpha`` 0-dim."""
    launch(_blend_fwd_kernel, _blend_fwd_tuned, (old, new, alpha, out, new.numel()), new.numel(), new)


def blend_backward(grad: torch.Tensor, alpha: torch.Tensor, d_old: torch.Tensor, d_new: torch.Tensor) -> None:
    """``d_old = grad * (1 - alpha)`` and ``d_new = grad * alpha``."""
    launch(_blend_bwd_kernel, _blend_bwd_tuned, (grad, alpha, d_old, d_new, grad.numel()), grad.numel(), grad)
