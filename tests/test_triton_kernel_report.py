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


@pytest.mark.slow  # compiles every config (2 min); CI runs it on both stacks
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


def _launch_arg(kind: str):
    """An argument of Triton type ``kind`` as a launch at training widths passes it: a fresh tensor
    (16-byte aligned), a size that is a multiple of 16, a float."""
    import torch

    dtypes = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp64": torch.float64}
    if kind in dtypes:
        return torch.empty(64, dtype=dtypes[kind])
    return {"i32": 4096, "fp32": 0.5}[kind]


def test_the_report_compiles_with_the_attributes_a_launch_gets():
    """launch_attrs equals what Triton's own launch-time specialization gives such arguments."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    from progan_fast.ops import kernel_report

    specs = {}
    for spec in kernel_report.all_specs():
        specs.setdefault(spec.name.split(":")[0], spec)  # one spec per kernel
    assert len(specs) >= 15
    for spec in specs.values():
        expected = {}
        for name, kind in spec.signature.items():
            mangled, desc = jit.native_specialize_impl(BaseBackend, _launch_arg(kind), False, True, True)[:2]
            assert mangled == kind, (spec, name)
            if isinstance(desc, str) and BaseBackend.parse_attr(desc):  # as the JIT: only str descriptors
                expected[(spec.kernel.arg_names.index(name),)] = BaseBackend.parse_attr(desc)
        assert expected and kernel_report.launch_attrs(spec) == expected, spec


@pytest.mark.slow
def test_a_compiled_config_carries_the_divisibility_of_every_pointer_and_size():
    code = ("from progan_fast.ops import kernel_report\n"
            "from progan_fast.ops.triton import blend\n"
            "print(kernel_report.compile_spec(blend.AOT_SPECS[0], 90).asm['ttir'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if "tt.func public @_blend_fwd_kernel" in line)
    for arg in ("old_ptr", "new_ptr", "alpha_ptr", "out_ptr", "n"):
        assert f"%{arg}: " in header
        assert header.split(f"%{arg}: ")[1].split(" loc(")[0].endswith("{tt.divisibility = 16 : i32}"), arg
