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
