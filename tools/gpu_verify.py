"""The first GPU session in one command: install, build the CUDA kernels, test on the GPU, benchmark.

    python tools/gpu_verify.py                 # on a machine with a GPU and its own torch (2.11-2.14)
    python tools/gpu_verify.py --dry-run       # anywhere: check the install and print the plan (CI runs this)
    python tools/gpu_verify.py --stages install,native-status   # a subset (runs without a GPU too)
    python tools/gpu_verify.py --rehearse      # every stage on the CPU, tiny: proves the plumbing (CI runs it)

Stages, in order, each with a time cap so that the whole run fits in ``--budget`` seconds (8 minutes by
default, what one H100 session leaves after its start):

1. ``install``: ``pip install --no-build-isolation --no-index --no-deps -e .`` against the torch already
   there (no ``constraints.txt``: the GPU machine's torch is kept), with the CUDA kernels built for this
   GPU's architecture only (``PROGAN_FAST_CUDA=1``, ``PROGAN_FAST_CUDA_ARCHS``); the CPU twins only where
   no GPU is visible. pip never reaches for the network (the GPU machines have none): a dependency that
   does not import stops the run before anything starts, with one line naming it and the
   ``pip download`` command that brings it as a wheel for ``--wheelhouse DIR`` (then
   ``--no-index --find-links DIR``, with dependencies resolved from that folder alone).
   ``native-status``: ``python -m progan_fast.ops.native_status`` (fails where a GPU is visible and the
   CUDA kernels did not load).
2. ``cuda-tests``: ``pytest -m cuda`` (every test marked as needing a GPU).
3. ``op-tests``: the Triton and op tests, which run on the GPU when one is visible (not the kernel
   report: CI compiles every config for sm_80 and sm_90 already).
4. ``native-tests``: the native library's tests (its CUDA kernels among them) under
   ``compute-sanitizer --tool memcheck`` with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (so an out-of-bounds
   access cannot land unseen inside one of the caching allocator's blocks); where the tool is missing or
   refuses the device (a tiny probe run says so first), the tests run plainly and the report says why.
5. ``bench-8``, ``bench-32``, ``bench-128``: ``python -m progan_fast.bench`` at that resolution with paper
   widths: reference, triton, cuda and auto, each plain, ``+amp``, ``+graphs`` and ``+amp+graphs``; at
   32 px also ``+cl``, ``+amp+cl`` and ``+amp+graphs+cl`` (channels-last activations). The bench saves
   each row as it is measured, so a stage cut at its cap keeps the rows it finished.

Each stage's output goes to ``OUT/<stage>.log``; ``OUT/report.json`` holds every stage (command, exit
code, seconds, whether it was cut and why, the pytest counts, notes) and ``OUT/summary.md`` the same as
tables, with the benchmark figures. A stage that reaches its cap is stopped and marked ``cut``; the run
goes on with the next stage. The exit code is 0 only when every stage ran to the end and passed.

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

#: What the project imports at run time or in its tests (module name: pip name). Not ``nvtx``: it is
#: optional (``--nvtx`` uses torch.cuda.nvtx on CUDA builds), and the GPU machines do not have it.
DEPENDENCIES = {"numpy": "numpy", "PIL": "Pillow", "tqdm": "tqdm", "tensorboard": "tensorboard",
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
    memcheck: bool = False  # run under compute-sanitizer's memcheck where the tool exists and accepts the device
    sanitizer: str | None = None  # that tool's path (None: not found)


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
    note: str = ""  # how it ran where that differs from the plan (memcheck refused, rows kept from a cut)


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
    # ninja counts where its executable is on PATH (torch's cpp_extension runs the command; the GPU
    # machines may have it from the system rather than as the pip package).
    info["missing_build_tools"] = [pip for module, pip in BUILD_TOOLS.items() if importlib.util.find_spec(module) is None
                                   and not (module == "ninja" and shutil.which("ninja"))]
    info["xdist"] = importlib.util.find_spec("xdist") is not None  # pytest-xdist: the Triton stages in parallel
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

#: Seconds per stage on one H100 (16 cores) with a cold Triton cache, adding up to the 480 s budget.
#: What each has to do. The kernels have 306 autotune configs in all (ops/kernel_report.py's specs:
#: 158 of them the conv's, 78 channels-last, 14 fp64); the first launch of a kernel at a new
#: specialization compiles every config of its list (4 per 1D kernel, 5-6 pixel-norm, 4-8
#: minibatch-stddev, 7-8 per conv product kind and 1-3 per fused pixel-norm bucket), at about 0.3 s
#: (pointwise) to 1-2 s (the conv's tl.dot tiles) each, one after another within a process; a
#: measurement then costs a few ms. pytest's start, collection and CUDA init: about 10 s.
#: - install 120: 13 C++ files and 6 .cu for sm_90 only, 16 jobs at once; the widest (conv_act.cu,
#:   with torch's CUDA headers) takes about a minute alone, the link a few seconds.
#: - native-status 15: one torch import and the library load.
#: - cuda-tests 75: the cuda-marked tests of 13 files touch every op in fp32 (exact: the tests' own
#:   policy) and bf16, both layouts: about 200 compiles, 150-250 s in one process. So the two Triton
#:   stages run with pytest-xdist where it is installed (it is on the GPU machines): 8 workers, whole
#:   files each (--dist loadfile, so a file's tests keep their order), sharing the on-disk cache;
#:   about 40-60 s of compiles, plus each worker's start.
#: - op-tests 70: the Triton and op files on the GPU (not the kernel report: CI compiles every
#:   config); most kernels are in the cache by then; fp64 (14 configs) and the remaining
#:   specializations, then a few hundred small launches.
#: - native-tests 60: no Triton; the CUDA kernels' tests (about 240, tiny tensors) take 20 s plainly;
#:   memcheck slows each launch 10-50x, and its probe costs about 10 s.
#: - bench-8 30, bench-32 55, bench-128 55: 16 configurations (23 at 32 px with +cl), each a few warm-up
#:   and 10 timed steps at the paper's batch; the kernels are compiled by then (new keys only re-time
#:   their configs: a few ms each), a graph capture about 1 s a configuration; 128 px at batch 16 is
#:   the heaviest step. The rows are saved as they come, so a cut loses only the unfinished ones.
#: These are estimates made without a GPU: the first run's report (seconds per stage) settles them.
CAPS = {"install": 120, "native-status": 15, "cuda-tests": 75, "op-tests": 70, "native-tests": 60,
        "bench-8": 30, "bench-32": 55, "bench-128": 55}
STAGE_NAMES = tuple(CAPS)
#: Stages that can run without a GPU (the install builds the CPU twins there); the others need one
#: unless --rehearse runs their CPU stand-ins.
CPU_STAGES = ("install", "native-status")
#: --rehearse: the same stages on the CPU, each tiny, within 3 minutes on CI's 2 cores (about 70 s
#: there unloaded). Its install is pip's --dry-run of the same command (the resolution without network,
#: no compile): CI proves the real install on the GPU machines' stack from a clean copy instead.
REHEARSE_CAPS = {"install": 25, "native-status": 10, "cuda-tests": 15, "op-tests": 25, "native-tests": 20,
                 "bench-8": 25, "bench-32": 25, "bench-128": 25}
#: The install without a GPU (CPU twins only): no GPU session to fit, and a machine with few cores
#: (CI's 2) compiles the 13 C++ files for a couple of minutes.
CPU_INSTALL_CAP = 300
REHEARSE_BUDGET = 170
#: compute-sanitizer's words when it cannot check this device (seen on some of the GPU machines).
SANITIZER_REFUSALS = ("Device not supported", "LibraryNotLoaded", "not supported on this device",
                      "no CUDA-capable device", "CUDA_ERROR_NO_DEVICE")
#: The probe: a CUDA allocation and one kernel, the least that makes memcheck attach to the device.
SANITIZER_PROBE = "import torch; x = torch.ones(8, device='cuda'); (x + 1).sum().item(); print('probe ok')"


def _wheel_name(pip_name: str) -> str:
    """A distribution's name as its wheel files start ('pytest-benchmark' -> 'pytest_benchmark')."""
    return re.sub(r"[-_.]+", "_", pip_name).lower()


def missing_line(info: dict, wheelhouse: Path | None, names: list[str]) -> str | None:
    """One line naming what a run needs but cannot import, and how to bring it; None when nothing is missing.
    Everything comes as wheels in ``--wheelhouse``: the GPU machines cannot download."""
    missing = list(info["missing"]) + (list(info["missing_build_tools"]) if "install" in names else [])
    if wheelhouse is not None and "install" in names:
        have = {_wheel_name(p.name.split("-")[0]) for p in wheelhouse.glob("*.whl")}
        missing = [m for m in missing if _wheel_name(m) not in have]
    if not missing:
        return None
    folder = str(wheelhouse) if wheelhouse is not None else "wheelhouse"
    py = ".".join(info["python"].split(".")[:2])
    where = f"--wheelhouse {wheelhouse} has no wheel for it" if wheelhouse is not None else "no network here to fetch it"
    return (f"missing {', '.join(missing)} ({where}): on a machine with network run `pip download "
            f"--only-binary=:all: --python-version {py} -d {folder} {' '.join(missing)}`, bring {folder}/ with the "
            f"checkout, and rerun with --wheelhouse {folder}" + ("" if "install" in names else " --stages install,..."))


def plan(info: dict, out: Path, wheelhouse: Path | None, skip_install: bool = False,
         names: list[str] | None = None, rehearse: bool = False) -> list[Stage]:
    """The stages to run, in order: ``names`` (default all) less the install with ``skip_install``.
    ``rehearse``: each stage's CPU stand-in, tiny (the same plumbing, logs, report and summary)."""
    names = list(names or STAGE_NAMES)
    if skip_install:
        names = [n for n in names if n != "install"]
    caps = REHEARSE_CAPS if rehearse else CAPS
    py = sys.executable
    gpu = bool(info.get("gpu")) and not rehearse
    stages: list[Stage] = []
    # Never the network: --no-index always. Without a wheelhouse every dependency already imports
    # (missing_line checked), so --no-deps; with one, pip resolves them from that folder alone.
    pip = [py, "-m", "pip", "install", "--no-build-isolation", "--no-index"]
    pip += ["--find-links", str(wheelhouse), "-e", ".[test]"] if wheelhouse is not None else ["--no-deps", "-e", "."]
    pip_env = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if gpu:
        env = {**pip_env, "PROGAN_FAST_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
        if info.get("arch"):
            env["PROGAN_FAST_CUDA_ARCHS"] = info["arch"]  # one architecture: the build takes a fraction of the time
        install_why = "installs the project against this torch and builds the CUDA kernels for this GPU"
    else:
        env = {**pip_env, "PROGAN_FAST_CUDA": "0", "MAX_JOBS": str(os.cpu_count() or 2)}
        install_why = "installs the project against this torch, CPU twins only (no GPU visible)"
    if rehearse:
        pip = pip[:4] + ["--dry-run"] + pip[4:]
        install_why = "rehearsal: pip's dry run of the install command (resolves without the network, builds nothing)"
    install_cap = caps["install"] if gpu or rehearse else CPU_INSTALL_CAP
    stages.append(Stage("install", install_cap, pip, env, install_why))
    stages.append(Stage("native-status", caps["native-status"], [py, "-m", "progan_fast.ops.native_status"],
                        why="says whether progan_fast._C loaded, and fails where a GPU is visible without its CUDA kernels"))

    def pytest(name: str, args: list[str], parallel: bool = False) -> list[str]:
        # Parallel: Triton compiles configs one after another within a process, so on a GPU with a cold
        # cache the Triton stages spread their files over workers (see CAPS). Only where xdist is there.
        workers = ["-n", str(min(8, max(2, (os.cpu_count() or 4) // 2))), "--dist", "loadfile"] \
            if parallel and gpu and info.get("xdist") else []
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                "--junitxml", str(out / f"{name}.xml")] + args

    if rehearse:
        # A couple of tests per stage, the quickest of each kind: cuda-marked ones (skipped here, so the
        # tally plumbing shows), one interpreted Triton op, a few native CPU twins.
        stages.append(Stage("cuda-tests", caps["cuda-tests"], pytest("cuda-tests", ["-m", "cuda", "tests/test_cuda.py"]),
                            why="rehearsal: the cuda-marked tests of one file (skipped without a GPU)"))
        stages.append(Stage("op-tests", caps["op-tests"],
                            pytest("op-tests", ["tests/test_triton_fade_in.py", "-k",
                                                 "fade_ends_are_exact or float_and_tensor_alpha_agree"]),
                            why="rehearsal: one Triton op's tests under the interpreter"))
        stages.append(Stage("native-tests", caps["native-tests"],
                            pytest("native-tests", ["tests/test_native.py", "-k", "downsample2x_matches"]),
                            {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                            why="rehearsal: a few native CPU-twin tests, through the memcheck probe and its fallback",
                            memcheck=True, sanitizer=info.get("compute_sanitizer")))
        for res in (8, 32, 128):
            stages.append(Stage(f"bench-{res}", caps[f"bench-{res}"],
                                [py, "-m", "progan_fast.bench", "--device", "cpu", "--res", "4", "--batch", "2",
                                 "--widths", "laptop", "--steps", "1", "--warmup", "0", "--no-compile",
                                 "--no-channels-last", "--configs", "reference,cpu",
                                 "--json", str(out / f"bench-{res}.json")],
                                why="rehearsal: two CPU configurations at 4 px, batch 2, one step"))
    else:
        stages.append(Stage("cuda-tests", caps["cuda-tests"], pytest("cuda-tests", ["-m", "cuda"], parallel=True),
                            why="every test marked cuda: graphs vs eager, GPU vs CPU networks, resume across devices"))
        # Not the kernel report (test_triton_kernel_report.py): it compiles every config for sm_80 and
        # sm_90 ahead of time, which CI does already, and would take most of this stage's cap.
        op_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_triton_*.py")
                          if p.name != "test_triton_kernel_report.py")
        stages.append(Stage("op-tests", caps["op-tests"],
                            pytest("op-tests", op_tests + ["tests/test_ops.py"], parallel=True),
                            why="every Triton kernel on the GPU against the eager reference"))
        stages.append(Stage("native-tests", caps["native-tests"], pytest("native-tests", ["tests/test_native.py"]),
                            {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                            why="the CUDA kernels against the reference, under memcheck where the device allows it",
                            memcheck=True, sanitizer=info.get("compute_sanitizer")))
        for res in (8, 32, 128):
            # The +cl (channels-last) rows add 3 per backend: timed at 32 px only, to fit the budget.
            layouts = [] if res == 32 else ["--no-channels-last"]
            stages.append(Stage(f"bench-{res}", caps[f"bench-{res}"],
                                [py, "-m", "progan_fast.bench", "--device", "cuda", "--res", str(res), "--widths",
                                 "paper", "--no-compile", "--steps", "10", "--warmup", "3", *layouts,
                                 "--json", str(out / f"bench-{res}.json")],
                                why=f"whole-step img/s at {res}px: reference, triton, cuda, auto, each +amp/+graphs"
                                    + (", and +cl" if res == 32 else "")))
    if rehearse:
        for s in stages:
            s.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU stand-ins, even on a machine with a GPU
    return [s for s in stages if s.name in names]


# ----- running -----------------------------------------------------------------------------------------

_PYTEST_TALLY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_tally(text: str) -> str:
    """The counts from pytest's closing line ('12 passed, 1 skipped in 3.2s'), or ''."""
    for line in reversed(text.splitlines()):
        if _PYTEST_TALLY.search(line) and (" in " in line or line.startswith("=")):
            return line.strip("= ").strip()
    return ""


def probe_sanitizer(stage: Stage, env: dict, log, timeout: float) -> tuple[bool, str]:
    """Whether ``stage.sanitizer`` accepts this device, from a tiny run under it (some GPU machines'
    compute-sanitizer refuses the device: "Device not supported", "LibraryNotLoaded"). Returns
    (accepted, why not). The probe's output goes to the stage's log."""
    if not stage.sanitizer:
        return False, "no compute-sanitizer found"
    command = [stage.sanitizer, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, "-c", SANITIZER_PROBE]
    log.write(f"# memcheck probe: {' '.join(command)}\n")
    log.flush()
    try:
        probe_run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                                   start_new_session=True)
    except subprocess.TimeoutExpired:
        return False, f"compute-sanitizer's probe took over {timeout:.0f} s"
    except OSError as e:
        return False, f"compute-sanitizer does not start ({e})"
    text = (probe_run.stdout or "") + (probe_run.stderr or "")
    log.write(text + f"# probe exit code {probe_run.returncode}\n\n")
    log.flush()
    refusal = next((line.strip(" =") for line in text.splitlines() if any(r in line for r in SANITIZER_REFUSALS)), None)
    if refusal:
        return False, f"compute-sanitizer refuses this device ({refusal[:120]})"
    if probe_run.returncode != 0 or "probe ok" not in text:
        last = [line.strip(" =") for line in text.splitlines() if line.strip(" =")][-1:] or ["no output"]
        return False, f"compute-sanitizer's probe failed (exit {probe_run.returncode}: {last[0][:120]})"
    return True, ""


def run_stage(stage: Stage, out: Path, seconds_left: float) -> StageResult:
    cap = int(min(stage.cap_s, seconds_left))
    result = StageResult(stage.name, " ".join(stage.command), stage.cap_s, "skipped",
                         log=str(out / f"{stage.name}.log"))
    if seconds_left < 5:
        result.detail = "cut: the overall budget was spent before this stage"
        result.status = "cut"
        return result
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # on a GPU the real kernels must run (the tests' conftest sets it without one)
    env.update(stage.env)
    start = time.monotonic()
    command = stage.command
    with open(result.log, "w") as log:
        log.write(f"$ {result.command}\n# env: {stage.env}\n# cap: {cap} s\n\n")
        log.flush()
        if stage.memcheck:
            accepted, why_not = probe_sanitizer(stage, env, log, timeout=max(5.0, min(45.0, cap / 3)))
            if accepted:
                command = [stage.sanitizer, "--tool", "memcheck", "--error-exitcode", "99",
                           "--target-processes", "all"] + command
                result.note = "under compute-sanitizer memcheck"
            else:
                result.note = f"ran WITHOUT memcheck: {why_not}"
            result.command = " ".join(command)
            log.write(f"# {result.note}\n$ {result.command}\n\n")
            log.flush()
        remaining = max(1.0, cap - (time.monotonic() - start))
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, so a cut stops its children too
        try:
            result.returncode = proc.wait(timeout=remaining)
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

def bench_records(out: Path) -> dict[str, dict]:
    """Each bench stage's JSON ('bench-8': record), in resolution order; a file that does not parse is
    left out (the bench writes atomically, so that only happens when it never wrote one)."""
    records = {}
    for path in sorted(out.glob("bench-*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        try:
            record = json.loads(path.read_text())
            record["results"]  # noqa: B018  (a record without rows is not a bench record)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records[path.stem] = record
    return records


def bench_rows(out: Path) -> list[dict]:
    return [row for record in bench_records(out).values() for row in record["results"]]


def note_kept_rows(results: list[StageResult], out: Path) -> None:
    """A bench stage that was cut or failed: say how many rows its JSON kept (the bench saves each
    row as it is measured)."""
    records = bench_records(out)
    for r in results:
        if r.name.startswith("bench-") and r.status in ("cut", "failed"):
            record = records.get(r.name)
            kept = len(record["results"]) if record else 0
            r.note = f"{kept} configuration{'s' if kept != 1 else ''} measured and kept before it stopped"


def summary_markdown(info: dict, results: list[StageResult], rows: list[dict], budget: int, total: float,
                     rehearse: bool = False) -> str:
    title = "GPU verification rehearsal (CPU stand-ins, tiny: proves the plumbing, not the GPU)" if rehearse \
        else "GPU verification"
    lines = [f"# {title} ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"- GPU: {info['gpu']} (sm_{info.get('arch')})" if info.get("gpu") else "- GPU: none visible",
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
    noted = [r for r in results if r.note]
    if noted:
        lines += ["", "## How stages ran", ""]
        lines += [f"- {r.name}: {r.note}" for r in noted]
    heading = "CPU stand-in, laptop widths" if rehearse else "paper widths"
    lines += ["", f"## Training-step throughput ({heading}, wgan-gp; ratios within one stage's run)", ""]
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
                   help="report folder (default runs/gpu-verify/<date-time>, runs/gpu-verify/rehearse-<date-time> "
                        "with --rehearse)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"seconds for the whole run; stages are cut to fit (default 480, {REHEARSE_BUDGET} with --rehearse)")
    p.add_argument("--wheelhouse", type=Path, default=None,
                   help="a folder of wheels for what does not import here: the install takes them from it "
                        "(--no-index --find-links), never from the network")
    p.add_argument("--skip-install", action="store_true", help="the project is already installed and built")
    p.add_argument("--stages", default=None, metavar="NAME,...",
                   help="run only these stages, in the usual order (" + ", ".join(STAGE_NAMES) + "); without a GPU "
                        "only " + " and ".join(CPU_STAGES) + " can run")
    p.add_argument("--rehearse", action="store_true",
                   help="run every stage's CPU stand-in, tiny (pip's dry run of the install, a couple of tests each, a "
                        "4 px bench), to prove the stage plumbing, report.json and summary.md without a GPU (CI runs it)")
    return p


def parse_stages(text: str | None) -> list[str]:
    """``--stages a,b`` -> the names, in the usual order; ValueError naming an unknown one."""
    if text is None:
        return list(STAGE_NAMES)
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in STAGE_NAMES]
    if unknown or not wanted:
        raise ValueError(f"--stages: unknown stage {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"the stages are {','.join(STAGE_NAMES)}")
    return [n for n in STAGE_NAMES if n in wanted]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def error(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    budget = args.budget if args.budget is not None else (REHEARSE_BUDGET if args.rehearse else 480)
    if budget < 30:
        return error(f"--budget must be at least 30 seconds, not {budget}")
    if args.wheelhouse is not None and not args.wheelhouse.is_dir():
        return error(f"--wheelhouse {args.wheelhouse} is not a folder")
    try:
        names = parse_stages(args.stages)
    except ValueError as e:
        return error(str(e))
    if args.skip_install:
        names = [n for n in names if n != "install"]
    if not names:
        return error("--skip-install leaves no stage of --stages to run")
    default_out = ROOT / "runs" / "gpu-verify" / (("rehearse-" if args.rehearse else "") + time.strftime("%Y%m%d-%H%M%S"))
    out = (args.out or default_out).resolve()
    wheelhouse = args.wheelhouse.resolve() if args.wheelhouse is not None else None
    info = probe()
    stages = plan(info, out, wheelhouse, names=names, rehearse=args.rehearse)
    print(f"{PROG}: Python {info['python']}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
          f"triton {info.get('triton')}, GPU {info.get('gpu')}" + ("; rehearsal on the CPU" if args.rehearse else ""))
    for line in info["problems"]:
        print(f"  problem: {line}")
    for line in info["notes"]:
        print(f"  note: {line}")
    print(f"plan ({sum(s.cap_s for s in stages)} s of caps, budget {budget} s; report in {out}):")
    for s in stages:
        env = " ".join(f"{k}={v}" for k, v in s.env.items())
        memcheck = f"{s.sanitizer or 'compute-sanitizer (not found)'} --tool memcheck (if it accepts the device) " \
            if s.memcheck else ""
        print(f"  {s.name:<14} cap {s.cap_s:>3} s  {s.why}\n  {'':<14} $ {(env + ' ') if env else ''}"
              f"{memcheck}{' '.join(s.command)}")
    missing = missing_line(info, wheelhouse, names)
    if args.dry_run:
        if missing:
            print(f"  problem: {missing}")
        if info["problems"] or missing:
            print(f"{PROG}: the install is not ready for a GPU run (problems above)", file=sys.stderr)
            return 1
        print(f"{PROG}: dry run: the install is ready" + ("" if info.get("gpu") else "; no GPU is visible here"))
        return 0
    if missing:  # before anything runs: pip must not be left to reach for a network the GPU machines lack
        return error(missing)
    if info["problems"]:
        return error("fix the problems above first")
    needs_gpu = [n for n in names if n not in CPU_STAGES]
    if not info.get("gpu") and not args.rehearse and needs_gpu:
        return error(f"PyTorch sees no CUDA device, and {', '.join(needs_gpu)} need one; without a GPU run "
                     f"--stages {','.join(CPU_STAGES)}, --rehearse (CPU stand-ins) or --dry-run")

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    start = time.monotonic()
    results = []
    for stage in stages:
        print(f"{PROG}: {stage.name} (cap {stage.cap_s} s) ...", flush=True)
        r = run_stage(stage, out, deadline - time.monotonic())
        print(f"  {r.status} in {r.seconds} s: {r.detail}" + (f" [{r.note}]" if r.note else ""), flush=True)
        results.append(r)
    total = time.monotonic() - start
    note_kept_rows(results, out)
    rows = bench_rows(out)
    (out / "report.json").write_text(json.dumps({"machine": info, "rehearsal": args.rehearse, "budget_s": budget,
                                                 "total_s": round(total, 1), "stages": [asdict(r) for r in results],
                                                 "bench": rows}, indent=2) + "\n")
    summary = summary_markdown(info, results, rows, budget, total, rehearse=args.rehearse)
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"{PROG}: report in {out}")
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
