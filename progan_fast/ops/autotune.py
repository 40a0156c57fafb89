"""``--backend auto``: each op picks its fastest backend per input signature, by timing them here.

Why measure: no fixed choice is right everywhere. On a CPU the native twins of the pointwise ops
beat eager PyTorch several times over while oneDNN's convolution beats the twins' conv, and on a
GPU cuDNN against the Triton conv depends on the layer's shape and the GPU. So, like
``torch.backends.cudnn.benchmark``, the first call of an op with a new :func:`signature` times
every candidate backend on those very inputs and keeps the fastest for the rest of the process.

- **The key** (:func:`signature`): the op, whether autograd records it, and per argument: a
  tensor's shape, dtype, device, ``requires_grad`` and memory format; a bool, int, str or None by
  value; a float by type only (alpha, eps and the conv's He scale change no code path, and alpha
  changes every step). No tensor value enters it, so the choice never depends on data and an
  iteration that was warmed up stays capturable in a CUDA graph.
- **Candidates** (:data:`CANDIDATES`): on CPU tensors ``reference`` and ``cpu``; on CUDA tensors
  ``reference``, ``cuda`` and ``triton`` (never Triton's interpreter: it is for tests). A
  candidate that is not built here, or raises on these inputs, is skipped and its reason kept.
- **Timing**: one warm-up call, then :data:`REPEATS` timed samples, the fastest. On the CPU a
  sample is one call between two reads of the host clock (:func:`fastest_seconds`). On CUDA it
  is N back-to-back calls between two CUDA events, divided by N (:func:`event_seconds`): one call
  between two host synchronizations would measure Python dispatch and launch latency for the
  small layers, which the GPU hides when it is busy and CUDA graphs remove; N is sized so that a
  sample lasts about :data:`TARGET_SAMPLE_SECONDS`. The fastest, not the median: other work on the
  machine only ever adds time, and on a busy 2-core CPU a median of a few ms-long calls was seen
  to pick a backend 100x "slower" than it is. When the inputs require grad a call is the forward
  plus a backward with a gradient of ones, on detached copies, so the real autograd graph is
  untouched. The clock, the CUDA events, or the whole timer, are injectable, so tests choose
  winners without noise.
- **Ties**: every candidate within :data:`TIE_TOLERANCE` of the fastest counts as tied, and the
  first of :data:`TIE_ORDER` wins: ``reference`` first, since leaving plain PyTorch for no measured
  gain buys nothing, then the native backends, then Triton.
- **Never during capture**: a key first seen while a CUDA graph is being captured raises
  :class:`AutotuneDuringCaptureError`; timing belongs in the eager warm-up steps before capture.
- **Stable**: choices come, in this order, from the checkpoint being resumed (:meth:`Autotuner.adopt`),
  the on-disk cache (:mod:`.autotune_cache`), and only then from timing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import autotune_cache

#: The backends ``auto`` times, per device type of the op's activations.
CANDIDATES = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda", "triton")}
#: Tie-break order (see the module docstring).
TIE_ORDER = ("reference", "cpu", "cuda", "triton")
#: Relative margin within which two timings are a tie: a backend must be >3% faster to displace
#: an earlier one of TIE_ORDER, so timing noise does not flip choices between runs.
TIE_TOLERANCE = 0.03
WARMUP_CALLS = 1
REPEATS = 5
#: On CUDA a timed sample is as many back-to-back calls as last about this long (from one call's
#: time), at most :data:`MAX_CALLS_PER_SAMPLE`: long enough that launch latency is hidden behind
#: the queued work, short enough that 5 samples of 3 backends cost a few tens of ms per key.
TARGET_SAMPLE_SECONDS = 2e-3
MAX_CALLS_PER_SAMPLE = 100


class AutotuneDuringCaptureError(RuntimeError):
    """``auto`` met a new op signature while a CUDA graph was being captured."""


@dataclass(frozen=True)
class Trial:
    """One candidate on one key: ``run()`` performs one call (forward, and backward when timed so)."""

    op: str
    key: str
    backend: str
    run: Callable[[], object]
    device: torch.device | None = None


@dataclass
class Choice:
    """The backend ``auto`` uses for one key, and how it was decided."""

    op: str
    key: str
    label: str  # short, for the report: the first tensor's shape and dtype, fwd or fwd+bwd
    backend: str
    source: str  # "timed", "cache" or "checkpoint"
    ms: dict[str, float] = field(default_factory=dict)  # fastest call per timed backend
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was not a candidate

    def record(self) -> dict:
        """For log.jsonl."""
        return {"op": self.op, "key": self.key, "backend": self.backend, "source": self.source,
                **({"ms": {b: round(t, 4) for b, t in self.ms.items()}} if self.ms else {}),
                **({"skipped": self.skipped} if self.skipped else {})}


# ----- the key ------------------------------------------------------------------------------------

def _memory_format(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def signature(op: str, args: tuple) -> tuple:
    """The hashable key of an op call (see the module docstring). Built on every ``auto`` call, so
    it is only cheap attribute reads; :func:`describe` turns it into the stable string form."""
    parts: list = [op, torch.is_grad_enabled()]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), a.dtype, a.device, a.requires_grad, _memory_format(a)))
        elif isinstance(a, float):
            parts.append(float)
        else:
            parts.append(a)
    return tuple(parts)


def needs_backward(key: tuple) -> bool:
    return key[1] and any(isinstance(p, tuple) and p[3] for p in key[2:])


def device_of(key: tuple) -> torch.device | None:
    """The device of the op's activations: its first tensor with at least one dimension."""
    return next((p[2] for p in key[2:] if isinstance(p, tuple) and len(p[0]) > 0), None)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}.get(
        dtype, str(dtype).removeprefix("torch."))


def describe(key: tuple) -> str:
    """The stable string form of a key: what the cache and checkpoints store. The device is its
    type, and for CUDA its name, so choices never move between different GPUs."""
    op, _, *parts = key
    device, backward = device_of(key), needs_backward(key)
    where = "cpu" if device is None or device.type == "cpu" else f"{device.type}({autotune_cache.device_name(device)})"
    shown = []
    for p in parts:
        if isinstance(p, tuple):
            shape, dtype, _, grad, fmt = p
            shown.append(f"{_dtype_name(dtype)}[{','.join(map(str, shape))}]"
                         + ("" if fmt == "contiguous" else f":{fmt}") + (":grad" if grad and backward else ""))
        else:
            shown.append("float" if p is float else repr(p))
    return f"{op} {where} {'fwd+bwd' if backward else 'fwd'} ({', '.join(shown)})"


def label(key: tuple) -> str:
    """Short, for the report: the shapes of the tensors with 2+ dims (activations, conv weights),
    the first one's dtype, fwd or fwd+bwd."""
    tensors = [p for p in key[2:] if isinstance(p, tuple) and len(p[0]) > 1]
    shapes = " & ".join("x".join(map(str, p[0])) for p in tensors) + f" {_dtype_name(tensors[0][1])}" if tensors else "scalars"
    return f"{shapes} {'fwd+bwd' if needs_backward(key) else 'fwd'}"


# ----- timing -------------------------------------------------------------------------------------

def make_trial_call(impl: Callable, args: tuple, backward: bool) -> Callable[[], object]:
    """One call of ``impl`` on ``args``: the forward, and with ``backward`` a backward pass with a
    gradient of ones into detached copies of the inputs that require grad (the caller's autograd
    graph is never touched)."""
    leaves, call_args = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            d = a.detach()
            if backward and a.requires_grad:
                d.requires_grad_()
                leaves.append(d)
            call_args.append(d)
        else:
            call_args.append(a)

    def run():
        with torch.enable_grad() if leaves else nullcontext():
            out = impl(*call_args)
            if leaves:
                outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(o, torch.Tensor) and o.requires_grad]
                if outs:
                    torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        return out

    return run


def fastest_seconds(run: Callable[[], object], clock: Callable[[], float] = time.perf_counter,
                    sync: Callable[[], None] = lambda: None, warmup: int = WARMUP_CALLS,
                    repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` timed calls after ``warmup`` untimed ones, ``sync`` around each."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        run()
        sync()
        times.append(clock() - start)
    return min(times)


def event_seconds(run: Callable[[], object], events: Callable[[], object] | None = None,
                  warmup: int = WARMUP_CALLS, repeats: int = REPEATS, target: float | None = None,
                  max_calls: int | None = None) -> float:
    """Seconds per call on a CUDA device, as the GPU sees it: after ``warmup`` calls, one call
    between two events sizes the samples (N calls lasting about ``target``, at most ``max_calls``;
    defaults :data:`TARGET_SAMPLE_SECONDS`, :data:`MAX_CALLS_PER_SAMPLE`), then the fastest of
    ``repeats`` samples of N back-to-back calls between two events, divided by N.

    ``events()`` makes one timing event (default ``torch.cuda.Event(enable_timing=True)``):
    anything with ``record()``, ``synchronize()`` and ``elapsed_time(end)`` in milliseconds.
    Only the end event is waited for; nothing else synchronizes with the host."""
    make = events or (lambda: torch.cuda.Event(enable_timing=True))
    target = TARGET_SAMPLE_SECONDS if target is None else target
    max_calls = MAX_CALLS_PER_SAMPLE if max_calls is None else max_calls

    def sample(calls: int) -> float:
        start, end = make(), make()
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / calls

    for _ in range(warmup):
        run()
    one = sample(1)  # only sizes the samples: a lone call also holds its launch latency
    calls = max(1, min(max_calls, math.ceil(target / one) if one > 0 else max_calls))
    return min(sample(calls) for _ in range(repeats))


def pick(seconds: Mapping[str, float], order=TIE_ORDER, tolerance: float = TIE_TOLERANCE) -> str:
    """The fastest backend; those within ``tolerance`` of it are tied and ``order`` decides."""
    best = min(seconds.values())
    tied = [b for b, s in seconds.items() if s <= best * (1 + tolerance)]
    return min(tied, key=lambda b: order.index(b) if b in order else len(order))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ----- the tuner ----------------------------------------------------------------------------------

class Autotuner:
    """The process's choices: a hot table by :func:`signature`, the :class:`Choice` by its string.

    ``timer(trial) -> seconds`` times one candidate (default: on CUDA :func:`event_seconds` of
    ``trial.run`` with ``events``, elsewhere :func:`fastest_seconds` with ``clock``); ``caches(device)`` gives the disk cache
    for a device or None (default: :func:`autotune_cache.for_device`, which reads
    ``PROGAN_FAST_AUTO_CACHE``); ``capturing()`` says whether a CUDA graph capture is under way.
    """

    def __init__(self, timer: Callable[[Trial], float] | None = None, clock: Callable[[], float] = time.perf_counter,
                 caches: Callable[[torch.device], autotune_cache.ChoiceCache | None] | None = None,
                 capturing: Callable[[], bool] = _capturing, events: Callable[[], object] | None = None) -> None:
        self.timer = timer or self._default_timer
        self.clock = clock
        self.events = events
        self.caches = caches or autotune_cache.for_device
        self.capturing = capturing
        self.reset()

    def reset(self) -> None:
        """Forget every choice of this process (a new run starts from its checkpoint and the disk cache)."""
        self._fast: dict[tuple, str] = {}
        self._adopted: dict[str, str] = {}
        self.choices: dict[str, Choice] = {}
        self._unreported: list[Choice] = []
        self._cache_by_device: dict[tuple[torch.device, str], autotune_cache.ChoiceCache | None] = {}

    def _default_timer(self, trial: Trial) -> float:
        device = trial.device
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device) if self.events is None else nullcontext():  # events on its stream
                return event_seconds(trial.run, self.events)
        return fastest_seconds(trial.run, self.clock)

    def adopt(self, choices: Mapping[str, str]) -> None:
        """Use these ``{key string: backend}`` (a resumed checkpoint's) before the cache or timing."""
        self._adopted.update({str(k): str(v) for k, v in choices.items()})

    def saved_choices(self) -> dict[str, str]:
        """``{key string: backend}`` for every choice this process used or adopted: what a checkpoint stores."""
        return {**self._adopted, **{k: c.backend for k, c in self.choices.items()}}

    def take_unreported(self) -> list[Choice]:
        """The choices made since the last call (for the run's report)."""
        new, self._unreported = self._unreported, []
        return new

    def lookup(self, key: tuple) -> str | None:
        return self._fast.get(key)

    def _cache(self, device: torch.device | None) -> autotune_cache.ChoiceCache | None:
        # Looked up again for every new key (not per call): the environment includes the fp32
        # precision policy, which a process may change, and a choice timed under one policy must
        # go to, and come from, that policy's file only.
        device = device or torch.device("cpu")
        where = (device, autotune_cache.file_name(autotune_cache.environment(device)))
        if where not in self._cache_by_device:
            self._cache_by_device[where] = self.caches(device)
        return self._cache_by_device[where]

    def select(self, key: tuple, impls: Mapping[str, Callable], skipped: Mapping[str, str], args: tuple) -> str:
        """The backend for a key seen for the first time in this process, among ``impls`` (the
        candidates that may run these inputs; ``skipped`` says why the others may not)."""
        op, text = key[0], describe(key)
        if text in self.choices and self.choices[text].backend in impls:  # e.g. requires_grad under no_grad
            self._fast[key] = self.choices[text].backend
            return self._fast[key]
        if self.capturing():
            raise AutotuneDuringCaptureError(
                f"--backend auto: {text} was first seen while a CUDA graph was being captured; timing is not "
                f"allowed there. Run the captured function eagerly with the same shapes first (graphs.py's "
                f"warm-up steps do), or pick a fixed --backend")
        choice = Choice(op, text, label(key), "", "", skipped=dict(skipped))
        known = self._adopted.get(text), (self._cache(device_of(key)) or {}).get(text)
        for source, backend in zip(("checkpoint", "cache"), known):
            if backend in impls:
                choice.backend, choice.source = backend, source
                break
        else:
            choice.backend, choice.source = self._time(key, text, impls, choice, args), "timed"
            cache = self._cache(device_of(key))
            if cache is not None:
                cache.put(text, choice.backend)
        self._fast[key] = choice.backend
        self.choices[text] = choice
        self._unreported.append(choice)
        return choice.backend

    def _time(self, key: tuple, text: str, impls: Mapping[str, Callable], choice: Choice, args: tuple) -> str:
        backward = needs_backward(key)
        seconds, first_error = {}, None
        for backend, impl in impls.items():
            trial = Trial(key[0], text, backend, make_trial_call(impl, args, backward), device_of(key))
            try:
                seconds[backend] = self.timer(trial)
            except Exception as e:  # a candidate that fails on these inputs is skipped, with its reason
                choice.skipped[backend] = _first_line(e)
                first_error = first_error or e
        if not seconds:  # every candidate failed: the inputs themselves are wrong; say it as a fixed backend would
            raise first_error
        choice.ms = {b: 1000 * s for b, s in seconds.items()}
        return pick(seconds)


def format_report(choices: list[Choice]) -> list[str]:
    """One line per op family: which backend won at which shapes, and why others were skipped."""
    lines = []
    for op in dict.fromkeys(c.op for c in choices):
        mine = [c for c in choices if c.op == op]
        by_backend: dict[str, list[str]] = {}
        for c in mine:
            if c.source != "timed":
                why = c.source
            elif len(c.ms) > 1:
                t, b = min((t, b) for b, t in c.ms.items() if b != c.backend)
                ratio = t / max(c.ms[c.backend], 1e-12)
                why = f"{b} {ratio:.2f}x slower" if ratio >= 1 + TIE_TOLERANCE else f"tie with {b}"
            else:
                why = "only candidate"
            by_backend.setdefault(c.backend, []).append(f"{c.label} ({why})")
        won = "; ".join(f"{b} at {', '.join(shapes)}" for b, shapes in by_backend.items())
        skips = {f"{b}: {r}" for c in mine for b, r in c.skipped.items()}
        lines.append(f"auto {op}: {won}" + (f"; skipped {'; '.join(sorted(skips))}" if skips else ""))
    return lines


def cache_description(device: torch.device) -> str:
    """Where choices for ``device`` are cached, for the run's first lines."""
    path = autotune_cache.location(autotune_cache.environment(device))
    return (f"choices cached in {path}" if path is not None
            else f"no choice cache ({autotune_cache.ENV_VAR} is off): every run times afresh")


#: The process-wide tuner every ``auto`` op call uses (tests replace it or call its ``reset``).
TUNER = Autotuner()
