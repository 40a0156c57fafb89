"""Compile every CUDA kernel source with nvcc alone (no torch, no GPU) for each architecture, with
``-Xptxas -v`` and warnings as errors; print registers, spills and shared memory per kernel.

    python kernels/check_cuda.py [--arch 80 90] [--nvcc PATH]

Exit status 1 on a compiler error or warning, or on any register spill; 0 with a table otherwise;
77 (skip) when no nvcc is found. CI runs it (``.ci/run``); the kernels must stay free of torch headers
for this to work.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("CUDA_HOME"):
        return os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    found = shutil.which("nvcc") or sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"progan::cuda::\(anonymous namespace\)::", "", o) for o in out]
    short = [re.sub(r"\(.*\)$", "", s).replace("__nv_bfloat16", "bf16").replace("__half", "fp16") for s in short]
    return dict(zip(names, short))


def compile_one(nvcc: str, source: str, arch: int, tmp: str) -> tuple[str, int, str]:
    out = os.path.join(tmp, f"{os.path.basename(source)}.sm{arch}.o")
    cmd = [nvcc, "-std=c++17", "-O3", "-lineinfo", f"-I{os.path.join(HERE, 'include')}",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra", "-c", source, "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode, proc.stdout + proc.stderr


def parse(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": None, "spill": 0, "smem": 0}
            rows.append(current)
        elif current and (m := SPILL.search(line)):
            current["spill"] = int(m.group(2)) + int(m.group(3))
        elif current and (m := USED.search(line)):
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--nvcc")
    args = parser.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if not nvcc or not os.path.exists(nvcc):
        print("check_cuda: no nvcc found (set CUDA_HOME); skipped", file=sys.stderr)
        return 77
    sources = sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu")))
    jobs = [(s, a) for s in sources for a in args.arch]
    failed = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for source, rc, log in pool.map(lambda j: compile_one(nvcc, j[0], j[1], tmp), jobs):
            if rc != 0:
                failed = True
                print(f"check_cuda: {os.path.relpath(source)} failed to compile cleanly:\n{log}", file=sys.stderr)
            rows += [dict(r, source=os.path.basename(source)) for r in parse(log)]
    names = demangle([r["kernel"] for r in rows])
    print(f"{'kernel':<72} {'arch':>6} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for r in sorted(rows, key=lambda r: (r["source"], names[r["kernel"]], r["arch"])):
        print(f"{names[r['kernel']][:72]:<72} {r['arch']:>6} {r['regs']:>5} {r['spill']:>8} {r['smem']:>7}")
    spills = [r for r in rows if r["spill"]]
    for r in spills:
        print(f"check_cuda: {names[r['kernel']]} spills {r['spill']} bytes on {r['arch']}", file=sys.stderr)
    print(f"check_cuda: {len(rows)} kernels, {len(sources)} sources, sm_{', sm_'.join(map(str, args.arch))}; "
          f"{len(spills)} spilling; {'FAILED' if failed or spills else 'ok'}")
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
