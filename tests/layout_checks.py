"""Channels-last test helpers, shared by every tests/test_channels_last_*.py file:
the backends to run, inputs in either dense layout, layout assertions, the hidden-copy detector and the CUDA emulator.

Not a test file (no ``test_`` prefix); the test files import it by name (tests/ is on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from progan_fast.ops import _native
from progan_fast.ops import triton as triton_backend
from progan_fast.ops.common import is_channels_last

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last
#: Triton runs on a GPU when there is one, else on CPU tensors under the interpreter (conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends() -> list:
    """``(backend, device)`` for every backend available here, as pytest params."""
    out = [pytest.param(("reference", "cpu"), id="reference")]
    if triton_backend.available():
        out.append(pytest.param(("triton", TRITON_DEVICE), id="triton"))
    if _native.available():
        out.append(pytest.param(("cpu", "cpu"), id="cpu"))
        if _native.cuda_available():
            out.append(pytest.param(("cuda", "cuda"), id="cuda"))
    return out


def layout_id(channels_last: bool) -> str:
    return "nhwc" if channels_last else "nchw"


def layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` dense in NHWC (``channels_last``) or NCHW."""
    return t.contiguous(memory_format=CL) if channels_last else t.contiguous()


def randn(shape, dtype=torch.float32, channels_last=False, device="cpu", seed=0) -> torch.Tensor:
    """A random tensor (drawn in float64, so every dtype sees the same values) in the given layout."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.contiguous(memory_format=CL) if channels_last else t.contiguous()


def assert_layout(t: torch.Tensor, channels_last: bool, what: str) -> None:
    """``t`` is dense in the expected layout (NHWC and not also NCHW, or NCHW)."""
    if channels_last:
        assert is_channels_last(t), f"{what}: expected channels-last, got strides {t.stride()} for {tuple(t.shape)}"
    else:
        assert t.is_contiguous(), f"{what}: expected NCHW, got strides {t.stride()} for {tuple(t.shape)}"


# ----- no hidden copy -----------------------------------------------------------------------------

COPY_OPS = ("aten::clone", "aten::copy_", "aten::contiguous", "aten::_to_copy", "aten::to")


def activation_copies(fn, activations) -> list[str]:
    """The copy ops (clone, copy_, contiguous, to) that ``fn()`` runs on a tensor with the shape of
    one of ``activations`` (tensors or shapes; a weight's copy has another shape and is allowed), recorded by the profiler (record_shapes). ATen calls from C++ go through
    the dispatcher, so the native glue's ``.contiguous()`` shows here as well as Python's.

    Under Triton's interpreter the launcher mirrors every argument's storage through 1-d host
    buffers (``aten::copy_`` of ``[numel]``); those have no 4-d shape, so they do not match, and
    an op-level copy of an activation (``.contiguous()``, ``clone``) still does: the check stays
    clean and can still fail there."""
    shapes = {tuple(a.shape if isinstance(a, torch.Tensor) else a) for a in activations}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [f"{e.name}{e.input_shapes}" for e in prof.events()
            if e.name in COPY_OPS and any(tuple(s) in shapes for s in e.input_shapes if isinstance(s, list))]


# ----- the CUDA kernels through the emulator (as tests/test_cuda_emulated.py) --------------------

# tests/test_cuda_emulated.py as a module, loaded once for every channels-last file: its kernel
# runners (run_pixel_norm, run_minibatch_stddev, ...) take channels_last, and its emulator module is
# the one whose EmulatedKernelError the emulators made here raise.
_spec = importlib.util.spec_from_file_location("_progan_cuda_emulated_tests", ROOT / "tests" / "test_cuda_emulated.py")
cuda_emulated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_emulated)
emulator = cuda_emulated.emulator

EMU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: tests/test_cuda_emulated.py's tolerances: one rounding on store in the accumulation type.
EMU_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def load_emulator():
    """The emulation library (built on first use; PROGAN_CUDA_EMULATION_LIBRARY names another build, as
    kernels/emulation/mutants.py does). A build failure skips here and fails under CI."""
    try:
        library = os.environ.get("PROGAN_CUDA_EMULATION_LIBRARY")
        return emulator.Emulator(library) if library else emulator.Emulator.load()
    except emulator.build_module.EmulationBuildError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"the CUDA emulation did not build here: {exc}")


def configure(emu, name: str, cap) -> None:
    """Every check on, a seed from the case's name, and at most ``cap`` blocks per grid."""
    emu.configure(seed=zlib.crc32(name.encode()), max_grid_blocks=cap or 65535 * 8)


def emu_buffer(emu, t: torch.Tensor, name: str, channels_last: bool):
    """A device buffer holding ``t``'s elements in the layout's memory order."""
    return emu.buffer(t.permute(0, 2, 3, 1) if channels_last else t, name)


def emu_output(emu, shape, dtype, name: str, channels_last: bool):
    n, c, h, w = shape
    return emu.output((n, h, w, c) if channels_last else shape, dtype, name)


def emu_read(buf, channels_last: bool) -> torch.Tensor:
    """The output buffer as an ``[N, C, H, W]`` tensor."""
    t = buf.read()
    return t.permute(0, 3, 1, 2) if channels_last else t


def emu_check(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> None:
    assert not torch.isnan(got).any(), f"{what}: NaN (an element never written)"
    torch.testing.assert_close(got.double(), want.double(), **EMU_TOL[dtype], msg=lambda m: f"{what}: {m}")


# ----- expectations ---------------------------------------------------------------------------------

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def ambiguous(shape) -> bool:
    """Dense in both layouts (C == 1 or H * W == 1): such a tensor counts as NCHW (ops/common.py)."""
    return shape[1] == 1 or shape[2] * shape[3] == 1


def assert_in_layout_of(t: torch.Tensor, channels_last: bool, what: str) -> None:
    """``t`` is in the layout the contract gives it when its op's deciding input had ``channels_last``:
    NHWC, except for a shape dense in both layouts, which is NCHW-contiguous either way."""
    assert_layout(t, channels_last and not ambiguous(t.shape), what)
