"""setup.py's choice of native build (kernels/build_config.py), with stand-ins for torch and nvcc:
CUDA kernels only where nvcc's major CUDA version is torch's, else the CPU twins with one reason."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_build_config():
    spec = importlib.util.spec_from_file_location("build_config_under_test", ROOT / "kernels" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = load_build_config()

NVCC_13 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def fake_torch(cuda="13.0", gpu=True):
    return SimpleNamespace(__version__="2.11.0", version=SimpleNamespace(cuda=cuda),
                           cuda=SimpleNamespace(is_available=lambda: gpu))


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("PROGAN_FAST_CUDA", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)


def decide(torch, release="13.0", home="/opt/cuda-13.0"):
    return build_config.want_cuda(torch, find_home=lambda: home, release_of=lambda h: release)


def test_nvcc_version_is_read_from_its_release_line():
    assert build_config.parse_nvcc_release(NVCC_13) == "13.0"
    assert build_config.parse_nvcc_release("Cuda compilation tools, release 12.8, V12.8.93") == "12.8"
    assert build_config.parse_nvcc_release("bash: nvcc: command not found") is None


def test_matching_major_versions_build_the_cuda_kernels():
    ok, why = decide(fake_torch("13.0"), release="13.1")
    assert ok and "nvcc 13.1 in /opt/cuda-13.0" in why
    assert os.environ["CUDA_HOME"] == "/opt/cuda-13.0"


@pytest.mark.parametrize("torch_cuda, nvcc", [("12.8", "13.0"), ("13.0", "12.4")])
@pytest.mark.parametrize("forced", [False, True])
def test_a_different_major_version_builds_the_cpu_twins_and_says_why(monkeypatch, torch_cuda, nvcc, forced):
    if forced:  # even PROGAN_FAST_CUDA=1: torch's cpp_extension would refuse, failing pip install
        monkeypatch.setenv("PROGAN_FAST_CUDA", "1")
    ok, why = decide(fake_torch(torch_cuda), release=nvcc)
    assert not ok
    assert f"is CUDA {nvcc} but torch" in why and f"built for CUDA {torch_cuda}" in why
    assert "\n" not in why
    assert "CUDA_HOME" not in os.environ


def test_an_nvcc_whose_version_cannot_be_read_builds_the_cpu_twins():
    ok, why = decide(fake_torch("13.0"), release=None)
    assert not ok and "nvcc --version" in why


def test_the_other_reasons_are_decided_before_nvcc_is_run(monkeypatch):
    def never(home):
        raise AssertionError("nvcc was run")

    cases = [(fake_torch(None), "is a CPU build"), (fake_torch("13.0", gpu=False), "no GPU visible")]
    for torch, reason in cases:
        ok, why = build_config.want_cuda(torch, find_home=lambda: "/opt/cuda", release_of=never)
        assert not ok and reason in why
    ok, why = build_config.want_cuda(fake_torch("13.0"), find_home=lambda: None, release_of=never)
    assert not ok and "no CUDA toolkit" in why
    monkeypatch.setenv("PROGAN_FAST_CUDA", "0")
    assert build_config.want_cuda(fake_torch("13.0"), find_home=lambda: "/opt/cuda", release_of=never) == (
        False, "PROGAN_FAST_CUDA=0")


def test_nvcc_release_runs_the_toolkits_nvcc(tmp_path):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\ncat <<'END'\n" + NVCC_13 + "END\n")
    nvcc.chmod(0o755)
    assert build_config.nvcc_release(str(tmp_path)) == "13.0"
    assert build_config.nvcc_release(str(tmp_path / "missing")) is None


@pytest.mark.slow
def test_setup_py_says_its_decision_in_one_line():
    """setup.py loads build_config and prints its reason (``--name`` stops before building)."""
    env = {**os.environ, "PROGAN_FAST_CUDA": "0"}
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "progan_fast"
    said = [line for line in proc.stderr.splitlines() if line.startswith("progan_fast: ")]
    assert said == ["progan_fast: building progan_fast._C with CPU kernels only (PROGAN_FAST_CUDA=0)"]
