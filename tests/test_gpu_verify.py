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
        assert f"{name:<14} cap {cap:>3} s" in out.stdout
    assert "-m cuda" in out.stdout and "progan_fast.bench --device cuda --res 128" in out.stdout
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
