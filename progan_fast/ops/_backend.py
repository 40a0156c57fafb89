"""Backend selection shared by every op in :mod:`progan_fast.ops`.

Each op module keeps a table ``{backend name: implementation}``. Its public function takes
``backend=None`` and asks :func:`resolve` for the implementation: an explicit name wins, otherwise
the process-wide default set by :func:`set_default_backend` (the trainer's ``--backend`` switch).

``reference`` always exists; ``triton`` registers itself where Triton can run (see
``triton/__init__.py``), ``cpu`` (C++ twins) and ``cuda`` (CUDA kernels) where the native library
``progan_fast._C`` loaded (see ``_native.py``). Asking for a backend that an op does not have is
an error that names the op, the backend and what is available, never a silent fallback: a
benchmark that silently measured the reference would lie.

Backends are strict about devices: ``cpu`` computes only CPU tensors, ``cuda`` and ``triton`` only
CUDA tensors (``triton`` also CPU tensors under its interpreter, for tests). The native library
registers one dispatcher op for both devices, so without this check ``backend="cuda"`` on CPU
tensors would quietly run the C++ twin, and a benchmark of "cuda" would measure the CPU.

``auto`` is not one backend but a choice per op call signature (shapes, dtypes, flags, device),
measured on first use and then fixed (:mod:`.autotune`): :func:`dispatch` hands such a call to
:func:`_auto_call`, which offers the tuner the backends that can run those inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from .. import profiling
from . import _amp, autotune

F = TypeVar("F", bound=Callable)

#: Every backend name the project knows (``auto`` is a per-call choice among them, see :mod:`.autotune`).
KNOWN_BACKENDS = ("triton", "cuda", "cpu", "reference")

_default_backend = "reference"


class BackendUnavailableError(RuntimeError):
    """The requested backend does not exist, or is not available for this op on this machine."""


def available_backends(implementations: dict[str, Callable]) -> list[str]:
    return [name for name in KNOWN_BACKENDS if name in implementations]


#: The device type each kernel backend computes on (``reference`` computes on any).
BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def _interpreter_runs_cpu_tensors() -> bool:
    from . import triton as triton_backend

    return triton_backend.INTERPRETER


def set_default_backend(name: str, device_type: str, tables: Mapping[str, Mapping[str, Callable]]) -> str:
    """Set the backend used when an op is called with ``backend=None``; returns its name.

    ``tables`` is every op's backend table (``progan_fast.ops.all_op_implementations()``, which
    calls this). ``auto`` is always accepted: each op call then runs the backend measured fastest
    for its inputs (:mod:`.autotune`). A named backend must be provided by every op and compute on
    ``device_type``, or this raises naming what is missing.
    """
    global _default_backend
    if name != "auto":
        _check_named_backend(name, device_type, tables)
    _default_backend = name
    return name


def _check_named_backend(name: str, device_type: str, tables: Mapping[str, Mapping[str, Callable]]) -> None:
    """Raise unless every op provides ``name`` and it computes on ``device_type``."""
    if name not in KNOWN_BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of: auto, {', '.join(KNOWN_BACKENDS)}")
    if name == "triton" and device_type == "cpu":
        if not _interpreter_runs_cpu_tensors():
            raise BackendUnavailableError(
                "backend 'triton' runs on a CUDA device; on the CPU use reference "
                "(TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for testing)"
            )
    elif name in ("cpu", "cuda") and device_type != BACKEND_DEVICE[name]:
        other = "cuda" if name == "cpu" else "cpu"
        raise BackendUnavailableError(
            f"backend {name!r} is not available on the {device_type} device: it computes only "
            f"{BACKEND_DEVICE[name].upper()} tensors (use {other!r}, reference or auto there)"
        )
    missing = [op for op, t in tables.items() if name not in t]
    if missing:
        raise BackendUnavailableError(
            f"backend {name!r} is not available here for: {', '.join(missing)}"
            + (f" ({_why_unavailable(name)})" if len(missing) == len(tables) else "")
        )


def _why_unavailable(name: str) -> str:
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend.why_unavailable()
    if name in ("cpu", "cuda"):
        from . import _native

        return _native.why_unavailable(name)
    return "no such backend"


def get_default_backend() -> str:
    return _default_backend


def resolve(op_name: str, implementations: dict[str, F], backend: str | None) -> F:
    name = _default_backend if backend is None else backend
    try:
        return implementations[name]
    except KeyError:
        raise BackendUnavailableError(
            f"{op_name}: backend {name!r} is not available; available: "
            f"{', '.join(available_backends(implementations))}"
        ) from None


def check_devices(op_name: str, backend: str, args) -> None:
    """Refuse tensors on a device ``backend`` does not compute on (see the module docstring).
    0-dim tensors (alpha) are exempt: the kernels read them wherever they live."""
    want = BACKEND_DEVICE.get(backend)
    if want is None:
        return
    got = {a.device.type for a in args if isinstance(a, torch.Tensor) and a.dim() > 0}
    allowed = {want} | ({"cpu"} if backend == "triton" and _interpreter_runs_cpu_tensors() else set())
    wrong = sorted(got - allowed)
    if wrong:
        raise BackendUnavailableError(
            f"{op_name}: backend {backend!r} is not available for {', '.join(wrong).upper()} tensors: it computes "
            f"only {want.upper()} tensors (use "
            + ("'cpu', 'reference' or 'auto'" if "cpu" in wrong else "'cuda', 'triton', 'reference' or 'auto'")
            + " for these)")


def auto_candidates(implementations: dict[str, Callable], args) -> tuple[dict[str, Callable], dict[str, str]]:
    """The backends ``auto`` may time on these inputs, and why each other one of the device's
    :data:`.autotune.CANDIDATES` may not (not built here, the wrong device, Triton's interpreter)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), torch.device("cpu"))
    impls, skipped = {}, {}
    for name in autotune.CANDIDATES.get(device.type, ("reference",)):
        if name not in implementations:
            skipped[name] = "not available here" + (f" ({_why_unavailable(name)})" if name != "reference" else "")
        elif name == "triton" and _interpreter_runs_cpu_tensors():
            skipped[name] = "Triton's interpreter (TRITON_INTERPRET=1) is for tests, never timed for speed"
        else:
            try:
                check_devices("auto", name, args)
            except BackendUnavailableError as e:
                skipped[name] = str(e)
                continue
            impls[name] = implementations[name]
    return impls, skipped


def _auto_call(op_name: str, implementations: dict[str, Callable], *args):
    """``auto``: the backend chosen for this call's signature, choosing it on first sight."""
    key = autotune.signature(op_name, args)
    tuner = autotune.TUNER
    name = tuner.lookup(key)
    if name is None:
        name = tuner.select(key, *auto_candidates(implementations, args), args)
    return implementations[name](*args)


def dispatch(op_name: str, implementations: dict[str, Callable], backend: str | None, *args):
    """Run ``op_name`` on the chosen backend: inside its NVTX range (``--nvtx``) and under the
    autocast policy of :mod:`progan_fast.ops._amp`. Every public op goes through here. For
    ``auto`` the choice is made after the autocast cast, so the key holds the dtype that runs."""
    name = _default_backend if backend is None else backend
    if name == "auto":
        with profiling.nvtx_range(op_name):
            return _amp.call(lambda *a: _auto_call(op_name, implementations, *a), *args)
    impl = resolve(op_name, implementations, name)
    check_devices(op_name, name, args)
    with profiling.nvtx_range(op_name):
        return _amp.call(impl, *args)
