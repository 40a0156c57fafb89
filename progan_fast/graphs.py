"""One CUDA graph per (resolution, phase): capture the whole training iteration once, replay it.

At low resolutions a ProGAN step is hundreds of tiny kernels, and launching them costs more than
running them. A CUDA graph launches the whole iteration (D forward on reals and fakes, the penalty,
D backward and Adam, G forward/backward and Adam, the EMA, the loss sums) as one unit.

What makes that correct, and where it is arranged:

- every input lives at a fixed address: the dataset or a batch buffer, alpha as a 0-dim tensor
  filled in place, the loss sums (:class:`progan_fast.step.Iteration`); latents and batch indices
  are drawn inside the graph from PyTorch's graph-safe CUDA generator, which advances per replay;
- Adam is ``capturable`` (its step count lives on the device), fp16 loss scaling never leaves the
  device, and no op syncs with the host (``tests/test_capture_safety.py`` checks that on the CPU);
- the first :data:`WARMUP_STEPS` calls of a phase run eagerly on a side stream, as PyTorch's
  capture recipe asks: they create Adam's state and the gradients, and let Triton autotune, none
  of which may happen during capture. They are real training steps, not thrown away;
- all graphs share one memory pool, and the previous graph is released before the next capture,
  so a run holds one graph's memory at a time. A new graph is captured only when the phase
  changes (the optimizer is reset there, so its state tensors change anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3


class GraphedStep:
    """Calls ``fn`` eagerly for the first ``warmup`` calls, then captures it and replays the graph.

    ``fn`` must only read and write tensors that outlive this object (static buffers, parameters,
    optimizer state). The call that captures also replays, so every call performs one step.
    """

    def __init__(self, fn: Callable[[], None], pool, warmup: int = WARMUP_STEPS) -> None:
        if warmup < 1:
            raise ValueError("warmup must be at least 1: capture needs the optimizer state to exist")
        self.fn, self.pool, self.warmup = fn, pool, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_calls = 0
        self._side_stream = torch.cuda.Stream()

    def __call__(self) -> None:
        if self.graph is None:
            if self.eager_calls < self.warmup:
                self._run_on_side_stream()
                self.eager_calls += 1
                return
            self._capture()
        self.graph.replay()

    def _run_on_side_stream(self) -> None:
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.fn()
        self.graph = graph

    def release(self) -> None:
        """Drop the graph (its memory goes back to the shared pool for the next capture)."""
        self.graph = None


class StageGraphs:
    """The trainer's handle: one :class:`GraphedStep` at a time, keyed by phase."""

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup = warmup
        self.key = None
        self.current: GraphedStep | None = None
        self.captures = 0

    def step(self, key, fn: Callable[[], None]) -> None:
        """Run one iteration of phase ``key`` with ``fn``; a new key releases the old graph first."""
        if key != self.key:
            if self.current is not None:
                self.current.release()
                torch.cuda.synchronize()  # the old graph's last replay must finish before its memory is reused
            self.key, self.current = key, GraphedStep(fn, self.pool, self.warmup)
        had_graph = self.current.graph is not None
        self.current()
        if not had_graph and self.current.graph is not None:
            self.captures += 1
