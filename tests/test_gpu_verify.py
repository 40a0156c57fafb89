"""tools/gpu_verify.py, the one command for a first GPU session, checked without a GPU: the dry run,
stage caps that stop a stage and its children, pytest tallies and the report."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_verify.py"
spec = importlib.util.spec_from_file_location("gpu_verify", SCRIPT)
gv = importlib.util.module_from_spec(spec)
sys.modules["gpu_verify"] = gv  # dataclasses look their module up there
spec.loader.exec_module(gv)


def test_dry_run_checks_the_install_and_prints_every_stage_with_its_cap():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for name, cap in gv.CAPS.items():
        if name == "install" and not torch.cuda.is_available():
            cap = gv.CPU_INSTALL_CAP  # the CPU twins' build on a few cores, outside any GPU session
        assert f"{name:<14} cap {cap:>3} s" in out.stdout
    assert "-m cuda" in out.stdout and "progan_fast.bench --device cuda --res 128" in out.stdout
    assert "test_triton_kernel_report" not in out.stdout  # CI compiles every config; op-tests need not
    assert "pip install --no-build-isolation --no-index" in out.stdout
    assert sum(gv.CAPS.values()) <= 480  # the whole plan fits the 8-minute default budget


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_real_run_without_a_gpu_is_refused_with_one_message(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "sees no CUDA device" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_bad_options_exit_2(tmp_path):
    for args in (["--budget", "5"], ["--wheelhouse", str(tmp_path / "missing")]):
        out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "error:" in out.stderr, args


def test_a_stage_past_its_cap_is_cut_with_its_children(tmp_path):
    marker = tmp_path / "child-finished"
    # The child would write the marker after 3 s; the cap stops the shell and the child after 1 s.
    stage = gv.Stage("slow", 1, ["bash", "-c", f"(sleep 3; touch {marker}) & echo started; wait"])
    start = time.monotonic()
    r = gv.run_stage(stage, tmp_path, seconds_left=100)
    assert r.status == "cut" and "cap of 1 s" in r.detail
    assert time.monotonic() - start < 3
    time.sleep(3.5)
    assert not marker.exists()
    assert "started" in Path(r.log).read_text()


def test_stages_pass_fail_or_are_cut_by_the_budget_left(tmp_path):
    ok = gv.run_stage(gv.Stage("ok", 30, [sys.executable, "-c", "print('3 passed, 1 skipped in 0.5s')"]), tmp_path, 100)
    assert ok.status == "passed" and ok.detail == "3 passed, 1 skipped in 0.5s"
    bad = gv.run_stage(gv.Stage("bad", 30, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
                       tmp_path, 100)
    assert bad.status == "failed" and bad.returncode == 3 and bad.detail == "boom"
    late = gv.run_stage(gv.Stage("late", 30, [sys.executable, "-c", "pass"]), tmp_path, 2)
    assert late.status == "cut" and "budget" in late.detail


def test_pytest_tally_reads_the_closing_line():
    text = "....F\n=== short test summary ===\nFAILED x\n==== 1 failed, 4 passed, 2 skipped in 3.21s ====\n"
    assert gv.pytest_tally(text) == "1 failed, 4 passed, 2 skipped in 3.21s"
    assert gv.pytest_tally("no tests here\n") == ""


def test_summary_lists_stages_cuts_and_benchmark_rows(tmp_path):
    rows = [{"res": 8, "batch": 128, "variant": "reference", "ms_per_step": 10.0, "img_per_s": 12800.0,
             "vs_reference": 1.0, "note": ""},
            {"res": 8, "batch": 128, "variant": "triton+graphs", "ms_per_step": None, "img_per_s": None,
             "vs_reference": None, "note": "failed: RuntimeError: x"}]
    (tmp_path / "bench-8.json").write_text(json.dumps({"results": rows}))
    results = [gv.StageResult("cuda-tests", "pytest -m cuda", 70, "passed", 12.0, 0, "5 passed in 11s"),
               gv.StageResult("bench-128", "bench", 55, "cut", 55.0, None, "cut at its cap of 55 s")]
    info = {"python": "3.12.1", "torch": "2.11.0", "torch_cuda": "13.0", "triton": "3.6.0", "gpu": "H100", "arch": "90"}
    md = gv.summary_markdown(info, results, gv.bench_rows(tmp_path), 480, 67.0)
    assert "| cuda-tests | passed | 12.0 | 70 | 5 passed in 11s |" in md
    assert "- bench-128: cut at its cap of 55 s" in md
    assert "| 8 | 128 | reference | 10.00 | 12800.0 | 1.00 |  |" in md
    assert "| 8 | 128 | triton+graphs | - | - | - | failed: RuntimeError: x |" in md


# ----- issue 23: an install that cannot download, --stages, memcheck's fallback, cuts, the rehearsal --------

GPU_INFO = {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0", "gpu": "NVIDIA H100",
            "arch": "90", "missing": [], "missing_build_tools": [], "nvcc": "/usr/local/cuda/bin/nvcc",
            "compute_sanitizer": "/usr/local/cuda/bin/compute-sanitizer", "problems": [], "notes": []}


def test_the_install_never_reaches_for_the_network(tmp_path):
    install = gv.plan(GPU_INFO, tmp_path, None)[0]
    assert install.name == "install"
    assert "--no-index" in install.command and "--no-deps" in install.command and "--find-links" not in install.command
    assert install.env["PIP_NO_INDEX"] == "1" and install.env["PROGAN_FAST_CUDA"] == "1"
    assert install.env["PROGAN_FAST_CUDA_ARCHS"] == "90"
    # With a wheelhouse: dependencies resolved from that folder alone (still --no-index).
    with_wheels = gv.plan(GPU_INFO, tmp_path, tmp_path)[0].command
    assert "--no-index" in with_wheels and with_wheels[with_wheels.index("--find-links") + 1] == str(tmp_path)
    # Without a GPU the install builds the CPU twins only.
    cpu = gv.plan({**GPU_INFO, "gpu": None, "arch": None}, tmp_path, None)[0]
    assert cpu.env["PROGAN_FAST_CUDA"] == "0" and "--no-index" in cpu.command and cpu.cap_s == gv.CPU_INSTALL_CAP


def test_a_ninja_executable_is_enough(monkeypatch):
    # The GPU machines may have ninja from the system, not as the pip package: cpp_extension runs the command.
    real = gv.importlib.util.find_spec
    monkeypatch.setattr(gv.importlib.util, "find_spec", lambda name, *a: None if name == "ninja" else real(name, *a))
    monkeypatch.setattr(gv.shutil, "which", lambda name: "/usr/bin/ninja" if name == "ninja" else None)
    assert "ninja" not in gv.probe()["missing_build_tools"]
    monkeypatch.setattr(gv.shutil, "which", lambda name: None)
    assert "ninja" in gv.probe()["missing_build_tools"]


def test_nvtx_is_not_a_dependency():
    assert "nvtx" not in gv.DEPENDENCIES  # the GPU machines do not have it


def test_op_tests_leave_out_the_kernel_report(tmp_path):
    op_tests = next(s for s in gv.plan(GPU_INFO, tmp_path, None) if s.name == "op-tests")
    assert not any("kernel_report" in a for a in op_tests.command)
    assert "tests/test_triton_conv_act.py" in op_tests.command and "tests/test_ops.py" in op_tests.command


def test_the_triton_stages_spread_over_xdist_workers_where_it_is_installed(tmp_path):
    def commands(info, **kw):
        return {s.name: s.command for s in gv.plan(info, tmp_path, None, **kw)}
    with_xdist = commands({**GPU_INFO, "xdist": True})
    for name in ("cuda-tests", "op-tests"):
        assert with_xdist[name][with_xdist[name].index("--dist") + 1] == "loadfile" and "-n" in with_xdist[name]
    assert "-n" not in with_xdist["native-tests"]  # memcheck wraps one process
    assert "-n" not in commands(GPU_INFO)["cuda-tests"]  # no xdist: one process
    assert "-n" not in commands({**GPU_INFO, "xdist": True}, rehearse=True)["cuda-tests"]


def test_stages_selects_a_subset_in_order():
    assert gv.parse_stages("native-status, install") == ["install", "native-status"]
    assert [s.name for s in gv.plan(GPU_INFO, Path("/x"), None, names=["bench-32", "install"])] == ["install", "bench-32"]
    with pytest.raises(ValueError, match="unknown stage 'bench-64'"):
        gv.parse_stages("install,bench-64")


def _run(args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_an_unknown_stage_is_one_error_line(tmp_path):
    out = _run(["--stages", "install,tests", "--out", str(tmp_path / "r")])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "error: --stages: unknown stage 'tests'" in out.stderr and "install,native-status,cuda-tests" in out.stderr
    assert not (tmp_path / "r").exists()


def test_a_missing_dependency_stops_the_run_with_one_line_saying_how_to_bring_it(monkeypatch, tmp_path, capsys):
    info = {**GPU_INFO, "missing": ["tqdm", "pytest-benchmark"]}
    monkeypatch.setattr(gv, "probe", lambda: info)
    monkeypatch.setattr(gv, "run_stage", lambda *a: pytest.fail("nothing may run"))
    assert gv.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("tools/gpu_verify.py: error: missing tqdm, pytest-benchmark")
    assert "pip download --only-binary=:all: --python-version 3.12 -d wheelhouse tqdm pytest-benchmark" in err[0]
    assert "--wheelhouse wheelhouse" in err[0]
    assert not (tmp_path / "r").exists()
    # A wheelhouse that holds one of them: only the other is named; holding both, nothing is missing.
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "pytest_benchmark-5.3.1-py3-none-any.whl").write_bytes(b"")
    line = gv.missing_line(info, tmp_path / "wheels", list(gv.STAGE_NAMES))
    assert line.startswith("missing tqdm (--wheelhouse") and "pytest-benchmark" not in line
    (tmp_path / "wheels" / "tqdm-4.70.1-py3-none-any.whl").write_bytes(b"")
    assert gv.missing_line(info, tmp_path / "wheels", list(gv.STAGE_NAMES)) is None


def test_without_a_gpu_the_install_stages_run_and_the_others_are_refused(monkeypatch, tmp_path, capsys):
    info = {**GPU_INFO, "gpu": None, "arch": None}
    monkeypatch.setattr(gv, "probe", lambda: info)
    ran = []

    def fake_run(stage, out, seconds_left):
        ran.append((stage.name, stage.env.get("PROGAN_FAST_CUDA")))
        return gv.StageResult(stage.name, " ".join(stage.command), stage.cap_s, "passed", 1.0, 0, "ok")

    monkeypatch.setattr(gv, "run_stage", fake_run)
    assert gv.main(["--stages", "install,native-status", "--out", str(tmp_path / "r")]) == 0
    assert ran == [("install", "0"), ("native-status", None)]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["install", "native-status"]
    assert gv.main(["--stages", "install,op-tests", "--out", str(tmp_path / "r2")]) == 2
    assert "sees no CUDA device, and op-tests need one" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def _fake_sanitizer(tmp_path, refuse: bool) -> str:
    """A compute-sanitizer stand-in: the probe (no --target-processes) passes or is refused as on
    some GPU machines; the real run wraps the command."""
    path = tmp_path / ("refusing-sanitizer" if refuse else "sanitizer")
    probe = 'echo "========= Error: Device not supported"; exit 1' if refuse else 'echo "probe ok"; exit 0'
    path.write_text("#!/bin/bash\n"
                    'if [[ " $* " == *" --target-processes "* ]]; then echo "under memcheck"; shift 6; exec "$@"; fi\n'
                    f"{probe}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("refuse", [False, True])
def test_memcheck_runs_where_the_sanitizer_accepts_the_device_and_plainly_where_it_refuses(tmp_path, refuse):
    command = [sys.executable, "-c",
               "import os; print('caching off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on');"
               "print('3 passed in 0.1s')"]
    stage = next(s for s in gv.plan(GPU_INFO, tmp_path, None) if s.name == "native-tests")
    assert stage.memcheck and stage.env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    stage.command, stage.sanitizer = command, _fake_sanitizer(tmp_path, refuse)
    r = gv.run_stage(stage, tmp_path, 100)
    log = Path(r.log).read_text()
    assert r.status == "passed" and r.detail == "3 passed in 0.1s" and "caching off" in log
    if refuse:
        assert r.note == "ran WITHOUT memcheck: compute-sanitizer refuses this device (Error: Device not supported)"
        assert "under memcheck" not in log
    else:
        assert r.note == "under compute-sanitizer memcheck" and "under memcheck" in log
    md = gv.summary_markdown(GPU_INFO, [r], [], 480, 10.0)
    assert f"- native-tests: {r.note}" in md


def test_a_bench_cut_at_its_cap_keeps_its_rows_in_the_report(tmp_path):
    # A bench that saved one row, then hangs: the cut stops it, and its row reaches the summary.
    row = {"res": 8, "batch": 64, "variant": "reference", "ms_per_step": 5.0, "img_per_s": 12800.0,
           "vs_reference": 1.0, "note": "", "picks": ""}
    script = (f"import json, pathlib, time; pathlib.Path({str(tmp_path / 'bench-8.json')!r}).write_text("
              f"json.dumps({{'complete': False, 'results': [{row!r}]}})); time.sleep(60)")
    r = gv.run_stage(gv.Stage("bench-8", 2, [sys.executable, "-c", script]), tmp_path, 100)
    assert r.status == "cut"
    gv.note_kept_rows([r], tmp_path)
    assert r.note == "1 configuration measured and kept before it stopped"
    md = gv.summary_markdown(GPU_INFO, [r], gv.bench_rows(tmp_path), 480, 3.0)
    assert "- bench-8: cut at its cap of 2 s" in md and "| 8 | 64 | reference | 5.00 | 12800.0 | 1.00 |  |" in md


def test_the_rehearsal_plan_is_every_stage_on_the_cpu(tmp_path):
    stages = gv.plan(GPU_INFO, tmp_path, None, rehearse=True)
    assert [s.name for s in stages] == list(gv.STAGE_NAMES)
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in stages)
    assert stages[0].env["PROGAN_FAST_CUDA"] == "0" and stages[0].command[3:5] == ["install", "--dry-run"]
    assert all("--device" in s.command and "cpu" in s.command for s in stages if s.name.startswith("bench-"))
    assert sum(gv.REHEARSE_CAPS.values()) <= 3 * 60 and gv.REHEARSE_BUDGET < 3 * 60


@pytest.mark.slow
def test_the_rehearsal_writes_a_complete_report(tmp_path, monkeypatch, capsys):
    # Roomy caps: this checks the report, not the speed of a shared test machine (CI's own --rehearse does).
    monkeypatch.setattr(gv, "REHEARSE_CAPS", {name: 150 for name in gv.STAGE_NAMES})
    code = gv.main(["--rehearse", "--stages", "native-status,native-tests,bench-8", "--budget", "450",
                    "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rehearsal"] is True
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["native-status", "native-tests", "bench-8"]
    assert all(s["status"] == "passed" for s in stages.values())
    assert " passed" in stages["native-tests"]["detail"] and stages["native-tests"]["note"].startswith("ran WITHOUT memcheck")
    assert [row["variant"] for row in report["bench"]] == ["reference", "cpu"]
    md = (tmp_path / "r" / "summary.md").read_text()
    assert md.startswith("# GPU verification rehearsal") and "| native-tests | passed |" in md
    assert "| 4 | 2 | reference |" in md
