"""Mutation check of the emulated CUDA tests: every planted bug must make an emulated test fail.

    python kernels/emulation/mutants.py [--jobs 2] [--list]

The mutants are every way of breaking synchronization, bounds or the NHWC layout in kernels/cuda's
device code: each ``__syncthreads()`` removed, each ``<`` comparison of device code (a loop bound,
a mask, a lane or row check) loosened to ``<=``, and each layout choice ``CL ? nhwc : nchw`` (or
``channels_last ? ...``) made to take its NCHW value in NHWC too, one at a time. For each, the
emulation library is rebuilt with that one change and the emulated tests run against it: the whole
of tests/test_cuda_emulated.py and the channels-last files' NHWC kernel tests (EMULATED_TESTS); a
mutant the tests pass "survives". Exit status 1 if any survives (listed with its file and line), 0
otherwise. CI runs this (``.ci/run``); it takes a few minutes, so it is not part of the test command.
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

#: The tests run against each mutant: every emulated kernel test, NCHW and NHWC. The channels-last
#: files hold the NHWC tests of fade_in, fade_reals, blend, downsample2x and minibatch_stddev
#: (tests/test_cuda_emulated.py has pixel norm's and the conv epilogue's); they run first, as they
#: take a second or two and pytest stops at the first failure (-x).
EMULATED_TESTS = [
    "tests/test_channels_last_fade_in.py::test_cuda_kernels_on_nhwc_through_the_emulator",
    "tests/test_channels_last_blend.py::test_cuda_kernels_on_nhwc_through_the_emulator",
    "tests/test_channels_last_downsample2x.py::test_cuda_kernels_on_nhwc_through_the_emulator",
    "tests/test_channels_last_minibatch_stddev.py::test_cuda_kernels_emulated_nhwc",
    "tests/test_channels_last_minibatch_stddev.py::test_cuda_kernels_emulated_nhwc_against_guard_pages",
    "tests/test_cuda_emulated.py",
]

#: A layout choice in device code, ``CL ? <NHWC value> : <NCHW value>`` (one line, no nesting).
LAYOUT_CHOICE = re.compile(r"\b(?:CL|channels_last) \? (?P<nhwc>[^:;?]+?) : (?P<nchw>[^;,?\]]+?)(?=[;,\]])")


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
        if self.new == "":
            what = "removed __syncthreads()"
        elif self.old == " < ":
            what = "'<' -> '<='"
        else:
            what = f"NHWC takes the NCHW value: '{self.old}' -> '{self.new}'"
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
            for m in LAYOUT_CHOICE.finditer(text[start:end]):
                mutants.append(Mutant(path, start + m.start("nhwc"), m.group("nhwc"), m.group("nchw")))
    return sorted(set(mutants), key=lambda x: (str(x.path), x.offset))


def run_one(mutant: Mutant, workdir: Path, timeout: float) -> tuple[Mutant, str]:
    """'killed' (a test failed), 'survived', or 'build failed: ...'."""
    build_dir = workdir / f"m{abs(hash((str(mutant.path), mutant.offset))) % 10**8}"
    try:
        library = emulation_build.build(build_dir, sources={mutant.path: mutant.apply()}, jobs=1)
    except emulation_build.EmulationBuildError as e:
        return mutant, f"build failed: {str(e).splitlines()[-1]}"
    env = dict(os.environ, PROGAN_CUDA_EMULATION_LIBRARY=str(library))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *EMULATED_TESTS]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return mutant, "killed (timed out: the tests hang on it)"
    if proc.returncode not in (0, 1):  # 1: a test failed; anything else (no such test, usage) kills nothing
        return mutant, f"error: pytest exit status {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}"
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
