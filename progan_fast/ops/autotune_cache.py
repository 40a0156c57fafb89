"""The on-disk cache of ``--backend auto``'s choices, so a second run starts without re-timing.

A choice is only valid for the machine and the code that measured it, so each cache file belongs
to one *environment* (:func:`environment`): the device's name (for the CPU its model and
PyTorch's thread count, which decides how fast each backend is), the torch, triton and
native-library versions (the library by a hash of its file, since it has no version of its own),
on CUDA the cuDNN and driver versions (either can change which kernel a convolution runs), and
the fp32 precision policy (:func:`precision_policy`: TF32 or exact, which changes what
cuBLAS/cuDNN compute and how fast, so a choice timed under one is never reused under the other).
The file is ``autotune-<hash of the environment>.json`` and repeats the environment inside, so a
file that does not match it, whatever its name, is ignored and then replaced.

Where (``PROGAN_FAST_AUTO_CACHE``):

- unset or empty: ``$XDG_CACHE_HOME/progan_fast/`` (``~/.cache/progan_fast/`` without it);
- ``0``, ``off``, ``false``, ``no`` or ``none``: no cache, every process times afresh;
- a path ending in ``.json``: that file; any other path: a folder for the ``autotune-*.json`` files.

Writes are atomic (a temporary file, then a rename) and merge with what other processes wrote
meanwhile. A cache that cannot be written is reported once and the run goes on without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

ENV_VAR = "PROGAN_FAST_AUTO_CACHE"
OFF_VALUES = {"0", "off", "false", "no", "none"}
FORMAT = 1


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _native_version() -> str | None:
    from . import _native

    if not _native.available():
        return None
    return hashlib.sha256(Path(_native._C.__file__).read_bytes()).hexdigest()[:16]


def _triton_version() -> str | None:
    from . import triton as triton_backend

    return getattr(triton_backend.triton, "__version__", None)


def _read(getter):
    """A setting's value, or None where this torch lacks it (or refuses to read it: some versions
    raise on the old ``allow_tf32`` flags once the newer ``fp32_precision`` ones were set)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = getter()
    except Exception:
        return None
    return value if isinstance(value, (bool, int, str)) or value is None else str(value)


#: The ``fp32_precision`` settings of newer torch (2.9+), where present: relative to ``torch.backends``.
FP32_PRECISION_SETTINGS = ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision",
                           "cudnn.conv.fp32_precision", "mkldnn.fp32_precision", "mkldnn.matmul.fp32_precision",
                           "mkldnn.conv.fp32_precision")


def _setting(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def precision_policy() -> dict:
    """How fp32 matmuls and convolutions may round: ``torch.get_float32_matmul_precision()``, the
    TF32 switches and, where this torch has them, the ``fp32_precision`` settings (None: absent)."""
    policy = {"float32_matmul_precision": _read(torch.get_float32_matmul_precision),
              "cuda.matmul.allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
              "cudnn.allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32)}
    for path in FP32_PRECISION_SETTINGS:
        value = _read(lambda path=path: _setting(path))
        if value is not None:
            policy[path] = value
    return policy


def driver_version() -> int | None:
    """The CUDA driver's version (e.g. 13000), or None where torch cannot say."""
    getter = getattr(torch.cuda, "driver_version", None) or getattr(torch._C, "_cuda_getDriverVersion", None)
    return None if getter is None else _read(getter)


def environment(device: torch.device) -> dict:
    """What a choice on ``device`` depends on besides the op and its inputs."""
    env = {"device": f"{device.type}: {device_name(device)}", "torch": torch.__version__,
           "triton": _triton_version(), "native": _native_version(), "fp32": precision_policy()}
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        env["cudnn"] = _read(torch.backends.cudnn.version)
        env["driver"] = driver_version()
    return env


def file_name(env: dict) -> str:
    return f"autotune-{hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]}.json"


def location(env: dict) -> Path | None:
    """The cache file for ``env`` under ``PROGAN_FAST_AUTO_CACHE`` (see the module docstring), or None when off."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if not value:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "progan_fast"
        return base / file_name(env)
    path = Path(value).expanduser()
    return path if path.suffix == ".json" else path / file_name(env)


class ChoiceCache:
    """``{key string: backend}`` for one environment, in the file ``path``; read once, lazily."""

    def __init__(self, path: Path, env: dict) -> None:
        self.path, self.env = Path(path), env
        self._choices: dict[str, str] | None = None
        self.ignored: str | None = None  # why an existing file was not used
        self.writable = True

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self.ignored = f"unreadable ({e})"
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("env") != self.env:
            self.ignored = "made for another device or other versions"
            return {}
        choices = data.get("choices")
        if not isinstance(choices, dict):
            self.ignored = "holds no choices"
            return {}
        return {str(k): str(v) for k, v in choices.items()}

    def get(self, key: str) -> str | None:
        if self._choices is None:
            self._choices = self._read()
        return self._choices.get(key)

    def put(self, key: str, backend: str) -> None:
        """Remember ``key -> backend`` and write the file (merged with what is there now)."""
        if self._choices is None:
            self._choices = self._read()
        self._choices[key] = backend
        if not self.writable:
            return
        merged = {**self._read(), **self._choices}
        text = json.dumps({"format": FORMAT, "env": self.env, "choices": merged}, indent=1, sort_keys=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text + "\n")
            tmp.replace(self.path)
        except OSError as e:
            self.writable = False
            print(f"note: --backend auto cannot write its cache {self.path} ({e}); choices are timed again next "
                  f"run (set {ENV_VAR} to a writable path, or to off)", file=sys.stderr)


def for_device(device: torch.device) -> ChoiceCache | None:
    """The cache for ``device`` where ``PROGAN_FAST_AUTO_CACHE`` allows one."""
    env = environment(device)
    path = location(env)
    return None if path is None else ChoiceCache(path, env)
