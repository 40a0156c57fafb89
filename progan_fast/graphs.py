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
- a new graph is captured only when the phase changes (the optimizer is reset there, so its state
  tensors change anyway). Before that capture the previous graph is synchronized, reset and
  dropped, so a run holds one graph at a time, and **each capture gets a memory pool of its own**.

Why a fresh pool per capture, not one shared pool (settled from PyTorch's source, torch 2.11-2.14:
``aten/src/ATen/cuda/CUDAGraph.cpp`` and ``c10/cuda/CUDACachingAllocator.cpp``):

- ``graph_pool_handle()`` only mints a new id; the allocator's ``PrivatePool`` for that id is made by
  the first capture into it (``beginAllocateToPool`` -> ``create_or_incref_pool``, ``use_count`` 1).
  Every further capture into an id whose pool still exists increments ``use_count`` after
  ``TORCH_INTERNAL_ASSERT(use_count > 0)``.
- ``CUDAGraph.reset()`` (also run by its destructor) calls ``releasePool``: ``use_count`` drops, and
  at 0 the pool moves to ``graph_pools_freeable``. It leaves the allocator's table (``graph_pools``)
  only when ``release_cached_blocks`` (``empty_cache``; ``torch.cuda.graph`` calls it on entry)
  finds every block of it free and cudaFrees them all (``cudaMalloc_count == 0``).
- So if any allocation made during the old capture outlives the graph, its pool stays in
  ``graph_pools`` with ``use_count == 0``, and capturing into the same id again fails that internal
  assertion. Such allocations exist outside our control: the cuBLAS workspace that a capture stream's
  first ``F.linear`` allocates is cached per (handle, stream) for the life of the process.
  Reuse would be safe only when nothing survives, which this code cannot prove.
- A fresh id never meets an old pool, so the next capture cannot trip it; the old pool's memory goes
  back to CUDA once its last surviving block is freed (its cost is those blocks only).

Releasing: ``torch.cuda.synchronize()`` first (the old graph's last replay must finish before its
executable is destroyed and its memory can be reused), then ``graph.reset()`` (releases the pool now
rather than whenever Python collects the object), then both the graph and its pool id are dropped.
``tests/test_graph_pools.py`` checks this policy on the CPU with a stand-in for the graph API.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3


class GraphedStep:
    """Calls ``fn`` eagerly for the first ``warmup`` calls, then captures it and replays the graph.

    ``fn`` must only read and write tensors that outlive this object (static buffers, parameters,
    optimizer state). The call that captures also replays, so every call performs one step. The
    capture goes into a memory pool of its own (see the module docstring for why).
    """

    def __init__(self, fn: Callable[[], None], warmup: int = WARMUP_STEPS) -> None:
        if warmup < 1:
            raise ValueError("warmup must be at least 1: capture needs the optimizer state to exist")
        self.fn, self.warmup = fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = None  # this capture's private memory pool id, made at capture
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
        pool = torch.cuda.graph_pool_handle()  # a new id: no earlier capture's pool can be met
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.fn()
        self.graph, self.pool = graph, pool

    def release(self) -> None:
        """Wait for the graph's last replay, destroy it and give its pool back to the allocator."""
        graph, self.graph, self.pool = self.graph, None, None
        if graph is not None:
            torch.cuda.synchronize()  # a replay in flight must finish before its executable and memory go
            graph.reset()


class StageGraphs:
    """The trainer's handle: one :class:`GraphedStep` at a time, keyed by phase."""

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        self.warmup = warmup
        self.key = None
        self.current: GraphedStep | None = None
        self.captures = 0

    def step(self, key, fn: Callable[[], None]) -> None:
        """Run one iteration of phase ``key`` with ``fn``; a new key releases the old graph first."""
        if key != self.key:
            self.release()
            self.key, self.current = key, GraphedStep(fn, self.warmup)
        had_graph = self.current.graph is not None
        self.current()
        if not had_graph and self.current.graph is not None:
            self.captures += 1

    def release(self) -> None:
        """Release the current graph, if any (the next :meth:`step` starts a new phase's warm-up)."""
        if self.current is not None:
            self.current.release()
        self.key, self.current = None, None
