"""Python side of the CUDA emulation: loads ``libprogan_cuda_emu.so`` (see build.py) with ctypes,
puts torch CPU tensors into guarded buffers and calls the real launchers.

    emu = Emulator.load()                       # builds if needed
    emu.configure(seed=3, max_grid_blocks=2)    # every check is on by default
    x = emu.buffer(torch.randn(2, 5, 7), "x")   # a copy against a guard page
    y = emu.output(x.shape, torch.float32, "y") # filled with NaN: an element never written shows
    emu.call("pixel_norm_forward", emu.dtype_code(torch.float32), x, y, 2, 5, 7, 1e-8)
    y.read()                                    # a tensor again

A launch that fails raises :class:`EmulatedKernelError` with the runtime's report (the kernel, the
thread, the block, the index or the barrier). Tests only: nothing in ``progan_fast`` imports this.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# progan::cuda::DType (kernels/include/progan/cuda_launchers.h)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# The accumulation type the kernels use for each storage type (progan/math.h's acc_t).
ACC_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
              torch.float16: torch.float32}


class EmulatedKernelError(RuntimeError):
    """A launch failed in the emulator: out-of-bounds access, barrier or shuffle misuse, deadlock,
    invalid configuration. ``code`` is the cudaError_t the launcher returned."""

    def __init__(self, code: int, message: str):
        super().__init__(f"cudaError {code}: {message}")
        self.code = code
        self.report = message


def _load_build_module():
    spec = importlib.util.spec_from_file_location("progan_cuda_emulation_build", HERE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_module = _load_build_module()


class Buffer:
    """A tensor's bytes in emulator memory, against a guard page (freed with the object)."""

    def __init__(self, emulator: Emulator, shape, dtype: torch.dtype, name: str, placement: str):
        self._emu = emulator
        self.shape, self.dtype, self.name = tuple(shape), dtype, name
        self.numel = math.prod(self.shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = self.numel * itemsize
        self.ptr = emulator.lib.progan_emu_alloc(self.nbytes, itemsize, name.encode(), {"end": 0, "start": 1}[placement])
        if not self.ptr:
            raise MemoryError(f"emulator could not allocate {self.nbytes} bytes for {name!r}")

    def write(self, tensor: torch.Tensor) -> Buffer:
        t = tensor.detach().to(self.dtype).contiguous().cpu()
        assert t.numel() == self.numel, (t.shape, self.shape)
        ctypes.memmove(self.ptr, t.data_ptr(), self.nbytes)
        return self

    def fill_poison(self) -> Buffer:
        """0xff bytes: NaN in every float type, so an element the kernel never writes shows."""
        ctypes.memset(self.ptr, 0xFF, self.nbytes)
        return self

    def read(self) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=self.dtype)
        ctypes.memmove(t.data_ptr(), self.ptr, self.nbytes)
        return t

    def __del__(self):
        if getattr(self, "ptr", None):
            self._emu.lib.progan_emu_free(self.ptr)
            self.ptr = None


class Emulator:
    def __init__(self, library: Path | str):
        self.path = Path(library)
        self.lib = ctypes.CDLL(str(self.path))
        lib = self.lib
        lib.progan_emu_alloc.restype = ctypes.c_void_p
        lib.progan_emu_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int]
        lib.progan_emu_free.argtypes = [ctypes.c_void_p]
        lib.progan_emu_configure.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_int64]
        for name in ("progan_emu_take_error", "progan_emu_launched_kernels", "progan_emu_shared_variables"):
            getattr(lib, name).restype = ctypes.c_char_p
        self.configure()

    @classmethod
    def load(cls, build_dir: Path | str | None = None) -> Emulator:
        kwargs = {} if build_dir is None else {"build_dir": build_dir}
        return cls(build_module.build(**kwargs))

    def configure(self, seed: int = 1, interleave: bool = True, poison_shared: bool = True,
                  check_bounds: bool = True, check_sync: bool = True, max_grid_blocks: int = 65535 * 8) -> None:
        """Every check on by default; ``max_grid_blocks`` caps grid_for (several grid-stride passes)."""
        self.lib.progan_emu_configure(seed, interleave, poison_shared, check_bounds, check_sync, max_grid_blocks)
        self.lib.progan_emu_take_error()

    # ----- buffers ---------------------------------------------------------------------------
    def buffer(self, tensor: torch.Tensor, name: str, placement: str = "end") -> Buffer:
        return Buffer(self, tensor.shape, tensor.dtype, name, placement).write(tensor)

    def output(self, shape, dtype: torch.dtype, name: str, placement: str = "end") -> Buffer:
        return Buffer(self, shape, dtype, name, placement).fill_poison()

    def scalar(self, value: float, dtype: torch.dtype, name: str = "alpha") -> Buffer:
        """A 0-dim device scalar of the accumulation type of ``dtype`` (how the kernels read alpha)."""
        return self.buffer(torch.tensor(value, dtype=ACC_DTYPES[dtype]), name)

    @staticmethod
    def dtype_code(dtype: torch.dtype) -> int:
        return DTYPE_CODES[dtype]

    # ----- calls -----------------------------------------------------------------------------
    def call(self, launcher: str, *args) -> None:
        """Call ``progan_emu_<launcher>`` (a real launcher's C entry point); raise on any error."""
        fn = getattr(self.lib, f"progan_emu_{launcher}")
        fn.restype = ctypes.c_int
        code = fn(*(self._c_arg(a) for a in args))
        message = self.lib.progan_emu_take_error().decode()
        if code != 0 or message:
            raise EmulatedKernelError(code, message or "(no report)")

    def value(self, function: str, *args) -> int:
        fn = getattr(self.lib, f"progan_emu_{function}")
        fn.restype = ctypes.c_int64
        return fn(*(self._c_arg(a) for a in args))

    @staticmethod
    def _c_arg(a):
        if isinstance(a, Buffer):
            return ctypes.c_void_p(a.ptr)
        if a is None:
            return ctypes.c_void_p(None)
        if isinstance(a, bool):
            return ctypes.c_bool(a)
        if isinstance(a, int):
            return ctypes.c_int64(a)
        if isinstance(a, float):
            return ctypes.c_double(a)
        raise TypeError(f"cannot pass {type(a).__name__} to a launcher")

    def launched_kernels(self) -> set[str]:
        return set(filter(None, self.lib.progan_emu_launched_kernels().decode().split("\n")))

    def shared_variables(self) -> list[tuple[int, str]]:
        rows = filter(None, self.lib.progan_emu_shared_variables().decode().split("\n"))
        return [(int(size), name) for size, name in (r.split(" ", 1) for r in rows)]
