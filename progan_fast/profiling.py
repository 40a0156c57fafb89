"""Profiling hooks: NVTX ranges, the CUDA profiler window, and torch.profiler traces.

A leaf module (torch only; the optional ``nvtx`` package if it is there), so the ops, the step and
the trainer can all use it.

- :func:`nvtx_range` marks a region for Nsight Systems. Ranges are off by default (``--nvtx``
  switches them on) and cost one function call and a ``nullcontext`` when off. They go through
  ``torch.cuda.nvtx``, which every CUDA build of torch carries (the GPU machines have no ``nvtx``
  package and no network to fetch one), else through the ``nvtx`` package where it is installed
  (``pip install progan_fast[nvtx]``; it also works with a CPU build of torch, whose
  ``torch.cuda.nvtx`` raises). With neither, ``--nvtx`` is refused with one line. They are host-side
  markers: under ``--cuda-graphs`` they appear once, while the graph is captured, and a replay is a
  single ``cudaGraphLaunch`` whose kernels Nsight shows without per-op ranges. Profile without
  ``--cuda-graphs`` to see which op a kernel belongs to.
- :class:`CudaProfilerWindow` calls ``cudaProfilerStart``/``Stop`` around a chosen window of
  steps, so ``nsys profile --capture-range=cudaProfilerApi`` records just those steps.
- :func:`torch_profiler` records steps with ``torch.profiler`` and exports a Chrome trace
  (open it at https://ui.perfetto.dev or chrome://tracing).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

DOMAIN = "progan_fast"
_enabled = False
_NULL = contextlib.nullcontext()
_range = None  # the chosen route: name -> context manager; set by enable_nvtx


class NvtxUnavailable(RuntimeError):
    """--nvtx on a machine with no way to emit NVTX ranges (CPU torch and no ``nvtx`` package)."""


class _TorchRange:
    """An NVTX range through ``torch.cuda.nvtx`` (push/pop; torch's ranges have no domain)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc) -> bool:
        torch.cuda.nvtx.range_pop()
        return False


def _torch_nvtx_works() -> bool:
    """Whether this torch can emit NVTX: CUDA builds can (no GPU needed); CPU builds raise
    RuntimeError ("NVTX functions not installed") from range_push."""
    try:
        torch.cuda.nvtx.range_push(f"{DOMAIN}: nvtx probe")
        torch.cuda.nvtx.range_pop()
    except (RuntimeError, AttributeError, OSError):
        return False
    return True


def _nvtx_package():
    """The optional ``nvtx`` package, or None. Imported only when --nvtx asks for it."""
    try:
        import nvtx  # noqa: PLC0415  (a no-op without a GPU driver, so importing it is safe)
    except ImportError:
        return None
    return nvtx


def _find_route():
    """The context-manager factory for a range: torch.cuda.nvtx first (it ships with every CUDA
    torch), the nvtx package second; raises NvtxUnavailable with the way out when neither works."""
    if _torch_nvtx_works():
        return _TorchRange
    package = _nvtx_package()
    if package is not None:
        return lambda name: package.annotate(name, domain=DOMAIN)
    raise NvtxUnavailable(f"--nvtx needs NVTX: a CUDA build of torch (torch.cuda.nvtx; torch {torch.__version__} "
                          f"is a CPU build) or the nvtx package (pip install nvtx, or progan_fast[nvtx])")


def enable_nvtx(on: bool = True) -> None:
    """Switch the NVTX ranges on or off for the whole process (raises NvtxUnavailable when no
    route exists; nothing changes then)."""
    global _enabled, _range
    if on:
        _range = _find_route()
    _enabled = on


def nvtx_enabled() -> bool:
    return _enabled


def nvtx_range(name: str):
    """A context manager marking ``name`` on the NVTX timeline (a no-op unless enabled)."""
    if not _enabled:
        return _NULL
    return _range(name)


class CudaProfilerWindow:
    """``cudaProfilerStart`` before step ``start`` and ``cudaProfilerStop`` after step ``stop - 1``
    (steps counted from 0 in this invocation). Without CUDA it does nothing."""

    def __init__(self, start: int, stop: int, enabled: bool) -> None:
        if not 0 <= start < stop:
            raise ValueError(f"profiler window must satisfy 0 <= start < stop, got {start}:{stop}")
        self.start, self.stop, self.enabled = start, stop, enabled
        self.active = False

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.start:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            self.active = True

    def after_step(self, step: int) -> None:
        if self.active and step == self.stop - 1:
            self.close()

    def close(self) -> None:
        if self.active:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            self.active = False


def parse_window(text: str) -> tuple[int, int]:
    """``"START:STOP"`` -> ``(start, stop)``; raises ValueError with a readable message."""
    try:
        a, b = text.split(":")
        start, stop = int(a), int(b)
    except ValueError:
        raise ValueError(f"expected START:STOP step numbers such as 10:20, got {text!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"expected 0 <= START < STOP, got {text!r}")
    return start, stop


def torch_profiler(device_type: str):
    """A ``torch.profiler.profile`` recording CPU ops, and CUDA kernels on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=True)


def export_trace(prof, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path
