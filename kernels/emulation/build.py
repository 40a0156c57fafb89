"""Build the CPU emulation of the CUDA kernels: ``libprogan_cuda_emu.so`` (tests only; README.md here).

    python kernels/emulation/build.py [--build-dir DIR]

The library holds every ``kernels/cuda/*.cu`` compiled by the host C++ compiler against this
directory's headers, the emulator's runtime, C entry points for every launcher and the self-test
kernels. The one change to the CUDA source text is a rewrite step, applied to a copy in the build
directory: each launch ``k<<<grid, block, smem, stream>>>(args)`` becomes
``::progan_emu::launch(k, "k", __FILE__, __LINE__, grid, block, smem, stream)(args)``, and a
dynamic shared array ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic
shared memory. Kernel bodies, device functions and launchers are otherwise the bytes nvcc compiles,
and a ``#line`` directive keeps every report pointing at the original file and line.

ninja (a project dependency) does the compiling, incrementally; :func:`build` returns the library's
path. ``sources`` lets a caller substitute the text of any source (tools' mutation runs).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent
ROOT = KERNELS.parent
DEFAULT_BUILD_DIR = ROOT / "build" / "cuda-emulation"
LIBRARY = "libprogan_cuda_emu.so"

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_]\w*(?:::\w+)*(?:<[^<>;(){}]*>)?)\s*<<<(?P<config>.*?)>>>\s*\(", re.S)
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")


class EmulationBuildError(RuntimeError):
    """The emulation library did not compile (the message holds the compiler's output)."""


def rewrite(text: str, path: str) -> str:
    """The emulation's version of one CUDA source: launches and dynamic shared arrays rewritten
    (newlines inside a launch are kept, so every later line keeps its number)."""
    def launch(m: re.Match) -> str:
        kernel = m["kernel"]
        return f'::progan_emu::launch({kernel}, "{kernel}", __FILE__, __LINE__, {m["config"]})('

    def shared(m: re.Match) -> str:
        return f"{m['type']}* const {m['name']} = ::progan_emu::dynamic_shared<{m['type']}>();"

    out = EXTERN_SHARED.sub(shared, LAUNCH.sub(launch, text))
    if "<<<" in out:
        line = out[: out.index("<<<")].count("\n") + 1
        raise EmulationBuildError(f"{path}:{line}: a kernel launch the rewrite step does not understand")
    return f'#line 1 "{path}"\n{out}'


def _has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " fma " in f" {line.split(':', 1)[1]} " for line in f)
    except OSError:
        return False


def compile_flags() -> list[str]:
    """Host flags for the emulated device code. nvcc contracts a*b+c into FMAs by default, so the
    emulation does too (on a CPU with FMA); it cannot contract the same expressions nvcc does, so
    results may differ from a device's in the last bits (tests' tolerances allow for it).

    ``-fsanitize=bounds-strict`` with traps checks every index into an array of known size (a
    kernel's local arrays, Vec's elements, __shared__ arrays); the runtime reports the trap (SIGILL)
    with the kernel and the thread, as it reports a guard-page fault."""
    flags = ["-std=c++17", "-O1", "-fPIC", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing",
             "-ffp-contract=fast", "-fsanitize=bounds-strict", "-fsanitize-undefined-trap-on-error", f"-I{HERE / 'include'}", f"-I{KERNELS / 'include'}",
             "-DPROGAN_MAX_GRID_BLOCKS=(::progan_emu::max_grid_blocks())"]
    if _has_fma():
        flags.append("-mfma")
    return flags


def cuda_sources() -> list[Path]:
    return sorted((KERNELS / "cuda").glob("*.cu")) + [HERE / "selftest.cu"]


def cuda_headers() -> list[Path]:
    return sorted((KERNELS / "cuda").glob("*.cuh"))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build(build_dir: Path | str = DEFAULT_BUILD_DIR, sources: dict[Path, str] | None = None,
          jobs: int | None = None) -> Path:
    """Compile (incrementally) and return the path of the emulation library."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise EmulationBuildError(f"no C++ compiler ({cxx!r}) on PATH")
    ninja = shutil.which("ninja")
    if ninja is None:
        raise EmulationBuildError("ninja is not on PATH (pip install ninja)")
    build_dir = Path(build_dir)
    (build_dir / "src").mkdir(parents=True, exist_ok=True)
    sources = {Path(k).resolve(): v for k, v in (sources or {}).items()}
    units = []
    for src in cuda_sources() + cuda_headers():
        text = sources.get(src.resolve(), None)
        text = src.read_text() if text is None else text
        # A .cu becomes a C++ unit; a .cuh is copied beside them, where `#include "common.cuh"` finds it.
        out = build_dir / "src" / (f"{src.stem}.cu.cpp" if src.suffix == ".cu" else src.name)
        _write_if_changed(out, rewrite(text, str(src)))
        if src.suffix == ".cu":
            units.append(out)
    units += [HERE / "runtime.cpp", HERE / "launchers.cpp"]
    flags = shlex.join(compile_flags())
    lines = [
        f"cxx = {cxx}",
        f"flags = {flags}",
        "rule cxx",
        "  command = $cxx $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        "  command = $cxx -shared $in -o $out -ldl",
    ]
    objects = []
    for unit in units:
        obj = build_dir / "obj" / (unit.name + ".o")
        objects.append(obj)
        lines.append(f"build {obj}: cxx {unit}")
    library = build_dir / LIBRARY
    lines.append(f"build {library}: link {' '.join(map(str, objects))}")
    _write_if_changed(build_dir / "build.ninja", "\n".join(lines) + "\n")
    cmd = [ninja, "-C", str(build_dir)] + ([f"-j{jobs}"] if jobs else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationBuildError(f"building the CUDA emulation failed:\n{proc.stdout}{proc.stderr}")
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default=str(DEFAULT_BUILD_DIR), help="where to build (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        print(build(args.build_dir))
    except EmulationBuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
