"""What the elementwise kernels of fade_in, fade_reals, blend and downsample2x share.

Each of these kernels is elementwise: a 1D grid over a flattened index space, BLOCK indices per
program. The 2x kernels index "low-resolution" elements and touch each one's 2x2 block of the
high-resolution tensor as two rows of horizontally adjacent pairs ([BLOCK, 2] tiles), so every
high-resolution element is read and/or written exactly once, in contiguous pairs.

- ``_lerp``: torch.lerp's formula, a ``@triton.jit`` helper the fade_in, fade_reals and blend
  kernels inline (they import it by that name);
- :data:`GPU_CONFIGS` and :data:`GPU_CONFIGS_2X2`: the GPU autotune configs of a 1D kernel, and
  :func:`autotune`, which keys a kernel's autotuning on its element count;
- :func:`launch`: runs a kernel over ``n`` indices (autotuned on a GPU, one large block under the
  interpreter);
- :func:`check_size`: index arithmetic is int32, so tensors of more than
  :data:`~progan_fast.ops.triton.MAX_INDEX_COUNT` elements (``2**31`` less the largest block) are refused.
"""

from __future__ import annotations

import torch

from . import MAX_FLAT_BLOCK, check_index_count, compute_dtype, on_interpreter, tl, triton

#: The interpreter's block: one large program per launch (it pays per program); tests lower it
#: to run several programs and the tail mask of the last one.
_INTERPRETER_MAX_BLOCK = MAX_FLAT_BLOCK

if triton is not None:

    @triton.jit
    def _lerp(a, b, w):
        # torch.lerp's formula, with its fused multiply-adds (ATen's vectorized CPU kernel uses
        # fmadd/fnmadd, nvcc contracts the CUDA one): a + w * (b - a) for |w| < 0.5, else
        # b - (b - a) * (1 - w). Exact at w == 0 (gives a) and at w == 1 (gives b).
        d = b - a
        return tl.where(tl.abs(w) < 0.5, tl.fma(d, w, a), tl.fma(-d, 1.0 - w, b))

    # Kernels that touch a 2x2 block per index do four elements' work per index: smaller blocks.
    GPU_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(512, 4), (1024, 4), (2048, 8), (4096, 8)]]
    GPU_CONFIGS_2X2 = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(128, 4), (256, 4), (512, 4), (1024, 8)]]
else:  # no kernels without triton; the names exist so that the kernel modules import
    _lerp = None
    GPU_CONFIGS = GPU_CONFIGS_2X2 = []


def autotune(kernel, numel_arg: str, configs: list):
    """``kernel`` autotuned over ``configs``, keyed by its element-count argument ``numel_arg``."""
    return triton.autotune(configs, key=[numel_arg])(kernel)


def check_size(op: str, *tensors: torch.Tensor) -> None:
    """Refuse tensors the kernels' int32 indices cannot reach (a flat index runs over each tensor, or
    over its 2x2 blocks with offsets into it); call it before any copy or allocation."""
    for t in tensors:
        check_index_count(op, t.numel(), f"the tensor {tuple(t.shape)}")


def launch(kernel, tuned, args: tuple, n: int, like: torch.Tensor) -> None:
    """Launch ``kernel`` (``tuned``: its autotuned twin) over ``n`` indices; ``like`` sets the
    accumulation dtype."""
    if n == 0:
        return
    acc = compute_dtype(like)
    if on_interpreter(like):
        block = min(triton.next_power_of_2(n), _INTERPRETER_MAX_BLOCK)
        kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, ACC=acc)
    else:
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, ACC=acc)
