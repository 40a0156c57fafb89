"""blend on channels-last (NHWC) activations, every backend available here: the reference, Triton
(under the interpreter without a GPU), the C++ twins (``cpu``) and the CUDA kernels through the
emulator. Against the float64 NCHW reference: forward, backward (alpha's gradient included) and
double backward (the op is inside the gradient penalty) in both layouts, outputs and input
gradients in the first input's layout, mixed layouts, gradcheck and gradgradcheck in float64 on
channels-last inputs, opcheck on channels-last inputs, and no hidden copy of an activation."""

import importlib

import pytest
import torch
from layout_checks import (EMU_DTYPES, TOL, activation_copies, assert_in_layout_of, assert_layout, backends,
                                 configure, emu_buffer, emu_check, emu_output, emu_read, layout_id,
                                 randn)

from progan_fast.ops import _native
from progan_fast.ops import triton as triton_backend

bl = importlib.import_module("progan_fast.ops.blend")

# batch 1, channels not a power of two, odd heights and widths, and C == 1 (dense in both layouts).
SHAPES = [(1, 3, 5, 7), (2, 5, 4, 6), (1, 12, 3, 3), (2, 1, 3, 5)]
LAYOUTS = [pytest.param(cl, id=layout_id(cl)) for cl in (False, True)]
# NHWC only: the NCHW rows are tests/test_ops.py's (reference), tests/test_triton_fade_in.py's
# (triton) and tests/test_native.py's (cpu); bf16 (other loads and stores) in the slow tier.
NHWC = [pytest.param(True, id="nhwc")]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", NHWC)
@pytest.mark.parametrize("backend", backends())
def test_forward_and_backward_keep_the_layout(backend, channels_last, shape, dtype):
    name, device = backend
    old = randn(shape, dtype, channels_last, device, 1).requires_grad_()
    new = randn(shape, dtype, channels_last, device, 2).requires_grad_()
    alpha = torch.tensor(0.3, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         requires_grad=True)
    y = bl.blend(old, new, alpha, backend=name)
    assert_in_layout_of(y, channels_last, "output")
    o64, n64 = (t.detach().double().cpu().contiguous().requires_grad_() for t in (old, new))
    a64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    want = o64 * (1 - a64) + n64 * a64  # not bl.reference (torch.lerp): an independent formula
    torch.testing.assert_close(y.double().cpu(), want.detach(), **TOL[dtype])
    g = randn(shape, dtype, channels_last, device, 3)
    d_old, d_new, d_alpha = torch.autograd.grad(y, (old, new, alpha), g)
    assert_in_layout_of(d_old, channels_last, "d_old")
    assert_in_layout_of(d_new, channels_last, "d_new")
    w_old, w_new, w_alpha = torch.autograd.grad(want, (o64, n64, a64), g.double().cpu())
    torch.testing.assert_close(d_old.double().cpu(), w_old, **TOL[dtype])
    torch.testing.assert_close(d_new.double().cpu(), w_new, **TOL[dtype])
    # alpha's gradient is a sum over every element: the tolerance grows with the count
    torch.testing.assert_close(d_alpha.double().cpu(), w_alpha, rtol=TOL[dtype]["rtol"] * 10,
                               atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("first_channels_last", LAYOUTS)
@pytest.mark.parametrize("backend", backends())
def test_mixed_layouts_follow_the_first_input(backend, first_channels_last):
    name, device = backend
    shape = (2, 5, 3, 4)
    old = randn(shape, torch.float32, first_channels_last, device, 1)
    new = randn(shape, torch.float32, not first_channels_last, device, 2)
    y = bl.blend(old, new, 0.7, backend=name)
    if name != "reference":  # torch.lerp picks its own layout for mixed inputs
        assert_layout(y, first_channels_last, "output")
    torch.testing.assert_close(y.cpu(), torch.lerp(old.cpu(), new.cpu(), 0.7), **TOL[torch.float32])


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("backend", backends())
def test_double_backward_keeps_the_layout(backend, channels_last):
    # The penalty's second derivative: d/dg <d_old(g), u> + <d_new(g), v> is blend(u, v), in u's layout.
    name, device = backend
    shape = (2, 5, 3, 7)
    old, new = (randn(shape, torch.float64, channels_last, device, s).requires_grad_() for s in (1, 2))
    y = bl.blend(old, new, 0.3, backend=name)
    g = randn(shape, torch.float64, channels_last, device, 3).requires_grad_()
    d_old, d_new = torch.autograd.grad(y, (old, new), g, create_graph=True)
    u, v = (randn(shape, torch.float64, channels_last, device, s) for s in (4, 5))
    (gg,) = torch.autograd.grad((d_old * u).sum() + (d_new * v).sum(), g)
    assert_in_layout_of(gg, channels_last, "d/dg of the backward")
    torch.testing.assert_close(gg.cpu(), torch.lerp(u.cpu(), v.cpu(), 0.3), **TOL[torch.float64])


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends())
def test_gradcheck_and_gradgradcheck_on_channels_last(backend):
    name, device = backend
    shape = (1, 3, 2, 3)
    old, new = (randn(shape, torch.float64, True, device, s).requires_grad_() for s in (1, 2))
    alpha = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda o, n, a: bl.blend(o, n, a, backend=name)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (old, new, alpha))
    assert torch.autograd.gradgradcheck(fn, (old, new, alpha))


def _opcheck_samples():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old, new = (randn((2, 3, 3, 5), torch.float32, True, device, s).requires_grad_() for s in (1, 2))
    g = randn((2, 3, 3, 5), torch.float32, True, device, 3).requires_grad_()
    a = torch.tensor(0.3, device=device)
    a_grad = torch.tensor(0.3, device=device, requires_grad=True)
    ops = []
    if triton_backend.available():
        ops.append(("triton", bl.TRITON))
    if _native.available():
        ops.append(("native", bl.NATIVE))
    return [pytest.param(k.blend, (old, new, a), id=f"{n}-fwd") for n, k in ops] + \
        [pytest.param(k.blend, (old, new, a_grad), id=f"{n}-fwd-alpha-grad") for n, k in ops] + \
        [pytest.param(k.blend_backward, (g, a_grad), id=f"{n}-bwd") for n, k in ops]


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
    old, new = (randn((2, 6, 4, 5), torch.float32, True, device, s).requires_grad_() for s in (1, 2))
    y = bl.blend(old, new, 0.3, backend=name)
    assert activation_copies(lambda: bl.blend(old, new, 0.3, backend=name), [old]) == []
    g = randn(y.shape, torch.float32, True, device, 3)
    assert activation_copies(lambda: torch.autograd.grad(y, (old, new), g), [old]) == []


@pytest.mark.parametrize("name", _COPY_BACKENDS)
def test_the_copy_detector_sees_the_copy_of_a_second_input_in_another_layout(name):
    # The check above can fail: bringing `new` to `old`'s layout is a copy, and it is seen.
    device = "cpu" if name == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    old = randn((2, 6, 4, 5), torch.float32, True, device, 1)
    new = randn((2, 6, 4, 5), torch.float32, False, device, 2)
    assert activation_copies(lambda: bl.blend(old, new, 0.3, backend=name), [old]) != []


# ----- the CUDA kernels through the emulator ------------------------------------------------------

@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,cap", [((1, 3, 5, 7), None), ((2, 5, 4, 6), 1)], ids=["n1-c3-5x7", "n2-c5-4x6-grid1"])
def test_cuda_kernels_on_nhwc_through_the_emulator(emu, request, shape, cap, dtype):
    # blend's kernels are a flat loop: an NHWC tensor is the same loop over its memory order.
    configure(emu, request.node.name, cap)
    n, c, h, w = shape
    code = emu.dtype_code(dtype)
    old, new, grad = (randn(shape, dtype, seed=s) for s in (9, 10, 11))
    alpha = 0.65
    a = emu.scalar(alpha, dtype)
    numel = old.numel()
    out = emu_output(emu, shape, dtype, "out", True)
    emu.call("blend_forward", code, emu_buffer(emu, old, "old", True), emu_buffer(emu, new, "new", True), a, out, numel)
    emu_check(emu_read(out, True), torch.lerp(old.double(), new.double(), alpha), dtype, "blend forward (NHWC)")
    d_old, d_new = emu_output(emu, shape, dtype, "d_old", True), emu_output(emu, shape, dtype, "d_new", True)
    emu.call("blend_backward", code, emu_buffer(emu, grad, "grad", True), a, d_old, d_new, numel)
    emu_check(emu_read(d_old, True), grad.double() * (1 - alpha), dtype, "blend backward (old, NHWC)")
    emu_check(emu_read(d_new, True), grad.double() * alpha, dtype, "blend backward (new, NHWC)")
