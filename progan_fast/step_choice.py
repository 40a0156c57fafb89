"""The step check: ``--backend auto`` confirmed on whole training steps, and ``--channels-last auto``.

Why: ``auto`` times each op on its own (:mod:`progan_fast.ops.autotune`), and per-op choices do
not always add up: on a CPU at paper widths (batch 16) ``auto`` ran the whole step at 0.89-0.99x
``reference``'s speed (layout conversions between ops of different backends, cache effects,
auto's own dispatch). The memory format has no per-op answer either: NHWC was 5-28% faster at
laptop widths and 7-18% slower at paper widths on the same CPU. So the step decides.

How, at the start of every phase of a run that has more than one :func:`candidates` setup:

- each setup (a backend, ``reference`` or ``auto``'s choices, and a memory format) first runs
  :data:`WARMUP_STEPS` untimed step (``auto`` times its ops there, Triton compiles, oneDNN and
  cuDNN pick their kernels);
- then :data:`ROUNDS` rounds, each one timed step of every setup in turn (interleaved, so a
  drift of the machine's speed hits all alike); a setup's time is its fastest step (other work
  only ever adds time);
- :func:`pick`: the first setup in :func:`candidates`' order within :data:`TOLERANCE` of the
  fastest wins, and ``reference`` and NCHW come first, so ``auto`` or NHWC must be measurably
  faster to be used: ``auto`` is then never slower than ``reference`` beyond noise.

**The timed steps leave no trace.** They are extra steps, not the phase's: the training state
(:meth:`progan_fast.gan_state.GANState.snapshot`) and torch's random generators are saved before
them and put back after, and they run on their own :class:`~progan_fast.step.Iteration`, so the
phase's loss sums never see them. A run therefore trains exactly as a run given the chosen setup
from the start would, the check only costs ``(WARMUP_STEPS + ROUNDS)`` steps per setup and phase,
and a resume stays bit-identical: the decision is kept in the checkpoints (``step_choices``, by
phase), so a run resumed inside a phase uses its decision again without timing; a phase that
starts after the resume is checked afresh, as in an uninterrupted run. (Timing real, counted
steps instead would make the weights depend on which setup ran which step of the check.) While
the check runs, the snapshot holds one copy of the three networks and of Adam's state on the
training device.

Timing (:func:`timer_for`): one step between two CUDA events on a GPU (waiting for the end event
only), between two reads of the host clock on the CPU. These are eager steps: under
``--cuda-graphs`` they include the host's launch time that the graphs remove, which favours the
setup that launches less, i.e. ``reference``: a conservative check, never a slower one.
:data:`TIMER` lets tests decide the winner without noise.

Several ranks (``torchrun``): every rank runs the same steps (DDP's collectives need that) and
rank 0's decision is broadcast, so all ranks train with the same setup.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops
from .distributed import SINGLE, World
from .gan_state import GANState

WARMUP_STEPS = 1
ROUNDS = 3
#: A setup later in :func:`candidates`' order must be more than 3% faster to be chosen.
TOLERANCE = 0.03


@dataclass(frozen=True)
class Setup:
    """How a step runs: the default op backend and the networks' activation memory format."""

    backend: str
    channels_last: bool

    def record(self) -> dict:
        return {"backend": self.backend, "channels_last": self.channels_last}

    @classmethod
    def from_record(cls, record) -> Setup | None:
        try:
            return cls(str(record["backend"]), bool(record["channels_last"]))
        except (TypeError, KeyError):
            return None


#: ``timer(setup, run) -> seconds``: call ``run()`` (one training step) once and say how long it took.
StepTimer = Callable[[Setup, Callable[[], None]], float]

#: Tests set a :data:`StepTimer` here; None: :func:`timer_for` the training device.
TIMER: StepTimer | None = None


def candidates(backend: str, channels_last: bool | str) -> list[Setup]:
    """The setups to compare, in order of preference: ``reference`` before ``auto`` (leaving plain
    PyTorch for no measured gain buys nothing), NCHW before NHWC. One setup: nothing to check."""
    backends = ["reference", "auto"] if backend == "auto" else [backend]
    formats = [False, True] if channels_last == "auto" else [bool(channels_last)]
    return [Setup(b, f) for b in backends for f in formats]


def apply(setup: Setup, state: GANState, device_type: str) -> None:
    """Make ``setup`` the one every following step runs."""
    ops.set_default_backend(setup.backend, device_type)
    for net in (state.G, state.D, state.G_ema):
        net.use_channels_last(setup.channels_last)
    state.channels_last = setup.channels_last


def timer_for(device: torch.device, events: Callable[[], object] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> StepTimer:
    """A step's time on ``device``: between two CUDA events (``events()`` makes one; default
    ``torch.cuda.Event(enable_timing=True)``) on a GPU, between two ``clock()`` reads on the CPU."""
    if device.type == "cuda":
        make = events or (lambda: torch.cuda.Event(enable_timing=True))

        def on_the_gpu(setup: Setup, run: Callable[[], None]) -> float:
            start, end = make(), make()
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return on_the_gpu

    def on_the_host(setup: Setup, run: Callable[[], None]) -> float:
        begin = clock()
        run()
        return clock() - begin

    return on_the_host


def pick(seconds: dict[Setup, float], tolerance: float = TOLERANCE) -> Setup:
    """The first setup (in ``seconds``' order) within ``tolerance`` of the fastest."""
    best = min(seconds.values())
    return next(s for s, t in seconds.items() if t <= best * (1 + tolerance))


def names(setups: list[Setup]) -> dict[Setup, str]:
    """Short names that show only what differs: ``auto``, ``reference NHWC``, ``NCHW``."""
    show_backend = len({s.backend for s in setups}) > 1
    show_format = len({s.channels_last for s in setups}) > 1
    return {s: " ".join(([s.backend] if show_backend else []) + (["NHWC" if s.channels_last else "NCHW"]
                                                                  if show_format else [])) or s.backend
            for s in setups}


@dataclass
class Decision:
    setup: Setup
    seconds: dict[Setup, float]  # each setup's fastest timed step
    rounds: int

    def line(self) -> str:
        shown = names(list(self.seconds))
        times = ", ".join(f"{shown[s]} {1000 * t:.2f} ms" for s, t in self.seconds.items())
        return f"step check (fastest of {self.rounds} steps each) {times}; training with {shown[self.setup]}"

    def record(self) -> dict:
        """For log.jsonl."""
        shown = names(list(self.seconds))
        return {**self.setup.record(), "ms": {shown[s]: round(1000 * t, 4) for s, t in self.seconds.items()},
                "steps_each": self.rounds}


def check(setups: list[Setup], step: Callable[[], None], state: GANState, device: torch.device,
          world: World = SINGLE, timer: StepTimer | None = None, rounds: int = ROUNDS,
          warmup: int = WARMUP_STEPS) -> Decision:
    """Time ``step`` (one training step of the phase, on its own Iteration) under each setup as
    the module docstring says, undo every step, and apply the winner (rank 0's)."""
    timer = timer or TIMER or timer_for(device)
    restore = state.snapshot()
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    steps: dict[Setup, list[float]] = {s: [] for s in setups}
    try:
        for setup in setups:
            apply(setup, state, device.type)
            for _ in range(warmup):
                step()
        for _ in range(rounds):
            for setup in setups:
                apply(setup, state, device.type)
                steps[setup].append(timer(setup, step))
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the last timed step must be done before its inputs are overwritten
        restore()
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
    seconds = {s: min(t) for s, t in steps.items()}
    chosen = Setup.from_record(world.broadcast_object(pick(seconds).record()))
    apply(chosen, state, device.type)
    return Decision(chosen, seconds, rounds)
