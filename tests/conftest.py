import os

import torch

# Without a GPU, every Triton kernel runs on CPU tensors through Triton's interpreter. The flag must
# be set before progan_fast (and so triton.jit) is imported; on a GPU machine the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# --backend auto's choice cache stays out of the user's ~/.cache; the cache's own tests set it.
os.environ.setdefault("PROGAN_FAST_AUTO_CACHE", "off")

import pytest  # noqa: E402


def pytest_sessionstart(session):
    """Under CI (CI=true) a missing native library or Triton is a failure, not a file of skips:
    without this a broken build would turn whole test files into skips and CI would stay green."""
    if os.environ.get("CI") != "true":
        return
    from progan_fast.ops import _native
    from progan_fast.ops import triton as triton_backend

    problems = []
    if not _native.available():
        problems.append(_native.why_unavailable())
    if not triton_backend.available():
        problems.append("Triton: " + (triton_backend.why_unavailable() if triton_backend.triton else "not installed"))
    if problems:
        pytest.exit("CI=true, but the tests would skip: " + "; ".join(problems), returncode=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _exact_fp32_convolutions():
    """Tests compare fp32 results at fp32 tolerances, so on a GPU every fp32 conv runs exact
    (PyTorch's default lets cuDNN convs, and so by our one policy the Triton conv, use TF32;
    see progan_fast.ops.common.fp32_conv_uses_tf32). A test of TF32 itself sets it back."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = saved


@pytest.fixture(autouse=True)
def _reference_backend():
    """Every test starts (and leaves) the process-wide op backend at the reference, and ``auto``
    with no choices made."""
    from progan_fast import ops

    ops.set_default_backend("reference")
    ops.autotune.TUNER.reset()
    yield
    ops.set_default_backend("reference")
    ops.autotune.TUNER.reset()


@pytest.fixture(scope="module")
def emu():
    """The CUDA kernels' CPU emulator (tests/layout_checks.py's loader: built on first use, or the
    build PROGAN_CUDA_EMULATION_LIBRARY names), with its default (strict) settings, for the
    channels-last files' NHWC kernel tests and tests/test_pixel_norm_fp16.py.
    tests/test_cuda_emulated.py has its own."""
    from layout_checks import load_emulator

    e = load_emulator()
    e.configure()
    yield e
    e.configure()


def pytest_terminal_summary(terminalreporter):
    """Print the Triton kernel report (registers, spills, shared memory per kernel and arch)."""
    import sys

    module = sys.modules.get("test_triton_kernel_report") or sys.modules.get("tests.test_triton_kernel_report")
    if module is not None and module.REPORT:
        terminalreporter.section("Triton kernel report (ahead-of-time, no GPU)")
        for line in module.REPORT:
            terminalreporter.write_line(line)
