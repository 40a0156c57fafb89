"""Mutation check of the emulated CUDA tests: every planted bug must make tests/test_cuda_emulated.py fail.

    python kernels/emulation/mutants.py [--jobs 2] [--list]

The mutants are every way of breaking synchronization or bounds in kernels/cuda's device code:
each ``__syncthreads()`` removed, and each ``<`` comparison of device code (a loop bound, a mask,
a lane or row check) loosened to ``<=``, one at a time. For each, the emulation library is rebuilt
with that one change and the emulated tests run against it; a mutant the tests pass "survives".
Exit status 1 if any survives (listed with its file and line), 0 otherwise. CI runs this
(``.ci/run``); it takes a few minutes, so it is not part of the test command.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA = ROOT / "kernels" / "cuda"
sys.path.insert(0, str(HERE))
import build as emulation_build  # noqa: E402  (this directory's build.py)


@dataclass(frozen=True)
class Mutant:
    path: Path
    offset: int  # where the replaced text starts
    old: str
    new: str

    @property
    def line(self) -> int:
        return self.path.read_text()[: self.offset].count("\n") + 1

    def describe(self) -> str:
        what = "removed __syncthreads()" if self.new == "" else f"'{self.old.strip()}' -> '{self.new.strip()}'"
        return f"{self.path.relative_to(ROOT)}:{self.line}: {what}"

    def apply(self) -> str:
        text = self.path.read_text()
        assert text[self.offset: self.offset + len(self.old)] == self.old
        return text[: self.offset] + self.new + text[self.offset + len(self.old):]


def device_code_spans(text: str) -> list[tuple[int, int]]:
    """Where device code is: each __global__/__device__ function's body, and the GRID_STRIDE macro."""
    spans = []
    for m in re.finditer(r"__(?:global|device)__[^;{]*?\)\s*\{", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        spans.append((m.end(), i))
    for m in re.finditer(r"#define GRID_STRIDE.*?(?:\\\n.*?)*\n", text):
        spans.append((m.start(), m.end()))
    return spans


def find_mutants() -> list[Mutant]:
    mutants = []
    for path in sorted(CUDA.glob("*.cu")) + [CUDA / "common.cuh"]:
        text = path.read_text()
        for m in re.finditer(r"__syncthreads\(\);", text):
            mutants.append(Mutant(path, m.start(), m.group(0), ""))
        for start, end in device_code_spans(text):
            for m in re.finditer(r" < ", text[start:end]):
                mutants.append(Mutant(path, start + m.start(), " < ", " <= "))
    return sorted(set(mutants), key=lambda x: (str(x.path), x.offset))


def run_one(mutant: Mutant, workdir: Path, timeout: float) -> tuple[Mutant, str]:
    """'killed' (a test failed), 'survived', or 'build failed: ...'."""
    build_dir = workdir / f"m{abs(hash((str(mutant.path), mutant.offset))) % 10**8}"
    try:
        library = emulation_build.build(build_dir, sources={mutant.path: mutant.apply()}, jobs=1)
    except emulation_build.EmulationBuildError as e:
        return mutant, f"build failed: {str(e).splitlines()[-1]}"
    env = dict(os.environ, PROGAN_CUDA_EMULATION_LIBRARY=str(library))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           str(ROOT / "tests" / "test_cuda_emulated.py")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return mutant, "killed (timed out: the tests hang on it)"
    return mutant, "survived" if proc.returncode == 0 else "killed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per mutant's test run")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument("--only", default="", help="only the mutants whose description contains this text")
    args = parser.parse_args(argv)
    mutants = [m for m in find_mutants() if args.only in m.describe()]
    if args.list:
        for m in mutants:
            print(m.describe())
        print(f"{len(mutants)} mutants")
        return 0
    t0 = time.time()
    survived = []
    with tempfile.TemporaryDirectory(prefix="progan-mutants-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        for mutant, result in pool.map(lambda m: run_one(m, Path(tmp), args.timeout), mutants):
            print(f"{result:10s} {mutant.describe()}", flush=True)
            if not result.startswith("killed"):
                survived.append(mutant)
    print(f"{len(mutants) - len(survived)} of {len(mutants)} mutants killed in {time.time() - t0:.0f} s")
    if survived:
        print("survivors (a bug the emulated tests do not catch):", file=sys.stderr)
        for m in survived:
            print(f"  {m.describe()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
