"""Backend selection shared by every op in :mod:`progan_fast.ops`.

Each op module keeps a table ``{backend name: implementation}``. Its public function takes
``backend=None`` and asks :func:`resolve` for the implementation: an explicit name wins, otherwise
the process-wide default set by :func:`set_default_backend` (the trainer's ``--backend`` switch).

Only the eager ``reference`` backend exists today; ``triton``, ``cuda`` and ``cpu`` register
themselves in their op files when their issues land. Asking for a backend that an op does not
have is an error that names the op, the backend and what is available, never a silent fallback:
a benchmark that silently measured the reference would lie.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: Every backend name the project knows, in order of preference for ``auto`` (fastest first).
KNOWN_BACKENDS = ("triton", "cuda", "cpu", "reference")

_default_backend = "reference"


class BackendUnavailableError(RuntimeError):
    """The requested backend does not exist, or is not available for this op on this machine."""


def available_backends(implementations: dict[str, Callable]) -> list[str]:
    return [name for name in KNOWN_BACKENDS if name in implementations]


def set_default_backend(name: str) -> str:
    """Set the backend used when an op is called with ``backend=None``; returns the resolved name.

    ``auto`` picks the first backend of :data:`KNOWN_BACKENDS` that every op provides; with only
    the reference present that is ``reference``.
    """
    global _default_backend
    if name == "auto":
        from . import all_op_implementations

        tables = all_op_implementations().values()
        name = next(b for b in KNOWN_BACKENDS if all(b in t for t in tables))
    elif name not in KNOWN_BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; choose one of: auto, {', '.join(KNOWN_BACKENDS)}"
        )
    else:
        from . import all_op_implementations

        missing = [op for op, t in all_op_implementations().items() if name not in t]
        if missing:
            raise BackendUnavailableError(
                f"backend {name!r} is not available yet for: {', '.join(missing)} "
                f"(available everywhere: reference)"
            )
    _default_backend = name
    return name


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
