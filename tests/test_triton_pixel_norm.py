"""pixel_norm's Triton backend against the eager reference (under the interpreter without a GPU)."""

import importlib

import pytest
import torch

pn = importlib.import_module("progan_fast.ops.pixel_norm")
pytestmark = pytest.mark.skipif("triton" not in pn.IMPLEMENTATIONS, reason="Triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}
SHAPES = [(1, 3, 4, 4), (5, 67, 3, 9), (2, 512, 1, 1), (3, 16, 8, 8), (2, 33, 64, 64), (1, 100, 5, 7)]


@pytest.mark.parametrize("dtype", [d if d == torch.float32 else pytest.param(d, marks=pytest.mark.slow)  # fp32 fast
                                   for d in TOL], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_the_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yt, yr = pn.pixel_norm(xt, backend="triton"), pn.reference(xr)
    tol = TOL[dtype]
    assert yt.dtype == dtype and yt.shape == x.shape
    torch.testing.assert_close(yt, yr.to(dtype), rtol=tol, atol=tol)
    yt.backward(g)
    yr.backward(g.double())
    torch.testing.assert_close(xt.grad, xr.grad.to(dtype), rtol=4 * tol, atol=4 * tol)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(pn.triton_impl, (x,))
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(pn.triton_impl, (x,))


def test_opcheck():
    x = torch.randn(2, 5, 3, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(pn._pixel_norm_op, (x, 1e-8))
    g = torch.randn(2, 5, 3, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(pn._pixel_norm_backward_op, (g, x, 1e-8))


def test_non_contiguous_input():
    x = torch.randn(4, 8, 6, 6, device=DEVICE).transpose(2, 3)
    torch.testing.assert_close(pn.pixel_norm(x, backend="triton"), pn.reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(128, 512, 4, 4), (32, 512, 32, 32), (16, 64, 128, 128)])
def test_stage_shapes_on_gpu(shape):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = pn.pixel_norm(x, backend="triton")
    ref = pn.reference(x.detach().float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(x)
    y.backward(g)
    xr = x.detach().float().requires_grad_()
    pn.reference(xr).backward(g.float())
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=5e-2, atol=5e-2)
