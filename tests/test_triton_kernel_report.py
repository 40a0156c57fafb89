"""Every Triton kernel compiled ahead of time for sm_80 (A100) and sm_90 (H100) without a GPU.

``python -m progan_fast.ops.kernel_report`` compiles each kernel for each GPU autotune config
(float32 and bfloat16 pointers) and reads registers per thread, spills and shared memory off the
cubin. It runs in a subprocess because the tests themselves run with ``TRITON_INTERPRET=1``, under
which kernels cannot be compiled. Any spill fails the test; the table is printed in pytest's
summary ("Triton kernel report").
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPORT: list[str] = []  # printed by conftest's pytest_terminal_summary


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "progan_fast.ops.kernel_report", "--json"], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    kernels = {r["kernel"].split(":")[0] for r in rows}
    assert {"pixel_norm_fwd", "pixel_norm_bwd"} <= kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    REPORT.append(f"{'kernel[config]':<80} {'arch':>6} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for r in rows:
        REPORT.append(f"{r['kernel']:<80} {r['arch']:>6} {r['regs']:>5} {r['spill_bytes']:>8} {r['shared_bytes']:>7}")
        assert 0 < r["regs"] <= 255
    spills = [f"{r['kernel']} {r['arch']}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert proc.returncode == 0
