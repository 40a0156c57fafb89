"""The two pinned stacks stay what they claim: constraints.txt (the tests' default stack) and
constraints-oldest.txt (the GPU machines' stack, which CI also tests) pin the same packages, at
the same versions except the few the oldest stack must pin differently, and the oldest stack's
torch and triton are the lowest versions setup.py accepts."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pinned differently on purpose; constraints-oldest.txt says why for each.
OLDEST_STACK_OWN_PINS = {"torch", "triton", "numpy", "setuptools"}


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, version = line.split("==")
            pins[package.lower()] = version
    return pins


def test_the_oldest_stack_pins_the_same_packages_at_the_same_versions_but_its_own():
    default, oldest = _pins("constraints.txt"), _pins("constraints-oldest.txt")
    assert set(oldest) == set(default)
    assert {p for p in default if default[p] != oldest[p]} <= OLDEST_STACK_OWN_PINS


def test_the_oldest_stack_is_the_oldest_setup_py_accepts():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    oldest = _pins("constraints-oldest.txt")
    for package in ("torch", "triton"):
        lowest = re.search(rf'"{package}>=([0-9.]+)', setup).group(1)
        assert oldest[package].startswith(lowest + "."), (package, lowest, oldest[package])


# What the GPU machines hold (issue 23; /work/shared/notes/environment.md), as pip names. They have
# no network: a requirement outside this set makes `pip install` reach for the index and fail there,
# before the native library is built.
GPU_MACHINE_PACKAGES = {"torch", "triton", "numpy", "pillow", "tqdm", "tensorboard", "pytest", "pytest-benchmark",
                        "pytest-timeout", "pytest-xdist", "setuptools", "wheel", "ninja", "onnx", "onnxruntime",
                        "onnxscript", "matplotlib", "scipy", "torchvision", "hypothesis", "pybind11", "pytest-cov"}


def _setup_list(name: str) -> list[str]:
    """The requirement names in setup.py's `name=[...]` or `"name": [...]` list."""
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    block = re.search(rf'\b"?{name}"?\s*[=:]\s*\[(.*?)\]', setup, re.S).group(1)
    block = "\n".join(line.split("#", 1)[0] for line in block.splitlines())
    return [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in re.findall(r'"([^"]+)"', block)]


def test_everything_an_install_requires_is_on_the_gpu_machines():
    required = _setup_list("install_requires") + _setup_list("test")
    assert {"torch", "numpy", "pytest"} <= set(required)  # the parse found the lists
    assert set(required) <= GPU_MACHINE_PACKAGES, set(required) - GPU_MACHINE_PACKAGES


def test_optional_pins_stay_optional():
    # nvtx is pinned (for progan_fast[nvtx]) but required by nothing: --nvtx uses torch.cuda.nvtx on CUDA builds.
    assert "nvtx" in _pins("constraints.txt") and "nvtx" in _setup_list("nvtx")
    assert "nvtx" not in _setup_list("install_requires") + _setup_list("test")
