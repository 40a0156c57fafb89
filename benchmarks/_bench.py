"""Shared helpers for the op benchmarks (pytest-benchmark), used by every ``test_bench_<op>.py``.

Every ``test_bench_<op>.py`` parametrizes over :func:`backend_params` (every backend of the op's
table, plus ``compile`` = ``torch.compile`` of the eager reference), the ProGAN stages of
:data:`RESOLUTIONS`, :data:`DTYPES` and :data:`MODES`, and hands one case to :func:`run_case`.
The group of a case is ``"{op} {res}px {dtype} {layout} {mode}"`` (:data:`LAYOUTS`) so that ``--benchmark-group-by=group``
puts the backends of one case side by side.

Shapes are the paper's (batch from ``PAPER_BATCH``, channels from ``NetworkConfig(max_res=1024)``)
on a GPU; on the CPU they are scaled down (batch // 8, channels capped at 128, resolutions up to
64, which covers the 16x16 and 64x64 stages the native CPU twins are compared at) so that one call
takes well under a second.

Triton is only benchmarked on CUDA: under ``TRITON_INTERPRET=1`` its timings are meaningless, so
this file never sets it, and skips ``triton`` where it is set.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from progan_fast.networks import NetworkConfig
from progan_fast.ops._backend import KNOWN_BACKENDS
from progan_fast.schedule import PAPER_BATCH

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CONFIG = NetworkConfig(max_res=1024, fmap_base=8192, fmap_max=512)
MAX_RES = 1024 if ON_GPU else 64
RESOLUTIONS = [2**r for r in range(2, int(math.log2(MAX_RES)) + 1)]
#: CPU scale-down of the paper's shapes.
CPU_BATCH_DIVISOR = 8
CPU_MAX_CHANNELS = 128

#: Seconds of timed calls per case (rounds = this / one call's time, at least MIN_ROUNDS).
TARGET_SECONDS = float(os.environ.get("PROGAN_BENCH_TARGET_S", "0.25"))
MIN_ROUNDS = 5
MAX_ROUNDS = 2000
MODES = ("fwd", "fwd+bwd")
#: Activation memory layouts: NCHW, and NHWC (``torch.channels_last``, what train's
#: ``--channels-last`` runs); every op keeps its input's layout.
LAYOUTS = ("nchw", "nhwc")

#: CPUs with native bf16 arithmetic; elsewhere bf16 convolutions are emulated and very slow.
CPU_HAS_BF16 = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def op_module(name: str):
    """``progan_fast.ops.<name>`` as a module (the package re-exports functions of the same name)."""
    return importlib.import_module(f"progan_fast.ops.{name}")


# ----- shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    res: int
    batch: int
    channels: int  # feature maps of the layers at this resolution (capped on the CPU)


def channels(res: int) -> int:
    c = CONFIG.channels(res)
    return c if ON_GPU else min(c, CPU_MAX_CHANNELS)


def stage(res: int) -> Stage:
    batch = PAPER_BATCH[res] if ON_GPU else max(4, PAPER_BATCH[res] // CPU_BATCH_DIVISOR)
    return Stage(res, batch, channels(res))


def cap(c: int) -> int:
    """A channel count, capped on the CPU like :func:`channels`."""
    return c if ON_GPU else min(c, CPU_MAX_CHANNELS)


# ----- parameters -------------------------------------------------------------------------------


def _skip(value, reason: str):
    return pytest.param(value, marks=pytest.mark.skip(reason=reason))


def backend_params(table: dict[str, Callable]) -> list:
    """``reference``, ``compile``, then every other backend of ``table`` (``triton``, ``cuda``,
    ``cpu`` as they land), each a ``pytest.param`` skipped with a reason where it cannot be timed."""
    params = [pytest.param("reference"), pytest.param("compile")]
    others = [b for b in KNOWN_BACKENDS if b != "reference" and b in table]
    others += sorted(b for b in table if b not in KNOWN_BACKENDS and b != "reference")
    if "triton" not in others:
        params.append(_skip("triton", "triton backend not registered here (needs a CUDA GPU)"))
    for name in others:
        if name == "triton" and TRITON_INTERPRET:
            params.append(_skip(name, "TRITON_INTERPRET=1: the interpreter's timings are meaningless"))
        elif name == "triton" and not ON_GPU:
            params.append(_skip(name, "triton is only benchmarked on CUDA (on the CPU it needs the interpreter)"))
        else:
            params.append(pytest.param(name))
    return params


def dtype_params(elementwise: bool = True) -> list:
    """fp32 always; bf16 on a GPU, and on a CPU for element-wise ops or where it has native bf16."""
    params = [pytest.param(torch.float32, id="fp32")]
    if ON_GPU or elementwise or CPU_HAS_BF16:
        params.append(pytest.param(torch.bfloat16, id="bf16"))
    else:
        params.append(pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skip(
            reason=f"bf16 convolutions are emulated (slow) on this CPU "
                   f"({torch.backends.cpu.get_cpu_capability()})")))
    return params


def activation(*shape: int, layout: str, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    """A random activation of ``shape`` on the benchmark device, in ``layout`` (:data:`LAYOUTS`)."""
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def implementation(table: dict[str, Callable], backend: str) -> Callable:
    if backend == "compile":
        torch._dynamo.reset()  # each case compiles fresh for its shapes; no recompile limit is hit
        return torch.compile(table["reference"], dynamic=False)
    return table[backend]


# ----- memory floor -----------------------------------------------------------------------------


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def memory_floor_gbps() -> float:
    """Device copy bandwidth in GB/s (bytes read + written per second by a large ``copy_``)."""
    numel = (256 if ON_GPU else 32) * 2**20  # 1 GiB of fp32 on the GPU, 128 MiB on the CPU
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync()
    times = []
    for _ in range(10 if ON_GPU else 5):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / sorted(times)[len(times) // 2] / 1e9


# ----- one case ---------------------------------------------------------------------------------


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def run_case(
    benchmark,
    floor_gbps: float,
    *,
    op: str,
    res: int,
    dtype: torch.dtype,
    mode: str,
    backend: str,
    fn: Callable,
    inputs: Sequence[torch.Tensor],
    grad_inputs: Sequence[torch.Tensor] = (),
    layout: str = "nchw",
) -> None:
    """Time ``fn(*inputs)`` (``mode="fwd"``) or its forward + backward wrt ``grad_inputs``
    (``mode="fwd+bwd"``; those tensors must require grad, and be among ``inputs``).

    ``extra_info["bytes"]`` is the least the op must move: every input read once and every output
    written once; fwd+bwd adds the output gradient read and the input gradients written.
    """
    benchmark.group = f"{op} {res}px {DTYPE_NAMES[dtype]} {layout} {mode}"
    benchmark.extra_info.update(op=op, res=res, dtype=DTYPE_NAMES[dtype], layout=layout, mode=mode, backend=backend)

    if mode == "fwd":
        def call():
            with torch.no_grad():
                out = fn(*inputs)
            _sync()
            return out
    else:
        assert grad_inputs and all(t.requires_grad for t in grad_inputs)
        grad_outs = [torch.randn_like(t.detach()) for t in _tensors(fn(*inputs))]

        def call():
            outs = _tensors(fn(*inputs))
            grads = torch.autograd.grad(outs, list(grad_inputs), grad_outs)
            _sync()
            return grads

    # Warm up outside the timed region: torch.compile compiles here, Triton autotunes here.
    out_bytes = sum(t.nbytes for t in (_tensors(call()) if mode == "fwd" else grad_outs))
    nbytes = sum(t.nbytes for t in inputs) + out_bytes
    if mode != "fwd":
        nbytes += out_bytes + sum(t.nbytes for t in grad_inputs)
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.disabled:  # smoke run: each case once more, through the fixture
        benchmark(call)
        return

    call()
    t0 = time.perf_counter()
    call()
    once = max(time.perf_counter() - t0, 1e-7)
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_SECONDS / once)))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    gbps = nbytes / median / 1e9
    benchmark.extra_info["gbps"] = round(gbps, 2)
    benchmark.extra_info["pct_of_floor"] = round(gbps / floor_gbps * 100, 1)
    benchmark.extra_info["floor_gbps"] = round(floor_gbps, 2)


def skip_compile_in_smoke(benchmark, backend: str, first: bool) -> None:
    """Under ``--benchmark-disable`` compile only the first stage of an op (compiling is the cost)."""
    if backend == "compile" and benchmark.disabled and not first:
        pytest.skip("--benchmark-disable: torch.compile is smoke-tested at the first stage only")
