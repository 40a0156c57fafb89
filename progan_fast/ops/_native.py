"""Loads the native library ``progan_fast._C`` (built by setup.py from ``kernels/``).

The library registers the ``progan_fast_native::`` ops with PyTorch's dispatcher: C++ CPU twins
always, CUDA kernels when it was built with them (``_C.WITH_CUDA``). Each op file adds ``cpu`` (and
``cuda``) to its backend table only when the library loaded, and registers autograd and fake
tensors for the native ops next to the Triton ones, sharing their formulas.

A missing or broken library is not an error: the native backends are then unavailable, and
:func:`why_unavailable` says why (as :func:`progan_fast.ops.triton.why_unavailable` does).

    python -m progan_fast.ops.native_status   # prints what was built and whether it loads
"""

from __future__ import annotations

import torch

_error: str | None = None
try:
    from progan_fast import _C  # noqa: F401  (loading it registers the ops)
except ImportError as e:  # not built (torch was not importable at build time) or built for another torch
    _C = None
    _error = f"progan_fast._C is not built or does not load ({e})"

ops = torch.ops.progan_fast_native if _C is not None else None


def available() -> bool:
    """True where the CPU twins can run (the library loaded)."""
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.WITH_CUDA)


def cuda_available() -> bool:
    """True where the CUDA kernels can run: compiled in, and a GPU is visible."""
    return has_cuda_kernels() and torch.cuda.is_available()


def why_unavailable(backend: str = "cpu") -> str:
    if _C is None:
        return _error + "; reinstall with: pip install --no-build-isolation -e ."
    if backend == "cuda" and not _C.WITH_CUDA:
        return "progan_fast._C was built without CUDA kernels (PROGAN_FAST_CUDA=1 with a CUDA torch and nvcc builds them)"
    if backend == "cuda":
        return "progan_fast._C has CUDA kernels but no CUDA device is visible"
    return "available"


def register(implementations: dict, impl) -> None:
    """Add ``impl`` to an op's backend table as ``cpu`` (and ``cuda`` where the CUDA kernels can run).
    The dispatcher picks the CPU or CUDA kernel from the tensors' device."""
    if available():
        implementations["cpu"] = impl
    if cuda_available():
        implementations["cuda"] = impl


def describe() -> str:
    """One line: where the library was loaded from and which kernels it holds, or why it did not load."""
    if _C is None:
        return why_unavailable()
    kernels = "CPU twins + CUDA kernels" if _C.WITH_CUDA else "CPU twins only (built without CUDA kernels)"
    return f"progan_fast._C loaded from {_C.__file__}: {kernels}; CUDA device visible: {torch.cuda.is_available()}"
