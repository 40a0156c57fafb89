"""fade_in and fade_reals on channels-last (NHWC) activations, every backend available here: the
reference, Triton (under the interpreter without a GPU), the C++ twins (``cpu``) and the CUDA
kernels through the emulator. Against the float64 NCHW reference: forward, backward (alpha's
gradient included) and double backward in both layouts, outputs and input gradients in the first
input's layout, mixed layouts, gradcheck and gradgradcheck in float64 on channels-last inputs,
opcheck on channels-last inputs, and no hidden copy of an activation."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from layout_checks import (EMU_DTYPES, TOL, activation_copies, assert_in_layout_of, assert_layout, backends,
                                 configure, emu_buffer, emu_check, emu_output, emu_read, emulator, layout_id,
                                 randn)

from progan_fast.ops import _native
from progan_fast.ops import triton as triton_backend

fi = importlib.import_module("progan_fast.ops.fade_in")

# low-resolution shapes: batch 1, RGB, channels not a power of two, odd heights and widths, C == 1
# (dense in both layouts, so NCHW).
LOW_SHAPES = [(1, 3, 2, 3), (2, 5, 3, 7), (1, 12, 4, 4), (2, 1, 3, 3)]
LAYOUTS = [pytest.param(cl, id=layout_id(cl)) for cl in (False, True)]
# NHWC only: the NCHW rows are tests/test_ops.py's (reference), tests/test_triton_fade_in.py's
# (triton) and tests/test_native.py's (cpu); bf16 (other loads and stores) in the slow tier.
NHWC = [pytest.param(True, id="nhwc")]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
_ID = lambda s: "x".join(map(str, s))  # noqa: E731


def _up(low):
    return low.repeat_interleave(2, 2).repeat_interleave(2, 3)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_alpha_grad(got, want, dtype):
    # a sum over every element: the tolerance grows with the count
    torch.testing.assert_close(got.double().cpu(), want, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOW_SHAPES, ids=_ID)
@pytest.mark.parametrize("channels_last", NHWC)
@pytest.mark.parametrize("backend", backends())
def test_fade_in_forward_and_backward_keep_the_layout(backend, channels_last, shape, dtype):
    name, device = backend
    n, c, h, w = shape
    low = randn(shape, dtype, channels_last, device, 1).requires_grad_()
    high = randn((n, c, 2 * h, 2 * w), dtype, channels_last, device, 2).requires_grad_()
    alpha = torch.tensor(0.3, device=device, dtype=_acc(dtype), requires_grad=True)
    y = fi.fade_in(low, high, alpha, backend=name)
    assert_in_layout_of(y, channels_last, "output")
    l64, h64 = (t.detach().double().cpu().contiguous().requires_grad_() for t in (low, high))
    a64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    want = torch.lerp(_up(l64), h64, a64)
    torch.testing.assert_close(y.double().cpu(), want.detach(), **TOL[dtype])
    g = randn(y.shape, dtype, channels_last, device, 3)
    d_low, d_high, d_alpha = torch.autograd.grad(y, (low, high, alpha), g)
    assert_in_layout_of(d_low, channels_last, "d_low")
    assert_in_layout_of(d_high, channels_last, "d_high")
    w_low, w_high, w_alpha = torch.autograd.grad(want, (l64, h64, a64), g.double().cpu())
    torch.testing.assert_close(d_low.double().cpu(), w_low, **TOL[dtype])
    torch.testing.assert_close(d_high.double().cpu(), w_high, **TOL[dtype])
    _check_alpha_grad(d_alpha, w_alpha, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 4, 6), (2, 5, 6, 10), (1, 12, 2, 2)], ids=_ID)
@pytest.mark.parametrize("channels_last", NHWC)
@pytest.mark.parametrize("backend", backends())
def test_fade_reals_forward_and_backward_keep_the_layout(backend, channels_last, shape, dtype):
    name, device = backend
    x = randn(shape, dtype, channels_last, device, 1).requires_grad_()
    alpha = torch.tensor(0.6, device=device, dtype=_acc(dtype), requires_grad=True)
    y = fi.fade_reals(x, alpha, backend=name)
    assert_in_layout_of(y, channels_last, "output")
    x64 = x.detach().double().cpu().contiguous().requires_grad_()
    a64 = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    want = torch.lerp(_up(F.avg_pool2d(x64, 2)), x64, a64)
    torch.testing.assert_close(y.double().cpu(), want.detach(), **TOL[dtype])
    g = randn(shape, dtype, channels_last, device, 3)
    d_x, d_alpha = torch.autograd.grad(y, (x, alpha), g)
    assert_in_layout_of(d_x, channels_last, "d_x")
    w_x, w_alpha = torch.autograd.grad(want, (x64, a64), g.double().cpu())
    torch.testing.assert_close(d_x.double().cpu(), w_x, **TOL[dtype])
    _check_alpha_grad(d_alpha, w_alpha, dtype)


@pytest.mark.parametrize("low_channels_last", LAYOUTS)
@pytest.mark.parametrize("backend", backends())
def test_mixed_layouts_follow_the_first_input(backend, low_channels_last):
    name, device = backend
    low = randn((2, 5, 3, 4), torch.float32, low_channels_last, device, 1)
    high = randn((2, 5, 6, 8), torch.float32, not low_channels_last, device, 2)
    y = fi.fade_in(low, high, 0.7, backend=name)
    if name != "reference":  # torch.lerp picks its own layout for mixed inputs
        assert_layout(y, low_channels_last, "output")
    torch.testing.assert_close(y.cpu(), torch.lerp(_up(low.cpu()), high.cpu(), 0.7), **TOL[torch.float32])


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("backend", backends())
def test_double_backward_keeps_the_layout(backend, channels_last):
    # d/dg <d_low(g), u> + <d_high(g), v> is fade_in(u, v); for fade_reals (self-adjoint) it is fade_reals(v).
    name, device = backend
    shape, big = (2, 5, 3, 4), (2, 5, 6, 8)
    low = randn(shape, torch.float64, channels_last, device, 1).requires_grad_()
    high = randn(big, torch.float64, channels_last, device, 2).requires_grad_()
    y = fi.fade_in(low, high, 0.3, backend=name)
    g = randn(big, torch.float64, channels_last, device, 3).requires_grad_()
    d_low, d_high = torch.autograd.grad(y, (low, high), g, create_graph=True)
    u, v = randn(shape, torch.float64, channels_last, device, 4), randn(big, torch.float64, channels_last, device, 5)
    (gg,) = torch.autograd.grad((d_low * u).sum() + (d_high * v).sum(), g)
    assert_in_layout_of(gg, channels_last, "fade_in: d/dg of the backward")
    torch.testing.assert_close(gg.cpu(), torch.lerp(_up(u.cpu()), v.cpu(), 0.3), **TOL[torch.float64])

    x = high.detach().clone().requires_grad_()
    y = fi.fade_reals(x, 0.3, backend=name)
    g = randn(big, torch.float64, channels_last, device, 6).requires_grad_()
    (d_x,) = torch.autograd.grad(y, x, g, create_graph=True)
    (gg,) = torch.autograd.grad((d_x * v).sum(), g)
    assert_in_layout_of(gg, channels_last, "fade_reals: d/dg of the backward")
    torch.testing.assert_close(gg.cpu(), fi.fade_reals_reference(v.cpu().contiguous(), 0.3), **TOL[torch.float64])


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends())
def test_gradcheck_and_gradgradcheck_on_channels_last(backend):
    name, device = backend
    low = randn((1, 3, 2, 3), torch.float64, True, device, 1).requires_grad_()
    high = randn((1, 3, 4, 6), torch.float64, True, device, 2).requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    fade = lambda lo, hi, a: fi.fade_in(lo, hi, a, backend=name)  # noqa: E731
    assert torch.autograd.gradcheck(fade, (low, high, alpha))
    assert torch.autograd.gradgradcheck(fade, (low, high, alpha))
    reals = lambda x, a: fi.fade_reals(x, a, backend=name)  # noqa: E731
    assert torch.autograd.gradcheck(reals, (high, alpha))
    assert torch.autograd.gradgradcheck(reals, (high, alpha))


def _opcheck_samples():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = randn((2, 3, 2, 3), torch.float32, True, device, 1).requires_grad_()
    high = randn((2, 3, 4, 6), torch.float32, True, device, 2).requires_grad_()
    g = randn((2, 3, 4, 6), torch.float32, True, device, 3).requires_grad_()
    a = torch.tensor(0.3, device=device)
    a_grad = torch.tensor(0.3, device=device, requires_grad=True)
    ops = []
    if triton_backend.available():
        ops.append(("triton", fi.TRITON))
    if _native.available():
        ops.append(("native", fi.NATIVE))
    return [pytest.param(k.fade_in, (low, high, a), id=f"{n}-fade_in") for n, k in ops] + \
        [pytest.param(k.fade_in, (low, high, a_grad), id=f"{n}-fade_in-alpha-grad") for n, k in ops] + \
        [pytest.param(k.fade_in_backward, (g, a_grad), id=f"{n}-fade_in_backward") for n, k in ops] + \
        [pytest.param(k.fade_reals, (high, a_grad), id=f"{n}-fade_reals") for n, k in ops]


@pytest.mark.slow
@pytest.mark.parametrize("op,args", _opcheck_samples())
def test_opcheck_on_channels_last(op, args):
    torch.library.opcheck(op, args)  # fake and real outputs agree, strides included


_COPY_BACKENDS = [b for b in ("cpu", "triton") if b in {p.values[0][0] for p in backends()}]


# cpu: the C++ twins (a copy in the glue would be an aten::contiguous/clone event). triton: under the
# interpreter the check is clean too (layout_checks.activation_copies says why).
@pytest.mark.parametrize("name", _COPY_BACKENDS)
def test_no_hidden_copy_of_a_channels_last_activation(name):
    device = "cpu" if name == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    low = randn((2, 6, 3, 5), torch.float32, True, device, 1).requires_grad_()
    high = randn((2, 6, 6, 10), torch.float32, True, device, 2).requires_grad_()
    y = fi.fade_in(low, high, 0.3, backend=name)
    assert activation_copies(lambda: fi.fade_in(low, high, 0.3, backend=name), [low, high]) == []
    g = randn(y.shape, torch.float32, True, device, 3)
    assert activation_copies(lambda: torch.autograd.grad(y, (low, high), g), [low, high]) == []
    y = fi.fade_reals(high, 0.3, backend=name)
    assert activation_copies(lambda: fi.fade_reals(high, 0.3, backend=name), [low, high]) == []
    assert activation_copies(lambda: torch.autograd.grad(y, high, g), [low, high]) == []


@pytest.mark.parametrize("name", _COPY_BACKENDS)
def test_the_copy_detector_sees_the_copy_of_high_in_another_layout(name):
    # The check above can fail: bringing `high` to `low`'s layout is a copy, and it is seen.
    device = "cpu" if name == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    low = randn((2, 6, 3, 5), torch.float32, True, device, 1)
    high = randn((2, 6, 6, 10), torch.float32, False, device, 2)
    assert activation_copies(lambda: fi.fade_in(low, high, 0.3, backend=name), [low, high]) != []


# ----- the CUDA kernels, NHWC instantiation, through the emulator -------------------------------

@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,cap", [((1, 3, 2, 3), None), ((2, 5, 3, 7), None), ((2, 13, 5, 6), 1)],
                         ids=["n1-c3-2x3", "n2-c5-3x7", "n2-c13-5x6-grid1"])
def test_cuda_kernels_on_nhwc_through_the_emulator(emu, request, shape, cap, dtype):
    configure(emu, request.node.name, cap)
    n, c, h, w = shape  # the low-resolution shape
    big = (n, c, 2 * h, 2 * w)
    code, alpha = emu.dtype_code(dtype), 0.3
    low, high, grad = randn(shape, dtype, seed=6), randn(big, dtype, seed=7), randn(big, dtype, seed=8)
    a = emu.scalar(alpha, dtype)
    out = emu_output(emu, big, dtype, "out", True)
    emu.call("fade_in_forward", code, emu_buffer(emu, low, "low", True), emu_buffer(emu, high, "high", True), a, out,
             n, c, h, w, True)
    l64, h64 = low.double().requires_grad_(), high.double().requires_grad_()
    ref = torch.lerp(_up(l64), h64, alpha)
    emu_check(emu_read(out, True), ref, dtype, "fade_in forward (NHWC)")
    d_low, d_high = emu_output(emu, shape, dtype, "d_low", True), emu_output(emu, big, dtype, "d_high", True)
    emu.call("fade_in_backward", code, emu_buffer(emu, grad, "grad", True), a, d_low, d_high, n, c, h, w, True)
    want_low, want_high = torch.autograd.grad(ref, (l64, h64), grad.double())
    emu_check(emu_read(d_low, True), want_low, dtype, "fade_in backward (low, NHWC)")
    emu_check(emu_read(d_high, True), want_high, dtype, "fade_in backward (high, NHWC)")
    faded = emu_output(emu, big, dtype, "out", True)
    emu.call("fade_reals", code, emu_buffer(emu, high, "x", True), a, faded, n, c, h, w, True)
    x64 = high.double()
    emu_check(emu_read(faded, True), torch.lerp(_up(F.avg_pool2d(x64, 2)), x64, alpha), dtype, "fade_reals (NHWC)")
    launched = emu.launched_kernels()
    t = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
    for kernel in ("fade_in_fwd_kernel", "fade_in_bwd_kernel", "fade_reals_kernel"):
        assert f"{kernel}<{t[dtype]}, 1>" in launched, sorted(launched)


def test_cuda_nhwc_launchers_refuse_a_row_past_32_bit_arithmetic(emu, request):
    # The NHWC kernels index within a low-resolution row (C * W elements) in 32 bits; a longer row is
    # refused before any launch (so the tiny buffers here are never read).
    configure(emu, request.node.name, None)
    code = emu.dtype_code(torch.float32)
    t = randn((1, 1, 2, 2), torch.float32)
    a = emu.scalar(0.5, torch.float32)
    c, wl = 65536, 65537
    for launcher, args in [("fade_in_forward", (emu.buffer(t, "low"), emu.buffer(t, "high"), a, emu.buffer(t, "o"))),
                           ("fade_in_backward", (emu.buffer(t, "g"), a, emu.buffer(t, "dl"), emu.buffer(t, "dh"))),
                           ("fade_reals", (emu.buffer(t, "x"), a, emu.buffer(t, "o")))]:
        with pytest.raises(emulator.EmulatedKernelError) as info:
            emu.call(launcher, code, *args, 1, c, 1, wl, True)
        # cudaErrorInvalidValue from the launcher itself: no kernel ran, so the emulator reported nothing
        assert info.value.code == 1 and info.value.report == "(no report)", info.value
