"""downsample2x on channels-last (NHWC) activations, every backend available here: the reference,
Triton (under the interpreter without a GPU), the C++ twins (``cpu``) and the CUDA kernels through
the emulator. Against the float64 NCHW reference: forward, backward and double backward (the op is
inside the gradient penalty) in both layouts, outputs and input gradients in the input's layout,
gradcheck and gradgradcheck in float64 on channels-last inputs, opcheck on channels-last inputs, and
no hidden copy of an activation."""

import importlib

import pytest
import torch
from layout_checks import (EMU_DTYPES, TOL, activation_copies, ambiguous, assert_in_layout_of, assert_layout,
                                 backends, configure, emu_buffer, emu_check, emu_output, emu_read, layout_id,
                                 randn)

from progan_fast.ops import _native
from progan_fast.ops import triton as triton_backend

ds = importlib.import_module("progan_fast.ops.downsample2x")

# batch 1, channels not a power of two, odd heights and widths (a row/column the pool ignores), and
# a 1x1 output (dense in both layouts, so it and its gradient count as NCHW).
SHAPES = [(1, 3, 4, 6), (2, 5, 7, 9), (1, 6, 5, 10), (3, 12, 2, 3)]
LAYOUTS = [pytest.param(cl, id=layout_id(cl)) for cl in (False, True)]
# NHWC only: the NCHW rows are tests/test_ops.py's (reference), tests/test_triton_fade_in.py's
# (triton) and tests/test_native.py's (cpu); bf16 (other loads and stores) in the slow tier.
NHWC = [pytest.param(True, id="nhwc")]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]


def _mean_of_2x2(x):
    """The mean of each 2x2 block, a trailing odd row or column dropped."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return (x[:, :, 0:h:2, 0:w:2] + x[:, :, 1:h:2, 0:w:2] + x[:, :, 0:h:2, 1:w:2] + x[:, :, 1:h:2, 1:w:2]) / 4


def _dx_channels_last(backend, x_shape, channels_last):
    """dx of the custom ops takes the incoming gradient's layout (their backward op sees only the
    gradient), and a 1x1 gradient counts as NCHW; avg_pool2d's follows x."""
    n, c, h, w = x_shape
    decides = x_shape if backend == "reference" else (n, c, h // 2, w // 2)
    return channels_last and not ambiguous(decides) and not ambiguous(x_shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", NHWC)
@pytest.mark.parametrize("backend", backends())
def test_forward_and_backward_keep_the_layout(backend, channels_last, shape, dtype):
    name, device = backend
    x = randn(shape, dtype, channels_last, device, 1).requires_grad_()
    y = ds.downsample2x(x, backend=name)
    assert_in_layout_of(y, channels_last, "output")
    x64 = x.detach().double().cpu().contiguous().requires_grad_()
    want = _mean_of_2x2(x64)  # not ds.reference (avg_pool2d): an independent formula
    torch.testing.assert_close(y.double().cpu(), want.detach(), **TOL[dtype])
    g = randn(y.shape, dtype, channels_last, device, 2)
    (dx,) = torch.autograd.grad(y, x, g)
    assert_layout(dx, _dx_channels_last(name, shape, channels_last), "dx")
    (dx64,) = torch.autograd.grad(want, x64, g.double().cpu())
    torch.testing.assert_close(dx.double().cpu(), dx64, **TOL[dtype])


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("backend", backends())
def test_double_backward_keeps_the_layout(backend, channels_last):
    # The penalty's second derivative: d/dg <dx(g), v> is downsample2x(v), in v's layout.
    name, device = backend
    shape = (2, 5, 7, 6)
    x = randn(shape, torch.float64, channels_last, device, 1).requires_grad_()
    y = ds.downsample2x(x, backend=name)
    g = randn(y.shape, torch.float64, channels_last, device, 2).requires_grad_()
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
    v = randn(shape, torch.float64, channels_last, device, 3)
    (gg,) = torch.autograd.grad((dx * v).sum(), g)
    assert_in_layout_of(gg, channels_last, "d/dg of the backward")
    torch.testing.assert_close(gg.cpu(), ds.reference(v.cpu().contiguous()), **TOL[torch.float64])


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 3, 3, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", backends())
def test_gradcheck_and_gradgradcheck_on_channels_last(backend, shape):
    name, device = backend
    x = randn(shape, torch.float64, True, device, 1).requires_grad_()
    fn = lambda t: ds.downsample2x(t, backend=name)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def _opcheck_samples():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn((2, 3, 4, 6), torch.float32, True, device, 1).requires_grad_()
    odd = randn((1, 3, 5, 3), torch.float32, True, device, 2).requires_grad_()
    g = randn((2, 3, 2, 3), torch.float32, True, device, 3).requires_grad_()
    ops = []
    if triton_backend.available():
        ops.append(("triton", ds.TRITON))
    if _native.available():
        ops.append(("native", ds.NATIVE))
    return [pytest.param(k.downsample2x, (x,), id=f"{n}-fwd") for n, k in ops] + \
        [pytest.param(k.downsample2x, (odd,), id=f"{n}-fwd-odd") for n, k in ops] + \
        [pytest.param(k.downsample2x_backward, (g, 5, 6), id=f"{n}-bwd") for n, k in ops]


@pytest.mark.slow
@pytest.mark.parametrize("op,args", _opcheck_samples())
def test_opcheck_on_channels_last(op, args):
    torch.library.opcheck(op, args)  # fake and real outputs agree, strides included


# cpu: the C++ twins (a copy in the glue would be an aten::contiguous/clone event). triton: under the
# interpreter the check is clean too (layout_checks.activation_copies says why).
@pytest.mark.parametrize("name", [b for b in ("cpu", "triton")
                                  if b in {p.values[0][0] for p in backends()}])
def test_no_hidden_copy_of_a_channels_last_activation(name):
    device = "cpu" if name == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    x = randn((2, 6, 8, 10), torch.float32, True, device, 1).requires_grad_()
    y = ds.downsample2x(x, backend=name)
    assert activation_copies(lambda: ds.downsample2x(x, backend=name), [x, y]) == []
    g = randn(y.shape, torch.float32, True, device, 2)
    assert activation_copies(lambda: torch.autograd.grad(y, x, g), [x, y]) == []


@pytest.mark.parametrize("backend", [p for p in backends() if p.values[0][0] != "reference"])
def test_other_strides_are_copied_to_nchw(backend):
    name, device = backend
    base = randn((2, 4, 6, 12), torch.float32, True, device, 1)
    x = base[:, :, :, ::2]  # neither NCHW nor NHWC dense
    y = ds.downsample2x(x, backend=name)
    assert_layout(y, False, "output of a strided input")
    torch.testing.assert_close(y.cpu(), ds.reference(x.cpu().contiguous()), **TOL[torch.float32])


# ----- the CUDA kernels, NHWC instantiation, through the emulator -------------------------------

@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,cap", [((1, 3, 4, 6), None), ((2, 5, 7, 9), None), ((2, 13, 9, 11), 1)],
                         ids=["n1-c3-4x6", "n2-c5-7x9", "n2-c13-9x11-grid1"])
def test_cuda_kernels_on_nhwc_through_the_emulator(emu, request, shape, cap, dtype):
    configure(emu, request.node.name, cap)
    n, c, h, w = shape
    code = emu.dtype_code(dtype)
    x = randn(shape, dtype, seed=12)
    y = emu_output(emu, (n, c, h // 2, w // 2), dtype, "y", True)
    emu.call("downsample2x_forward", code, emu_buffer(emu, x, "x", True), y, n, c, h, w, True)
    x64 = x.double().requires_grad_()
    ref = ds.reference(x64)
    emu_check(emu_read(y, True), ref, dtype, "downsample2x forward (NHWC)")
    grad = randn(ref.shape, dtype, seed=13)
    dx = emu_output(emu, shape, dtype, "dx", True)
    emu.call("downsample2x_backward", code, emu_buffer(emu, grad, "grad", True), dx, n, c, h, w, True)
    (want,) = torch.autograd.grad(ref, x64, grad.double())
    emu_check(emu_read(dx, True), want, dtype, "downsample2x backward (NHWC)")
    launched = emu.launched_kernels()
    t = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
    for kernel in ("downsample_fwd_kernel", "downsample_bwd_kernel"):
        assert f"{kernel}<{t[dtype]}, 1>" in launched, sorted(launched)
