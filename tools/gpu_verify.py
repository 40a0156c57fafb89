"""The first GPU session in one command: install, build the CUDA kernels, test on the GPU, benchmark.

    python tools/gpu_verify.py                 # on a machine with a GPU and its own torch (2.11-2.14)
    python tools/gpu_verify.py --dry-run       # anywhere: check the install and print the plan (CI runs this)

Stages, in order, each with a time cap so that the whole run fits in ``--budget`` seconds (8 minutes by
default, what one H100 session is given):

1. ``install``: ``pip install --no-build-isolation -e .[test]`` against the torch already there (no
   ``constraints.txt``: the GPU machine's torch is kept), with the CUDA kernels built for this GPU's
   architecture only (``PROGAN_FAST_CUDA=1``, ``PROGAN_FAST_CUDA_ARCHS``); ``--no-deps`` when every
   dependency already imports, ``--no-index --find-links DIR`` with ``--wheelhouse DIR`` (a GPU machine
   may have no network); then ``python -m progan_fast.ops.native_status``.
2. ``cuda-tests``: ``pytest -m cuda`` (every test marked as needing a GPU).
3. ``op-tests``: the Triton and op tests, which run on the GPU when one is visible.
4. ``native-tests``: the native library's tests (its CUDA kernels among them) under
   ``compute-sanitizer --tool memcheck`` where that tool exists, plainly otherwise.
5. ``bench-8``, ``bench-32``, ``bench-128``: ``python -m progan_fast.bench`` at that resolution with paper
   widths: reference, triton, cuda and auto, each plain, ``+amp``, ``+graphs`` and ``+amp+graphs``; at
   32 px also ``+cl``, ``+amp+cl`` and ``+amp+graphs+cl`` (channels-last activations).

Each stage's output goes to ``OUT/<stage>.log``; ``OUT/report.json`` holds every stage (command, exit
code, seconds, whether it was cut and why, the pytest counts) and ``OUT/summary.md`` the same as tables,
with the benchmark figures. A stage that reaches its cap is stopped and marked ``cut``; the run goes on
with the next stage. The exit code is 0 only when every stage ran to the end and passed.

This file imports nothing outside the standard library at module level: it must run before the project
(or even torch) is importable, so that ``--dry-run`` can say what is missing.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROG = "tools/gpu_verify.py"

#: What the project imports at run time or in its tests (module name: pip name).
DEPENDENCIES = {"numpy": "numpy", "PIL": "Pillow", "tqdm": "tqdm", "tensorboard": "tensorboard", "nvtx": "nvtx",
                "pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}
BUILD_TOOLS = {"setuptools": "setuptools", "wheel": "wheel", "ninja": "ninja"}
SUPPORTED_TORCH = ((2, 11), (2, 14))  # inclusive, major.minor
SUPPORTED_TRITON = (3, 6)  # oldest


@dataclass
class Stage:
    name: str
    cap_s: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    why: str = ""  # what the stage proves, for the plan and the summary


@dataclass
class StageResult:
    name: str
    command: str
    cap_s: int
    status: str  # passed, failed, cut, skipped
    seconds: float = 0.0
    returncode: int | None = None
    detail: str = ""  # pytest's closing line, or why the stage was cut or skipped
    log: str = ""


# ----- what this machine has -------------------------------------------------------------------------

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in a CUDA toolkit's bin folder (CUDA_HOME, /usr/local/cuda*)."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            path = os.path.join(home, sub, name)
            if os.access(path, os.X_OK):
                return path
    return None


def probe() -> dict:
    """What is installed, as plain data (also saved in the report)."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "problems": [], "notes": []}
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        info["problems"].append(f"torch does not import ({e}); install PyTorch 2.11-2.14 first")
        torch = None
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        version = _version_tuple(torch.__version__)[:2]
        if not SUPPORTED_TORCH[0] <= version <= SUPPORTED_TORCH[1]:
            info["problems"].append(f"torch {torch.__version__} is outside the supported 2.11-2.14")
        if torch.version.cuda is None:
            info["notes"].append(f"torch {torch.__version__} is a CPU build: no CUDA kernels, no GPU stages")
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if info["gpu"]:
            major, minor = torch.cuda.get_device_capability(0)
            info["arch"] = f"{major}{minor}"
    try:
        triton = importlib.import_module("triton")
        info["triton"] = triton.__version__
        if _version_tuple(triton.__version__)[:2] < SUPPORTED_TRITON:
            info["problems"].append(f"triton {triton.__version__} is older than 3.6")
    except ImportError as e:
        info["triton"] = None
        info["problems"].append(f"triton does not import ({e})")
    info["missing"] = [pip for module, pip in DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    info["missing_build_tools"] = [pip for module, pip in BUILD_TOOLS.items() if importlib.util.find_spec(module) is None]
    info["nvcc"] = find_tool("nvcc")
    info["compute_sanitizer"] = find_tool("compute-sanitizer")
    if info["missing_build_tools"]:
        info["problems"].append("missing build tools: " + ", ".join(info["missing_build_tools"]))
    if not info["nvcc"]:
        info["notes"].append("no nvcc: the CUDA kernels cannot be built; the cuda backend will be unavailable")
    if not info["compute_sanitizer"]:
        info["notes"].append("no compute-sanitizer: the native tests run without memcheck")
    return info


# ----- the plan ----------------------------------------------------------------------------------------

#: Seconds per stage; they add up to the 8-minute default budget.
CAPS = {"install": 135, "native-status": 15, "cuda-tests": 70, "op-tests": 70, "native-tests": 55,
        "bench-8": 30, "bench-32": 50, "bench-128": 55}


def plan(info: dict, out: Path, wheelhouse: Path | None, skip_install: bool) -> list[Stage]:
    py = sys.executable
    stages: list[Stage] = []
    if not skip_install:
        pip = [py, "-m", "pip", "install", "--no-build-isolation"]
        if wheelhouse is not None:
            pip += ["--no-index", "--find-links", str(wheelhouse)]
        elif not info["missing"]:
            pip += ["--no-deps"]  # everything imports already: do not let pip reach for the network
        pip += ["-e", ".[test]"]
        env = {"PROGAN_FAST_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
        if info.get("arch"):
            env["PROGAN_FAST_CUDA_ARCHS"] = info["arch"]  # one architecture: the build takes a fraction of the time
        stages.append(Stage("install", CAPS["install"], pip, env,
                            "installs the project against this torch and builds the CUDA kernels for this GPU"))
        stages.append(Stage("native-status", CAPS["native-status"], [py, "-m", "progan_fast.ops.native_status"],
                            why="says whether progan_fast._C loaded with its CUDA kernels"))

    def pytest(name: str, args: list[str]) -> list[str]:
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(out / f"{name}.xml")] + args

    stages.append(Stage("cuda-tests", CAPS["cuda-tests"], pytest("cuda-tests", ["-m", "cuda"]),
                        why="every test marked cuda: graphs vs eager, GPU vs CPU networks, resume across devices"))
    op_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_triton_*.py"))
    stages.append(Stage("op-tests", CAPS["op-tests"], pytest("op-tests", op_tests + ["tests/test_ops.py"]),
                        why="every Triton kernel on the GPU against the eager reference"))
    native = pytest("native-tests", ["tests/test_native.py"])
    if info.get("compute_sanitizer"):
        native = [info["compute_sanitizer"], "--tool", "memcheck", "--error-exitcode", "99",
                  "--target-processes", "all"] + native
    stages.append(Stage("native-tests", CAPS["native-tests"], native,
                        why="the CUDA kernels against the reference" +
                            (", under memcheck" if info.get("compute_sanitizer") else "")))
    for res in (8, 32, 128):
        # The +cl (channels-last) rows add 3 per backend: timed at 32 px only, to fit the budget.
        layouts = [] if res == 32 else ["--no-channels-last"]
        stages.append(Stage(f"bench-{res}", CAPS[f"bench-{res}"],
                            [py, "-m", "progan_fast.bench", "--device", "cuda", "--res", str(res), "--widths", "paper",
                             "--no-compile", "--steps", "10", "--warmup", "3", *layouts,
                             "--json", str(out / f"bench-{res}.json")],
                            why=f"whole-step img/s at {res}px: reference, triton, cuda, auto, each +amp/+graphs"
                                + (", and +cl" if res == 32 else "")))
    return stages


# ----- running -----------------------------------------------------------------------------------------

_PYTEST_TALLY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_tally(text: str) -> str:
    """The counts from pytest's closing line ('12 passed, 1 skipped in 3.2s'), or ''."""
    for line in reversed(text.splitlines()):
        if _PYTEST_TALLY.search(line) and (" in " in line or line.startswith("=")):
            return line.strip("= ").strip()
    return ""


def run_stage(stage: Stage, out: Path, seconds_left: float) -> StageResult:
    cap = int(min(stage.cap_s, seconds_left))
    result = StageResult(stage.name, " ".join(stage.command), stage.cap_s, "skipped",
                         log=str(out / f"{stage.name}.log"))
    if seconds_left < 5:
        result.detail = "cut: the overall budget was spent before this stage"
        result.status = "cut"
        return result
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # on a GPU the real kernels must run
    start = time.monotonic()
    with open(result.log, "w") as log:
        log.write(f"$ {result.command}\n# env: {stage.env}\n# cap: {cap} s\n\n")
        log.flush()
        proc = subprocess.Popen(stage.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, so a cut stops its children too
        try:
            result.returncode = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            result.status = "cut"
    result.seconds = round(time.monotonic() - start, 1)
    text = Path(result.log).read_text(errors="replace")
    tally = pytest_tally(text)
    if result.status == "cut":
        reason = f"cut at its cap of {cap} s" + (" (the budget left)" if cap < stage.cap_s else "")
        result.detail = reason + (f"; so far: {tally}" if tally else "")
    else:
        result.status = "passed" if result.returncode == 0 else "failed"
        last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
        result.detail = tally or last[0][:200]
    return result


# ----- the report --------------------------------------------------------------------------------------

def bench_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("bench-*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        try:
            rows += json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError):
            continue
    return rows


def summary_markdown(info: dict, results: list[StageResult], rows: list[dict], budget: int, total: float) -> str:
    lines = [f"# GPU verification ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"- GPU: {info.get('gpu')} (sm_{info.get('arch')})",
             f"- Python {info['python']}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
             f"triton {info.get('triton')}",
             f"- nvcc: {info.get('nvcc')}; compute-sanitizer: {info.get('compute_sanitizer')}",
             f"- {total:.0f} s of a {budget} s budget", ""]
    lines += ["| stage | status | seconds | cap | result |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {r.cap_s} | {r.detail.replace('|', '/')} |")
    cut = [r for r in results if r.status == "cut"]
    lines += ["", "## What was cut", ""]
    lines += [f"- {r.name}: {r.detail}" for r in cut] or ["- nothing"]
    lines += ["", "## Training-step throughput (paper widths, wgan-gp; ratios within one stage's run)", ""]
    if rows:
        lines += ["| res | batch | configuration | ms/step | img/s | vs reference | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            def num(v, fmt):
                return format(v, fmt) if v is not None else "-"
            lines.append(f"| {row['res']} | {row['batch']} | {row['variant']} | {num(row['ms_per_step'], '.2f')} | "
                         f"{num(row['img_per_s'], '.1f')} | {num(row['vs_reference'], '.2f')} | {row['note']} |")
    else:
        lines.append("- no benchmark finished")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Stages and their caps (seconds): " + ", ".join(f"{k} {v}" for k, v in CAPS.items()))
    p.add_argument("--dry-run", action="store_true", help="check the install and print the plan; run nothing")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default runs/gpu-verify/<date-time>)")
    p.add_argument("--budget", type=int, default=480, help="seconds for the whole run; stages are cut to fit")
    p.add_argument("--wheelhouse", type=Path, default=None,
                   help="install the dependencies from this folder of wheels, without the network")
    p.add_argument("--skip-install", action="store_true", help="the project is already installed and built")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget < 30:
        print(f"{PROG}: error: --budget must be at least 30 seconds, not {args.budget}", file=sys.stderr)
        return 2
    if args.wheelhouse is not None and not args.wheelhouse.is_dir():
        print(f"{PROG}: error: --wheelhouse {args.wheelhouse} is not a folder", file=sys.stderr)
        return 2
    out = (args.out or ROOT / "runs" / "gpu-verify" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    info = probe()
    stages = plan(info, out, args.wheelhouse, args.skip_install)
    print(f"{PROG}: Python {info['python']}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
          f"triton {info.get('triton')}, GPU {info.get('gpu')}")
    for line in info["problems"]:
        print(f"  problem: {line}")
    for line in info["notes"]:
        print(f"  note: {line}")
    if info["missing"]:
        print(f"  note: not installed yet: {', '.join(info['missing'])} "
              f"({'from --wheelhouse' if args.wheelhouse else 'pip will fetch them: needs the network'})")
    print(f"plan ({sum(s.cap_s for s in stages)} s of caps, budget {args.budget} s; report in {out}):")
    for s in stages:
        env = " ".join(f"{k}={v}" for k, v in s.env.items())
        print(f"  {s.name:<14} cap {s.cap_s:>3} s  {s.why}\n  {'':<14} $ {(env + ' ') if env else ''}"
              f"{' '.join(s.command)}")
    if args.dry_run:
        if info["problems"]:
            print(f"{PROG}: the install is not ready for a GPU run (problems above)", file=sys.stderr)
            return 1
        print(f"{PROG}: dry run: the install is ready" + ("" if info.get("gpu") else "; no GPU is visible here"))
        return 0
    if info["problems"]:
        print(f"{PROG}: error: fix the problems above first", file=sys.stderr)
        return 2
    if not info.get("gpu"):
        print(f"{PROG}: error: PyTorch sees no CUDA device; --dry-run checks the install without one", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    start = time.monotonic()
    results = []
    for stage in stages:
        print(f"{PROG}: {stage.name} (cap {stage.cap_s} s) ...", flush=True)
        r = run_stage(stage, out, deadline - time.monotonic())
        print(f"  {r.status} in {r.seconds} s: {r.detail}", flush=True)
        results.append(r)
    total = time.monotonic() - start
    rows = bench_rows(out)
    (out / "report.json").write_text(json.dumps({"machine": info, "budget_s": args.budget, "total_s": round(total, 1),
                                                 "stages": [asdict(r) for r in results], "bench": rows},
                                                indent=2) + "\n")
    summary = summary_markdown(info, results, rows, args.budget, total)
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"{PROG}: report in {out}")
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
