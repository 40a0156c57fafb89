"""Compile every Triton kernel ahead of time for given GPU architectures, without a GPU, and report
registers per thread, register spills (local memory) and shared memory per kernel and config.

    python -m progan_fast.ops.kernel_report [--arch 80 90] [--json]

Each config is compiled with the specialization a real launch gets (:func:`launch_attrs`: pointers and
integer sizes divisible by 16), so the registers and spills reported are those of the code that runs.

Exit code 1 when any kernel spills. Triton compiles through its bundled ptxas; ``cuobjdump`` (also
bundled with Triton) reads the resource usage off the cubin. Must run with ``TRITON_INTERPRET``
unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def kernel_modules() -> list[str]:
    """Every module of :mod:`progan_fast.ops.triton` (one per op, ``ops/triton/<op>.py``), by name."""
    from . import triton as triton_backend

    return sorted(f"{triton_backend.__name__}.{m.name}" for m in pkgutil.iter_modules(triton_backend.__path__))


def all_specs() -> list:
    """The ``AOT_SPECS`` of every kernel module, in a fixed order (workers pick specs by index)."""
    specs = []
    for module in kernel_modules():
        specs += getattr(importlib.import_module(module), "AOT_SPECS", [])
    return specs


def launch_attrs(spec) -> dict:
    """The argument attributes a real launch compiles with: Triton's JIT marks a pointer whose address
    is a multiple of 16 (every fresh PyTorch allocation) and an integer that is a multiple of 16 (the
    sizes at the widths that train: channels, pixels per sample, element counts) with
    ``tt.divisibility = 16``, which lets it vectorize loads and simplify index math, and so changes
    registers and spills. Keyed by the argument's position among all the kernel's arguments, as the
    JIT keys them (triton 3.6-3.9). Integers that are 1 at a launch are constexprs in the spec itself."""
    return {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in spec.signature.items() if kind.startswith("*") or kind in ("i32", "i64")}


def compile_spec(spec, arch: int):
    """``spec`` compiled for ``sm_<arch>`` as a launch on 16-aligned tensors and sizes would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**spec.signature, **{name: "constexpr" for name in spec.constexprs}}
    return triton.compile(
        ASTSource(fn=spec.kernel, signature=signature, constexprs=spec.constexprs, attrs=launch_attrs(spec)),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )


def compile_and_measure(spec, arch: int, workdir: pathlib.Path) -> dict:
    import triton

    compiled = compile_spec(spec, arch)
    cubin = workdir / f"kernel_sm{arch}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    match = RESOURCE.search(out)
    if not match:
        raise RuntimeError(f"no resource line for {spec!r} from cuobjdump:\n{out}")
    regs, stack, shared, local = map(int, match.groups())
    return {"kernel": repr(spec), "arch": f"sm_{arch}", "regs": regs, "spill_bytes": local + stack,
            "shared_bytes": max(shared, compiled.metadata.shared)}


def _measure_job(job: tuple[int, int], tmp: str) -> dict:
    """Worker: specs hold kernel objects, so each process rebuilds the list and picks by index."""
    index, arch = job
    workdir = pathlib.Path(tmp) / f"job{index}_{arch}"
    workdir.mkdir()
    return compile_and_measure(all_specs()[index], arch, workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="progan_fast.ops.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities to compile for")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_report: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    # A fresh cache, so every kernel is really compiled (and measured) here. Compiles are
    # independent and CPU-bound: one worker process per core.
    jobs = [(i, arch) for i in range(len(all_specs())) for arch in args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            rows = list(pool.map(_measure_job, jobs, [tmp] * len(jobs)))
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'kernel[config]':<80} {'arch':>6} {'regs':>5} {'spill B':>8} {'smem B':>7}")
        for r in rows:
            print(f"{r['kernel']:<80} {r['arch']:>6} {r['regs']:>5} {r['spill_bytes']:>8} {r['shared_bytes']:>7}")
    return 1 if any(r["spill_bytes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
