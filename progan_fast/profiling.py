"""Profiling hooks: NVTX ranges, the CUDA profiler window, and torch.profiler traces.

A leaf module (torch and ``nvtx`` only), so the ops, the step and the trainer can all use it.

- :func:`nvtx_range` marks a region for Nsight Systems. Ranges are off by default (``--nvtx``
  switches them on) and cost one function call and a ``nullcontext`` when off. They are host-side
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

try:
    import nvtx as _nvtx  # no-op without a GPU driver, so importing it is always safe
except ImportError:  # pragma: no cover - nvtx is a dependency; this keeps a broken env usable
    _nvtx = None

DOMAIN = "progan_fast"
_enabled = False
_NULL = contextlib.nullcontext()


def enable_nvtx(on: bool = True) -> None:
    """Switch the NVTX ranges on or off for the whole process."""
    global _enabled
    if on and _nvtx is None:
        raise RuntimeError("--nvtx needs the 'nvtx' package (pip install nvtx)")
    _enabled = on


def nvtx_enabled() -> bool:
    return _enabled


def nvtx_range(name: str):
    """A context manager marking ``name`` on the NVTX timeline (a no-op unless enabled)."""
    if not _enabled:
        return _NULL
    return _nvtx.annotate(name, domain=DOMAIN)


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
