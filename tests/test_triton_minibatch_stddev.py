"""The Triton backend of minibatch_stddev against the eager reference (interpreter on CPU, real on GPU)."""

import importlib

import pytest
import torch

from progan_fast import ops
from progan_fast.ops import triton as triton_backend

mbstd = importlib.import_module("progan_fast.ops.minibatch_stddev")
mbstd_kernels = importlib.import_module("progan_fast.ops.triton.minibatch_stddev")

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason=triton_backend.why_unavailable())

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (shape, group_size): batch 1; batch 6 with group 4 (-> G=3); prime batch 7 (-> G=1); 8 and 12 with
# G=4; channels that are not powers of two; F = C*H*W spanning several partial-sum slots and not a
# multiple of them (300*2*2 = 1200); resolutions 2..16.
SHAPES = [
    ((1, 4, 4, 4), 4),
    ((6, 5, 4, 4), 4),
    ((7, 3, 4, 4), 4),
    ((8, 33, 4, 4), 4),
    ((12, 5, 4, 4), 4),
    ((4, 300, 2, 2), 2),
    ((4, 3, 8, 8), 4),
    ((2, 2, 16, 16), 4),
    ((6, 7, 3, 5), 2),
]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}


def expected(x, grad, group_size):
    """Forward and input-gradient of the reference, computed in float64 then cast to x's dtype."""
    x64 = x.detach().double().requires_grad_()
    y = mbstd.reference(x64, group_size)
    (dx,) = torch.autograd.grad(y, x64, grad.double())
    return y.detach().to(x.dtype), dx.to(x.dtype)


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("dtype", [torch.float32] + [pytest.param(d, marks=pytest.mark.slow)  # fp32 fast, others slow
                                   for d in (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("shape,group_size", SHAPES, ids=_id)
def test_forward_and_backward_match_reference(shape, group_size, dtype):
    gen = torch.Generator().manual_seed(hash((shape, group_size)) % 2**31)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(DEVICE, dtype).requires_grad_()
    n, c, h, w = shape
    grad = torch.randn((n, c + 1, h, w), generator=gen).to(DEVICE, dtype)
    y = ops.minibatch_stddev(x, group_size, backend="triton")
    (dx,) = torch.autograd.grad(y, x, grad)
    y_ref, dx_ref = expected(x, grad, group_size)
    assert y.dtype == dtype and y.shape == (n, c + 1, h, w) and dx.dtype == dtype
    assert torch.equal(y[:, :c], x.detach())                      # the copy is exact
    stat = y[:, c]
    assert (stat == stat[:, :1, :1]).all()                         # one value per sample, broadcast
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])


def test_group_of_one_passes_gradient_straight_through():
    # G = 1: every feature equals its group mean, so dx is exactly grad[:, :C] and the stat sqrt(eps).
    x = torch.randn(5, 3, 4, 4, device=DEVICE, requires_grad=True)
    y = mbstd.triton_impl(x, 4)
    torch.testing.assert_close(y[:, 3], torch.full_like(y[:, 3], 1e-4), rtol=1e-6, atol=0)
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(dx, grad[:, :3])


def test_groups_are_index_mod_groups():
    # N=4, G=2, M=2: group {0, 2} identical (stat sqrt(eps)), group {1, 3} far apart.
    x = torch.zeros(4, 2, 4, 4, device=DEVICE)
    x[1], x[3] = -3.0, 3.0
    s = mbstd.triton_impl(x, 2)[:, 2, 0, 0]
    torch.testing.assert_close(s, torch.tensor([1e-4, 3.0, 1e-4, 3.0], device=DEVICE), rtol=1e-5, atol=1e-7)


def test_deterministic_and_non_contiguous_input():
    x = torch.randn(8, 6, 4, 4, device=DEVICE).permute(0, 1, 3, 2)   # not contiguous
    a, b = mbstd.triton_impl(x, 4), mbstd.triton_impl(x, 4)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, mbstd.reference(x, 4), rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(a)
    d1 = mbstd._mbstd_backward_op(grad, x, 4, 1e-8)
    d2 = mbstd._mbstd_backward_op(grad, x, 4, 1e-8)
    assert torch.equal(d1, d2)


def _d(*shape):
    return torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)


# (shape, group_size, fast_mode): tiny float64 inputs; the interpreter pays ~25 ms per launch, so
# the full (element-by-element) checks run on the smallest cases and fast mode (random projections
# of the Jacobian) covers the rest.
GRAD_CASES = [((3, 2, 1, 2), 4, False), ((4, 2, 1, 2), 2, False), ((6, 2, 1, 2), 4, True)]


@pytest.mark.parametrize("shape,group_size,fast", GRAD_CASES)
def test_gradcheck(shape, group_size, fast):
    fn = lambda t: mbstd.triton_impl(t, group_size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (_d(*shape),), fast_mode=fast)


GRADGRAD_CASES = [((3, 2, 1, 2), 4, False), ((4, 2, 1, 2), 2, True), ((6, 2, 1, 2), 4, True)]


@pytest.mark.parametrize("shape,group_size,fast", GRADGRAD_CASES)
def test_gradgradcheck(shape, group_size, fast):
    fn = lambda t: mbstd.triton_impl(t, group_size)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (_d(*shape),), fast_mode=fast)


def test_gradient_penalty_double_backward_matches_reference():
    # The WGAN-GP pattern: the gradient's norm, differentiated again w.r.t. x (and upstream weights).
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def penalty(impl):
        xi = x.clone().requires_grad_()
        y = impl(xi * 1.5, 4)
        score = (y.square().sum(dim=1) * w).sum()
        (g,) = torch.autograd.grad(score, xi, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (xi, w))

    for got, want in zip(penalty(mbstd.triton_impl), penalty(mbstd.reference)):
        torch.testing.assert_close(got, want)


def test_opcheck_forward_and_backward_ops():
    x = torch.randn(4, 3, 2, 2, device=DEVICE, requires_grad=True)
    torch.library.opcheck(mbstd._mbstd_op, (x, 2, 1e-8))
    grad = torch.randn(4, 4, 2, 2, device=DEVICE, requires_grad=True)
    torch.library.opcheck(mbstd._mbstd_backward_op, (grad, x, 2, 1e-8))


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        mbstd.triton_impl(torch.randn(4, 3, 2, device=DEVICE))


def test_aot_specs_cover_every_kernel_in_fp32_and_bf16():
    names = {spec.name for spec in mbstd_kernels.AOT_SPECS}
    assert names == {f"mbstd_{k}:{d}" for k in ("fwd", "stat", "gsum", "bwd") for d in ("fp32", "bf16")}
    for spec in mbstd_kernels.AOT_SPECS:   # scratch buffers stay fp32 in the bf16 specs
        for arg in ("part_ptr", "gs_ptr"):
            assert spec.signature.get(arg, "*fp32") == "*fp32"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_discriminator_shape(dtype):
    # Where D uses it: batch 128, 512 channels at 4x4 (G = 4, 32 groups); plus a larger resolution.
    for shape in [(128, 512, 4, 4), (64, 256, 16, 16)]:
        x = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
        grad = torch.randn(shape[0], shape[1] + 1, *shape[2:], device="cuda").to(dtype)
        y = mbstd.triton_impl(x, 4)
        (dx,) = torch.autograd.grad(y, x, grad)
        y_ref, dx_ref = expected(x, grad, 4)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        torch.testing.assert_close(dx, dx_ref, **TOL[dtype])


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    x = torch.randn(128, 512, 4, 4, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(128, 513, 4, 4, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):   # autotune outside the capture
        mbstd.triton_impl(x, 4)
        mbstd._mbstd_backward_op(grad, x, 4, 1e-8)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mbstd.triton_impl(x, 4)
        dx = mbstd._mbstd_backward_op(grad, x, 4, 1e-8)
    x.copy_(torch.randn_like(x))
    graph.replay()
    y_ref, dx_ref = expected(x, grad, 4)
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.bfloat16])
