"""How every op behaves under ``torch.autocast`` (the trainer's ``--amp``).

Autocast only knows ATen ops. Our custom ops (``progan_fast::...``) would receive whatever dtype
arrived, and the eager references would be cast op by op with autocast's own policy, which runs
``rsqrt``, ``pow`` and friends in float32 and so silently turns bf16 activations back into float32
halfway through a layer. Neither halves the bytes moved, which is what ``--amp`` is for.

So every public op applies one policy itself, the same for all backends (through
:func:`progan_fast.ops._backend.dispatch`, the one place every op call passes):

- when autocast is on for the device of the op's first tensor, every float16/bfloat16/float32
  tensor argument with at least one dimension is cast to the autocast dtype; 0-dim tensors (the
  fade weight ``alpha``) are left alone, because the kernels read them in float32 and rounding
  alpha to bf16 would move the fade;
- the implementation then runs with autocast switched off, so the reference computes in the
  low-precision dtype it was given (its reductions accumulate in float32 internally, as our
  kernels do) and returns that dtype.

float64 tensors are never cast (autocast does not cast them either), so the float64 tests are
unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None when autocast is off there."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def call(impl: Callable, *args):
    """``impl(*args)`` under the policy above."""
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
    dtype = autocast_dtype(device_type) if device_type is not None else None
    if dtype is None:
        return impl(*args)
    cast = tuple(
        a.to(dtype) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.dtype in _CASTABLE else a for a in args
    )
    with torch.autocast(device_type, enabled=False):
        return impl(*cast)
