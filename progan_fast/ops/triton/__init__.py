"""The Triton backend: each op's kernels in ``ops/triton/<op>.py``, and here the plumbing they share.

- ``triton`` and ``tl`` are imported here, guarded: where the package is missing they are None,
  the backend reports itself unavailable (:func:`available`, :func:`why_unavailable`) and the
  kernel modules define no kernels. The kernel modules take ``triton`` and ``tl`` from here. This
  subpackage is ``progan_fast.ops.triton``: ``import triton`` (absolute imports only) is the real
  package everywhere, this file included, as long as ``progan_fast/ops`` itself is not put on
  ``sys.path`` (run its modules with ``python -m``, never as ``python progan_fast/ops/x.py``).
- Triton kernels run on CUDA tensors on a GPU, and on CPU tensors only under Triton's
  interpreter (``TRITON_INTERPRET=1``, which must be set before ``triton`` is imported): that is
  how the tests run every kernel on a machine without a GPU.
- On a GPU, block sizes come from ``triton.autotune``; under the interpreter autotuning cannot
  run (it times with CUDA events) and a fixed, large configuration is used instead, since the
  interpreter's cost grows with the number of program instances.
- Every kernel accumulates in float32, or in float64 for float64 inputs (gradcheck runs the
  kernels in float64 under the interpreter).
- Every kernel module lists in ``AOT_SPECS`` the compilations :mod:`progan_fast.ops.kernel_report`
  checks for registers and spills (see :class:`AotSpec`).
- Index arithmetic is int32 (int64 offsets would cost the hot elementwise kernels registers): a
  flat index ``pid * BLOCK + arange(BLOCK)`` runs up to ``BLOCK - 1`` past the last element, and
  past ``2**31 - 1`` it wraps negative and passes the ``i < n`` mask. So every op refuses, before
  it allocates or copies anything, a tensor (or, for the per-sample kernels, a sample) of more than
  :data:`MAX_INDEX_COUNT` elements (:func:`check_index_count`).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend then reports itself unavailable
    triton = None
    tl = None

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: The largest block any launch runs along one flat index: the interpreter's one-program block of
#: the elementwise kernels. Every GPU config's block is smaller (tests/test_triton_index_limits.py).
MAX_FLAT_BLOCK = 65536
#: The most elements a launch may index in int32: the last program's last index,
#: ``count - 1 + MAX_FLAT_BLOCK - 1`` at worst, stays below ``2**31``.
MAX_INDEX_COUNT = 2**31 - MAX_FLAT_BLOCK


@functools.cache
def available() -> bool:
    """True where Triton kernels can run on this process's default device."""
    return triton is not None and (INTERPRETER or torch.cuda.is_available())


def why_unavailable() -> str:
    if triton is None:
        return "the triton package is not installed"
    return "Triton needs a CUDA GPU (or TRITON_INTERPRET=1 set before import, to run kernels on the CPU)"


def on_interpreter(t: torch.Tensor) -> bool:
    """True where a kernel on ``t`` runs under the interpreter (fixed block sizes, no autotuning)."""
    return INTERPRETER and t.device.type == "cpu"


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error where a kernel cannot run on these tensors' device."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRETER:
            continue
        raise RuntimeError(
            f"progan_fast::{op} (triton): tensors on {t.device} need "
            + ("a CUDA device" if not INTERPRETER else "CPU or CUDA")
            + "; set TRITON_INTERPRET=1 before importing triton to run Triton kernels on the CPU"
        )


def check_index_count(op: str, count: int, what: str) -> None:
    """Refuse ``count`` elements (of ``what``, named in the error) past int32 indexing's reach."""
    if count > MAX_INDEX_COUNT:
        raise ValueError(
            f"progan_fast::{op} (triton): {what} has {count} elements, more than the {MAX_INDEX_COUNT} "
            f"(2**31 - {MAX_FLAT_BLOCK}) its int32 index arithmetic can address; use the reference backend")


def compute_dtype(t: torch.Tensor):
    """The accumulation dtype for a kernel reading ``t`` (a ``tl`` dtype, passed as a constexpr)."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


class AotSpec:
    """One ahead-of-time compilation the kernel-report test performs for sm_80 and sm_90.

    ``signature`` maps every non-constexpr argument to a Triton type string (``"*fp32"``,
    ``"*bf16"``, ``"i32"``, ``"fp32"``); ``constexprs`` gives every constexpr argument a value
    (a ``tl`` dtype for ``ACC``). Each kernel module (``ops/triton/<op>.py``) lists, in
    ``AOT_SPECS``, one spec per kernel and GPU autotune config, for float32 and for bfloat16 inputs.
    """

    def __init__(self, name: str, kernel, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
        self.name, self.kernel, self.signature, self.constexprs = name, kernel, signature, constexprs
        self.num_warps, self.num_stages = num_warps, num_stages

    def __repr__(self) -> str:
        params = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs.items())
        return f"{self.name}[{params},w{self.num_warps},s{self.num_stages}]"


def aot_specs_for_configs(name: str, kernel, signature: dict, configs, extra_constexprs: dict | None = None) -> list:
    """Specs for every autotune config, once with float32 and once with bfloat16 tensors.

    In ``signature``, ``"*T"`` marks a pointer to data of the op's input dtype (it becomes ``*fp32``,
    then ``*bf16``); pointers that are float32 whatever the input (a 0-dim alpha, scratch buffers
    of partial sums) are written ``"*fp32"`` and stay so.
    """
    specs = []
    for dtype in ("fp32", "bf16"):
        sig = {k: (f"*{dtype}" if v == "*T" else v) for k, v in signature.items()}
        for cfg in configs:
            consts = {**cfg.kwargs, "ACC": tl.float32, **(extra_constexprs or {})}
            specs.append(AotSpec(f"{name}:{dtype}", kernel, sig, consts, cfg.num_warps, cfg.num_stages))
    return specs
