"""The Triton backend of the fade-in family (fade_in, blend, downsample2x, fade_reals) against the
eager references: values and gradients in every dtype, exact ends of the fade, float and tensor
alpha, first and second derivatives, torch.library.opcheck, and GPU-sized shapes on CUDA.

Without a GPU every kernel runs under Triton's interpreter (tests/conftest.py sets it)."""

import functools
import importlib

import pytest
import torch

from progan_fast.ops import triton as triton_backend
from progan_fast.ops.common import upsample2x_reference
from progan_fast.ops.triton import elementwise

fi = importlib.import_module("progan_fast.ops.fade_in")
bl = importlib.import_module("progan_fast.ops.blend")
ds = importlib.import_module("progan_fast.ops.downsample2x")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors

pytestmark = pytest.mark.skipif(not triton_backend.available(),
                                reason=triton_backend.why_unavailable() if triton_backend.triton else "no triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 in the fast tier; the other dtypes (each its own kernel instantiation) in the slow one.
SWEEP_DTYPES = [torch.float32] + [pytest.param(d, marks=pytest.mark.slow) for d in DTYPES[1:]]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _randn(shape, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# Each op as (public function, make inputs from (shape, dtype, device)); the first tensor's shape is `shape`.
def _fade_in_inputs(shape, dtype, device):
    n, c, h, w = shape
    return [_randn(shape, dtype, device, 1), _randn((n, c, 2 * h, 2 * w), dtype, device, 2)]


OPS = {
    "fade_in": (lambda t, a, backend: fi.fade_in(t[0], t[1], a, backend=backend), _fade_in_inputs),
    "blend": (lambda t, a, backend: bl.blend(t[0], t[1], a, backend=backend),
              lambda s, d, dev: [_randn(s, d, dev, 1), _randn(s, d, dev, 2)]),
    "downsample2x": (lambda t, a, backend: ds.downsample2x(t[0], backend=backend),
                     lambda s, d, dev: [_randn(s, d, dev, 1)]),
    "fade_reals": (lambda t, a, backend: fi.fade_reals(t[0], a, backend=backend),
                   lambda s, d, dev: [_randn(s, d, dev, 1)]),
}
# batch 1, RGB, channels not a power of two, odd and non-square sizes (even where the op needs it)
SHAPES = {
    "fade_in": [(1, 3, 2, 2), (2, 5, 3, 7), (1, 33, 4, 4), (1, 3, 32, 32)],
    "blend": [(1, 3, 4, 4), (2, 5, 3, 7), (1, 33, 8, 8), (1, 3, 64, 64)],
    "downsample2x": [(1, 3, 4, 4), (2, 5, 6, 10), (1, 33, 8, 8), (2, 3, 5, 7), (1, 3, 64, 64)],
    "fade_reals": [(1, 3, 4, 4), (2, 5, 6, 10), (1, 33, 8, 8), (1, 3, 64, 64)],
}
CASES = [(op, shape) for op in OPS for shape in SHAPES[op]]


def _run(op, inputs, alpha, backend, grad_out=None):
    """Output and input gradients (for a fixed random upstream gradient)."""
    fn, _ = OPS[op]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(leaves, alpha, backend)
    if grad_out is None:
        grad_out = _randn(y.shape, y.dtype, y.device, 3)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [t.grad for t in leaves], grad_out


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=str)
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in CASES])
def test_matches_the_reference_forward_and_backward(op, shape, dtype):
    inputs = OPS[op][1](shape, dtype, DEVICE)
    y, grads, g = _run(op, inputs, 0.3, "triton")
    y_ref, grads_ref, _ = _run(op, [t.double() for t in inputs], 0.3, "reference", g.double())
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_ref.to(dtype), **TOL[dtype])
    for got, want in zip(grads, grads_ref):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("op", list(OPS))
def test_several_programs_and_a_ragged_tail(op, monkeypatch):
    # Under the interpreter a launch is normally one big program; force 64-wide blocks.
    monkeypatch.setattr(elementwise, "_INTERPRETER_MAX_BLOCK", 64)
    inputs = OPS[op][1]((3, 5, 6, 10), torch.float64, DEVICE)
    y, grads, g = _run(op, inputs, 0.7, "triton")
    y_ref, grads_ref, _ = _run(op, inputs, 0.7, "reference", g)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=str)
def test_fade_ends_are_exact(dtype):
    low, high = _fade_in_inputs((2, 5, 3, 4), dtype, DEVICE)
    up = low.repeat_interleave(2, 2).repeat_interleave(2, 3)
    for alpha in (0.0, torch.tensor(0.0)):
        assert torch.equal(fi.fade_in(low, high, alpha, backend="triton"), up)
        assert torch.equal(bl.blend(up, high, alpha, backend="triton"), up)
    for alpha in (1.0, torch.tensor(1.0)):
        assert torch.equal(fi.fade_in(low, high, alpha, backend="triton"), high)
        assert torch.equal(bl.blend(up, high, alpha, backend="triton"), high)
        assert torch.equal(fi.fade_reals(high, alpha, backend="triton"), high)
    # alpha 0: every 2x2 block of the faded reals is its block's mean
    y = fi.fade_reals(high, 0.0, backend="triton")
    assert torch.equal(y, y[..., ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))
    torch.testing.assert_close(y, fi.fade_reals(high.double(), 0.0, backend="reference").to(dtype), **TOL[dtype])


if triton_backend.triton is not None:

    @triton_backend.triton.jit
    def _fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr):
        tl = triton_backend.tl
        tl.store(out_ptr, tl.fma(tl.load(x_ptr), tl.load(y_ptr), tl.load(z_ptr)))


@functools.cache
def _tl_fma_rounds_once() -> bool:
    """Whether float32 ``tl.fma`` rounds once here, as a GPU's ``fma.rn.f32`` does. Probe:
    fma(1 + 2**-12, 1 + 2**-12, -1) is 2**-11 + 2**-24 exactly; a multiply then an add rounds the
    product to 1 + 2**-11 first and gives 2**-11. Triton 3.6's interpreter evaluates ``tl.fma`` as
    ``x * y + z`` in float32 numpy (two roundings); 3.9's interpreter rounds once, as GPUs do."""
    x = torch.tensor([1 + 2**-12], device=DEVICE)
    out = torch.empty(1, device=DEVICE)
    _fma_kernel[(1,)](x, x, torch.tensor([-1.0], device=DEVICE), out)
    fused, unfused = 2**-11 + 2**-24, 2**-11
    assert out.item() in (fused, unfused), f"tl.fma is neither fused nor a multiply then an add: {out.item()!r}"
    return out.item() == fused


LERP_WEIGHTS = (0.1, 0.49, 0.5, 0.9, -0.3, 1.2)  # both branches (|alpha| < 0.5, >= 0.5), out-of-range weights


@pytest.mark.cuda
def test_tl_fma_rounds_once_on_a_gpu():
    assert _tl_fma_rounds_once()


def test_lerp_formula_matches_torch_lerp_bit_for_bit_in_float32():
    if not _tl_fma_rounds_once():  # the next test checks the formula there
        pytest.skip(f"tl.fma rounds twice under triton {triton_backend.triton.__version__}'s interpreter "
                    "(a GPU rounds once)")
    a, b = _randn((1, 3, 8, 8), torch.float32, DEVICE, 1), _randn((1, 3, 8, 8), torch.float32, DEVICE, 2)
    for alpha in LERP_WEIGHTS:
        assert torch.equal(bl.blend(a, b, alpha, backend="triton"), torch.lerp(a, b, alpha)), alpha


def test_lerp_formula_where_tl_fma_rounds_twice():
    """Where ``tl.fma`` is a multiply then an add (triton 3.6's interpreter), the kernel is still
    torch.lerp's formula: bit for bit the same formula with each fused multiply-add computed as a
    float32 multiply then an add, and torch.lerp within float32 rounding."""
    if _tl_fma_rounds_once():
        pytest.skip("tl.fma rounds once here: the bit-for-bit torch.lerp test covers the formula")
    a, b = _randn((1, 3, 8, 8), torch.float32, DEVICE, 1), _randn((1, 3, 8, 8), torch.float32, DEVICE, 2)
    d = b - a
    for alpha in LERP_WEIGHTS:
        w = torch.tensor(alpha, dtype=torch.float32)
        unfused = torch.where(w.abs() < 0.5, d * w + a, -d * (1 - w) + b)
        got = bl.blend(a, b, alpha, backend="triton")
        assert torch.equal(got, unfused), alpha
        torch.testing.assert_close(got, torch.lerp(a, b, alpha), **TOL[torch.float32])


@pytest.mark.parametrize("op", ["fade_in", "blend", "fade_reals"])
def test_float_and_tensor_alpha_agree(op):
    fn, make = OPS[op]
    inputs = make((2, 3, 4, 6), torch.float32, DEVICE)
    want = fn(inputs, 0.375, "triton")
    for alpha in (torch.tensor(0.375), torch.tensor(0.375, dtype=torch.float64),
                  torch.tensor(0.375, dtype=torch.float64, requires_grad=True)):
        assert torch.equal(fn(inputs, alpha, "triton"), want)
    assert not torch.equal(fn(inputs, 0.25, "triton"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["fade_in", "blend", "fade_reals"])
def test_alpha_gradient_matches_the_reference(op, dtype):
    fn, make = OPS[op]
    inputs = make((2, 3, 4, 6), dtype, DEVICE)
    grads = []
    for backend, ins in (("triton", inputs), ("reference", [t.double() for t in inputs])):
        alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        y = fn(ins, alpha, backend)
        (y.double() * _randn(y.shape, torch.float64, DEVICE, 4)).sum().backward()
        grads.append(alpha.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 10)


def test_no_alpha_gradient_unless_asked():
    low, high = [t.requires_grad_() for t in _fade_in_inputs((1, 2, 2, 2), torch.float32, DEVICE)]
    alpha = torch.tensor(0.5)
    fi.fade_in(low, high, alpha, backend="triton").sum().backward()
    assert alpha.grad is None and low.grad is not None and high.grad is not None
    torch.testing.assert_close(low.grad, torch.full_like(low, 2.0))
    torch.testing.assert_close(high.grad, torch.full_like(high, 0.5))


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="twice"):
        fi.fade_in(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 6), 0.5, backend="triton")
    with pytest.raises(ValueError, match="twice"):
        fi.fade_in(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 8, 8), 0.5, backend="triton")
    with pytest.raises(TypeError, match="bfloat16"):
        bl.blend(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.bfloat16), 0.5, backend="triton")
    with pytest.raises(ValueError, match="even"):
        fi.fade_reals(torch.zeros(1, 3, 4, 5), 0.5, backend="triton")
    with pytest.raises(ValueError, match="0-dim"):
        bl.blend(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0.5]), backend="triton")


# ----- autograd in float64 ---------------------------------------------------------------------

def _d(*shape, seed=0):
    return _randn(shape, torch.float64, DEVICE, seed).requires_grad_()


def _alpha():
    return torch.tensor(0.3, dtype=torch.float64, requires_grad=True)


GRAD_CASES = {
    "fade_in": (lambda lo, hi, a: fi.fade_in(lo, hi, a, backend="triton"), lambda: (_d(1, 2, 1, 2), _d(1, 2, 2, 4, seed=1), _alpha())),
    "blend": (lambda o, n, a: bl.blend(o, n, a, backend="triton"), lambda: (_d(1, 2, 2, 3), _d(1, 2, 2, 3, seed=1), _alpha())),
    "downsample2x": (lambda x: ds.downsample2x(x, backend="triton"), lambda: (_d(1, 2, 4, 4),)),
    "downsample2x_odd": (lambda x: ds.downsample2x(x, backend="triton"), lambda: (_d(1, 2, 3, 5),)),
    "fade_reals": (lambda x, a: fi.fade_reals(x, a, backend="triton"), lambda: (_d(1, 2, 2, 4), _alpha())),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name):
    fn, make = GRAD_CASES[name]
    assert torch.autograd.gradcheck(fn, make())


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradgradcheck(name):
    fn, make = GRAD_CASES[name]
    # blend and downsample2x sit inside the gradient penalty: full check; the others (outside it) fast.
    fast = name in ("fade_in", "fade_reals")
    assert torch.autograd.gradgradcheck(fn, make(), fast_mode=fast)


def test_double_backward_through_a_penalty_like_graph():
    # d/dx |grad_x sum(w * blend(down(x), h, a))|^2 against the reference
    def penalty(backend, x, h):
        x = x.detach().clone().requires_grad_()
        y = bl.blend(ds.downsample2x(x, backend=backend), h, 0.4, backend=backend)
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        return gg
    x, h = _randn((2, 3, 6, 4), torch.float64, DEVICE, 1), _randn((2, 3, 3, 2), torch.float64, DEVICE, 2)
    torch.testing.assert_close(penalty("triton", x, h), penalty("reference", x, h))


# ----- opcheck: every registered custom op -------------------------------------------------------

def _op_samples():
    a = torch.tensor(0.3, device=DEVICE)
    lo, hi = torch.randn(2, 3, 2, 3, device=DEVICE, requires_grad=True), torch.randn(2, 3, 4, 6, device=DEVICE, requires_grad=True)
    return [
        (fi._fade_in_op, (lo, hi, a)),
        (fi._fade_in_op, (lo, hi, torch.tensor(0.3, device=DEVICE, requires_grad=True))),
        (fi._fade_in_backward_op, (torch.randn(2, 3, 4, 6, device=DEVICE, requires_grad=True), a)),
        (bl._blend_op, (torch.randn(2, 3, 3, 5, device=DEVICE, requires_grad=True), torch.randn(2, 3, 3, 5, device=DEVICE, requires_grad=True), a)),
        (bl._blend_backward_op, (torch.randn(2, 3, 3, 5, device=DEVICE, requires_grad=True), torch.tensor(0.3, device=DEVICE, requires_grad=True))),
        (ds._downsample2x_op, (torch.randn(2, 3, 4, 6, device=DEVICE, requires_grad=True),)),
        (ds._downsample2x_op, (torch.randn(1, 3, 5, 3, device=DEVICE, requires_grad=True),)),
        (ds._downsample2x_backward_op, (torch.randn(2, 3, 2, 3, device=DEVICE, requires_grad=True), 5, 6)),
        (fi._fade_reals_op, (torch.randn(2, 3, 4, 6, device=DEVICE, requires_grad=True), torch.tensor(0.3, device=DEVICE, requires_grad=True))),
    ]


@pytest.mark.parametrize("index", range(len(_op_samples())))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


# ----- CUDA: GPU-sized shapes, autotuned kernels --------------------------------------------------

# (op, first input's shape) at the sizes of a 256x256 stage with batch 16
CUDA_CASES = [("fade_in", (16, 3, 128, 128)), ("blend", (16, 128, 64, 64)), ("downsample2x", (16, 64, 128, 128)),
              ("downsample2x", (16, 3, 256, 256)), ("fade_reals", (16, 3, 256, 256)), ("blend", (3, 5, 7, 9))]


@pytest.mark.cuda
@pytest.mark.parametrize("op,shape", CUDA_CASES)
def test_cuda_bf16_matches_the_reference(op, shape):
    inputs = OPS[op][1](shape, torch.bfloat16, "cuda")
    alpha = torch.tensor(0.3, device="cuda")
    y, grads, g = _run(op, inputs, alpha, "triton")
    y_ref, grads_ref, _ = _run(op, [t.double() for t in inputs], 0.3, "reference", g.double())
    torch.testing.assert_close(y, y_ref.to(torch.bfloat16), **TOL[torch.bfloat16])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want.to(torch.bfloat16), **TOL[torch.bfloat16])


@pytest.mark.cuda
def test_cuda_graph_replay_reads_alpha_in_place():
    low, high = _fade_in_inputs((4, 3, 32, 32), torch.float32, "cuda")
    alpha = torch.tensor(0.0, device="cuda")
    fi.fade_in(low, high, alpha, backend="triton")  # autotune outside capture
    fi.fade_reals(high, alpha, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fi.fade_in(low, high, alpha, backend="triton")
        reals = fi.fade_reals(high, alpha, backend="triton")
    for value in (0.0, 0.25, 1.0):
        alpha.fill_(value)
        graph.replay()
        want = torch.lerp(upsample2x_reference(low), high, value)
        if value in (0.0, 1.0):
            assert torch.equal(out, want)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(reals, fi.fade_reals(high, value, backend="reference"))
