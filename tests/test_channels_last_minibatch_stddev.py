"""minibatch_stddev on channels-last (NHWC) activations, every backend.

The contract (progan_fast/ops/common.py, "Memory formats"): ``x`` dense NCHW or dense NHWC, the output
``[N, C + 1, H, W]`` and ``dx`` in ``x``'s layout, and no copy of an activation on the way. In NHWC
the stat channel is interleaved (each pixel's C + 1 values contiguous, the stat value last).

Backends: ``reference`` (eager), ``triton`` (the interpreter here, see conftest.py), ``cpu`` (the C++
twins of ``progan_fast._C``) and the CUDA kernels through the CPU emulator of kernels/emulation
(``cuda-emulated``, the launchers called directly with NHWC buffers, as tests/test_cuda_emulated.py
does for NCHW). Each runs forward and backward on random inputs in both layouts against the float64
NCHW reference, on odd shapes: batch 1, a prime batch (groups of 1), a batch the group size does
not divide, channels that are not powers of two, odd H and W, F = C*H*W spanning several 256-feature
partial sums, and the two shapes dense in both layouts (C == 1, H*W == 1), which count as NCHW.
The op sits inside the gradient penalty, so gradcheck and gradgradcheck run in float64 on
channels-last inputs, and so does the penalty's double backward against the reference.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

import layout_checks
from layout_checks import activation_copies
from progan_fast.ops import _native
from progan_fast.ops import triton as triton_backend
from progan_fast.ops.common import is_channels_last

mb = importlib.import_module("progan_fast.ops.minibatch_stddev")

EPS = 1e-8
CL = torch.channels_last

BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton", marks=[pytest.mark.skipif(
        not triton_backend.available(),
        reason=triton_backend.why_unavailable() if triton_backend.triton else "no triton"), pytest.mark.skipif(
        torch.cuda.is_available(),  # here Triton is the interpreter on CPU tensors
        reason="on a GPU machine tests/test_channels_last_gpu.py runs the compiled kernels on CUDA tensors")]),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not _native.available(), reason=_native.why_unavailable())),
]
IMPLS = {"reference": mb.reference, "triton": mb.triton_impl, "cpu": getattr(mb, "native_impl", None)}

# (shape, group_size). Every shape but the last two is dense in exactly one layout per format.
SHAPES = [
    pytest.param((1, 3, 5, 7), 4, id="n1-c3-5x7"),
    pytest.param((6, 5, 3, 3), 4, id="n6-g3-c5-3x3"),         # group 4 does not divide 6: groups of 3
    pytest.param((7, 6, 3, 5), 4, id="n7-g1-c6-3x5"),         # prime batch: groups of 1
    pytest.param((8, 7, 9, 11), 4, id="n8-g4-c7-9x11"),       # F = 693: three partial sums, the last partial
    pytest.param((4, 300, 2, 3), 2, id="n4-g2-c300-2x3"),     # F = 1800, runs of 300 channels
    pytest.param((4, 1, 3, 5), 2, id="n4-c1-ambiguous"),      # C == 1: dense in both, counts as NCHW
    pytest.param((4, 5, 1, 1), 2, id="n4-c5-1x1-ambiguous"),  # H*W == 1: likewise
]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=CL) if channels_last else t.contiguous()


def _expected_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the contract promises for outputs of ``x``: NHWC only when ``x`` is NHWC and not NCHW."""
    return CL if is_channels_last(x) else torch.contiguous_format


def _assert_format(t: torch.Tensor, x: torch.Tensor, what: str) -> None:
    fmt = _expected_format(x)
    assert t.is_contiguous(memory_format=fmt), f"{what}: strides {t.stride()} are not {fmt} like x {x.stride()}"
    if fmt == CL:  # and strictly NHWC, not a tensor that happens to be dense in both
        assert is_channels_last(t), f"{what}: strides {t.stride()}"


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    grad = torch.randn((n, c + 1, h, w), generator=gen, dtype=torch.float64)
    return x, grad


def _reference64(x64, grad64, group_size):
    """Forward and input gradient in float64 by tests/test_ops.py's loop over the groups (not
    ``mb.reference``, whose own row would otherwise check it against itself)."""
    from test_ops import mbstd_by_hand  # eps 1e-8, as EPS here

    xr = x64.contiguous().requires_grad_()
    y = mbstd_by_hand(xr, group_size)
    (dx,) = torch.autograd.grad(y, xr, grad64.contiguous())
    return y.detach(), dx


# ----- forward and backward against the float64 NCHW reference ----------------------------------------

# NHWC only (NCHW: tests/test_ops.py, tests/test_triton_minibatch_stddev.py, tests/test_native.py);
# float64 and bf16 in the slow tier.
@pytest.mark.parametrize("channels_last", [True], ids=["nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow),
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("shape,group_size", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_on_channels_last(backend, shape, group_size, dtype, channels_last):
    x64, grad64 = _inputs(shape, dtype, zlib.crc32(repr((shape, group_size)).encode()))
    y_ref, dx_ref = _reference64(x64, grad64, group_size)
    x = _layout(x64.to(dtype), channels_last).requires_grad_()
    grad = _layout(grad64.to(dtype), channels_last)
    y = IMPLS[backend](x, group_size)
    _assert_format(y, x, "output")
    n, c = shape[:2]
    assert torch.equal(y[:, :c], x.detach()), "the copy of x is exact"
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    (dx,) = torch.autograd.grad(y, x, grad)
    _assert_format(dx, x, "dx")
    torch.testing.assert_close(dx.double(), dx_ref, **TOL[dtype])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_gradient_in_the_other_layout(backend):
    """A gradient that arrives NCHW for an NHWC input is brought to x's layout: dx stays NHWC."""
    x64, grad64 = _inputs((6, 5, 3, 5), torch.float32, 3)
    _, dx_ref = _reference64(x64, grad64, 4)
    x = _layout(x64.float(), True)
    dx = getattr(_ops(backend), "minibatch_stddev_backward")(grad64.float().contiguous(), x, 4, EPS)
    _assert_format(dx, x, "dx")
    torch.testing.assert_close(dx.double(), dx_ref, **TOL[torch.float32])


def test_non_dense_input_is_computed_in_nchw():
    """Strides that are neither layout are copied to NCHW (the documented fallback), values unchanged."""
    x = torch.randn(4, 3, 5, 6).transpose(2, 3)
    for backend in ("triton", "cpu"):
        if (backend == "triton" and not triton_backend.available()) or (backend == "cpu" and not _native.available()):
            continue
        y = IMPLS[backend](x, 2)
        assert y.is_contiguous()
        torch.testing.assert_close(y, mb.reference(x, 2), rtol=2e-5, atol=2e-6)


def _ops(backend):
    return mb.TRITON if backend == "triton" else mb.NATIVE


# ----- the CUDA kernels, through the emulator -----------------------------------------------------

EMU_SHAPES = [
    pytest.param((1, 3, 5, 7), 4, None, id="n1-c3-5x7"),
    pytest.param((6, 5, 3, 3), 4, None, id="n6-g3-c5-3x3"),
    pytest.param((8, 7, 9, 11), 4, 2, id="n8-g4-f693-grid2"),   # grid cap 2: the bwd grid-stride loop loops
    pytest.param((2, 300, 1, 3), 2, None, id="n2-c300-1x3"),    # runs of 300 channels across 256-feature blocks
    pytest.param((3, 1, 3, 5), 4, None, id="n3-c1"),            # C == 1 in NHWC memory: stat after every pixel
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,group_size,cap", EMU_SHAPES)
def test_cuda_kernels_emulated_nhwc(emu, request, shape, group_size, cap, dtype):
    module = layout_checks.cuda_emulated
    emu.configure(seed=zlib.crc32(request.node.name.encode()), max_grid_blocks=cap or 65535 * 8)
    module.run_minibatch_stddev(emu, shape, group_size, dtype, channels_last=True)


@pytest.mark.parametrize("placement", ["end", "start"])
def test_cuda_kernels_emulated_nhwc_against_guard_pages(emu, placement):
    module = layout_checks.cuda_emulated
    emu.configure(seed=7, max_grid_blocks=2)
    module.run_minibatch_stddev(emu, (4, 3, 5, 7), 2, torch.float32, placement, channels_last=True)


# ----- gradcheck and gradgradcheck in float64 on channels-last inputs ------------------------------

def _cl64(*shape):
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert is_channels_last(x)
    return x


# Tiny shapes (the interpreter pays per launch); C > 1 and H*W > 1 so the input is strictly NHWC.
GRAD_CASES = [pytest.param((3, 2, 1, 2), 4, False, id="n3-g3-full"),
              pytest.param((4, 3, 2, 1), 2, False, id="n4-g2-full"),
              pytest.param((6, 2, 2, 2), 4, True, id="n6-g3-fast")]


@pytest.mark.slow
@pytest.mark.parametrize("shape,group_size,fast", GRAD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_channels_last(backend, shape, group_size, fast):
    fn = lambda t: IMPLS[backend](t, group_size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (_cl64(*shape),), fast_mode=fast)


@pytest.mark.slow
@pytest.mark.parametrize("shape,group_size,fast", GRAD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_channels_last(backend, shape, group_size, fast):
    fn = lambda t: IMPLS[backend](t, group_size)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (_cl64(*shape),), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_double_backward_channels_last(backend):
    """The WGAN-GP pattern on an NHWC input against the NCHW reference; the first-order gradient and
    the penalty's gradient wrt x keep the input's layout."""
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def penalty(impl, channels_last):
        xi = _layout(x, channels_last).requires_grad_()
        y = impl(xi * 1.5, 4)
        score = (y.square().sum(dim=1) * w).sum()
        (g,) = torch.autograd.grad(score, xi, create_graph=True)
        gx, gw = torch.autograd.grad(g.square().sum(), (xi, w))
        if channels_last:
            _assert_format(g, xi, "penalty gradient")
            _assert_format(gx, xi, "the penalty's gradient wrt x")
        return gx, gw

    for got, want in zip(penalty(IMPLS[backend], True), penalty(mb.reference, False)):
        torch.testing.assert_close(got, want)


# ----- opcheck on channels-last inputs (fake and real strides agree, autograd registration) ---------

@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_opcheck_channels_last(backend):
    k = _ops(backend)
    x = torch.randn(4, 3, 2, 3).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(k.minibatch_stddev, (x, 2, EPS))
    grad = torch.randn(4, 4, 2, 3).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(k.minibatch_stddev_backward, (grad, x, 2, EPS))
    # The fakes promise the real strides (opcheck compares them; this states it for NHWC outright).
    from torch._subclasses.fake_tensor import FakeTensorMode
    xd, gd = x.detach(), grad.detach()
    with FakeTensorMode() as mode:
        fx, fg = mode.from_tensor(xd), mode.from_tensor(gd)
        assert is_channels_last(k.minibatch_stddev(fx, 2, EPS))
        assert is_channels_last(k.minibatch_stddev_backward(fg, fx, 2, EPS))


# ----- no hidden copy of an activation -------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_no_hidden_copy_of_an_activation(backend):
    k = _ops(backend)
    x = torch.randn(4, 3, 5, 7).contiguous(memory_format=CL)
    grad = torch.randn(4, 4, 5, 7).contiguous(memory_format=CL)
    shapes = [x.shape, grad.shape]
    assert activation_copies(lambda: k.minibatch_stddev(x, 2, EPS), shapes) == []
    assert activation_copies(lambda: k.minibatch_stddev_backward(grad, x, 2, EPS), shapes) == []
    # Through autograd too (forward and backward, as training runs it).
    xg = x.clone().requires_grad_()
    assert activation_copies(lambda: torch.autograd.grad(IMPLS[backend](xg, 2), xg, grad), shapes) == []
    # NCHW is copy-free as before.
    xn, gn = x.contiguous(), grad.contiguous()
    assert activation_copies(lambda: k.minibatch_stddev_backward(gn, xn, 2, EPS), shapes) == []


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_copy_detector_sees_copies(backend):
    """The check above can fail: a non-dense input, and a gradient in the other layout, are copied."""
    k = _ops(backend)
    x = torch.randn(4, 3, 5, 7).contiguous(memory_format=CL)
    grad = torch.randn(4, 4, 5, 7)  # NCHW for an NHWC x
    shapes = [x.shape, grad.shape]
    assert activation_copies(lambda: k.minibatch_stddev(x.transpose(2, 3).transpose(2, 3)[:, :, :, :], 2, EPS),
                              shapes) == []  # still NHWC: no copy
    assert activation_copies(lambda: k.minibatch_stddev(x.permute(0, 1, 3, 2), 2, EPS), [(4, 3, 7, 5)])
    assert activation_copies(lambda: k.minibatch_stddev_backward(grad, x, 2, EPS), shapes)


def test_cuda_launchers_refuse_nhwc_samples_of_2_pow_32_features(emu):
    """The NHWC kernels divide feature indices in 32 bits: a larger sample is an error, not garbage
    (checked before any memory is touched, so no buffers are needed)."""
    module = layout_checks.cuda_emulated
    emu.configure(seed=1)
    code, f = emu.dtype_code(torch.float32), 2**32
    for launcher, args in [("minibatch_stddev_forward", (None, None, None)),
                           ("minibatch_stddev_backward", (None, None, None, None))]:
        with pytest.raises(module.EmulatedKernelError):
            emu.call(launcher, code, *args, 1, 1, f, 1, EPS, True)
