"""pixel_norm in both activation layouts (NCHW and channels-last NHWC), on every backend here.

Each backend (``reference``; ``triton`` under the interpreter; ``cpu``, the C++ twins; the CUDA
kernels through the emulator, in tests/test_cuda_emulated.py's runner) runs forward and backward
on random inputs in both layouts, with odd shapes, against the float64 NCHW reference, and must
return its output and input gradient in the input's memory format. Also: opcheck of the custom
ops on channels-last inputs (fake and real strides must agree), gradcheck in float64 on
channels-last inputs, and "no hidden copy": no clone / copy of a tensor of the activation's shape
inside the op, forward or backward.
"""

import importlib

import pytest
import torch
from torch.profiler import profile

from layout_checks import cuda_emulated as emulated
from layout_checks import load_emulator
from progan_fast.ops import _native

pn = importlib.import_module("progan_fast.ops.pixel_norm")

# Triton here is the interpreter on CPU tensors; on a GPU machine tests/test_channels_last_gpu.py runs the
# compiled kernels on CUDA tensors.
ON_CPU_TRITON = "triton" in pn.IMPLEMENTATIONS and not torch.cuda.is_available()
BACKENDS = [b for b in ("reference", "triton", "cpu")
            if b in pn.IMPLEMENTATIONS and (b != "triton" or ON_CPU_TRITON)]
# batch 1, channels not a power of two, odd H and W; 37 and 70 channels take the CUDA kernels'
# warp-per-pixel NHWC path; [N, C, 1, 1] is dense in both layouts (counts as NCHW).
SHAPES = [(1, 3, 5, 7), (2, 37, 3, 5), (3, 70, 1, 9), (2, 6, 1, 1)]
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
CL = torch.channels_last


def layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=CL) if channels_last else t.contiguous()


def assert_layout(t: torch.Tensor, like: torch.Tensor, what: str) -> None:
    """``t`` is dense in ``like``'s layout (channels-last stays channels-last)."""
    fmt = CL if (like.is_contiguous(memory_format=CL) and not like.is_contiguous()) else torch.contiguous_format
    assert t.is_contiguous(memory_format=fmt), f"{what}: strides {t.stride()} are not {fmt} like {like.stride()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_keep_the_layout(shape, channels_last, dtype, backend):
    g = torch.Generator().manual_seed(0)
    x0, dy0 = torch.randn(shape, generator=g, dtype=torch.float64) * 3, torch.randn(shape, generator=g,
                                                                                        dtype=torch.float64)
    x = layout(x0.to(dtype), channels_last).requires_grad_()
    dy = layout(dy0.to(dtype), channels_last)
    y = pn.pixel_norm(x, backend=backend)
    y.backward(dy)
    xr = x.detach().double().contiguous().requires_grad_()
    yr = pn.reference(xr)
    yr.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_layout(y, x, "output")
    assert_layout(x.grad, x, "input gradient")
    torch.testing.assert_close(y.double(), yr.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=4 * tol, atol=4 * tol)


def _custom_ops():
    ops = []
    if ON_CPU_TRITON:
        ops.append(("triton", pn._pixel_norm_op, pn._pixel_norm_backward_op))
    if _native.available():
        ops.append(("cpu", pn.NATIVE.pixel_norm, pn.NATIVE.pixel_norm_backward))
    return ops


@pytest.mark.parametrize("name,fwd,bwd", _custom_ops(), ids=[o[0] for o in _custom_ops()])
def test_opcheck_on_channels_last(name, fwd, bwd):
    x = torch.randn(2, 37, 3, 5).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(fwd, (x, 1e-8))
    g = torch.randn(2, 37, 3, 5).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(bwd, (g, x, 1e-8))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gradcheck_on_channels_last(backend):
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    fn = pn.IMPLEMENTATIONS[backend]
    assert torch.autograd.gradcheck(fn, (x,))
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradgradcheck(fn, (x,))


COPY_OPS = {"aten::clone", "aten::copy_", "aten::contiguous", "aten::_to_copy", "aten::to"}


def copies_of(shape, fn) -> list[str]:
    """The copy ops ``fn`` runs on a tensor of ``shape`` (by the profiler's recorded input shapes).

    Under Triton's interpreter each kernel launch copies its arguments to and from host buffers as
    flat 1-d byte tensors, which this does not count (they are not of the 4-d shape): so the check
    is clean for the triton backend too, and sees every copy the op's own Python makes."""
    with profile(record_shapes=True) as prof:
        fn()
    return [f"{e.name}{e.input_shapes}" for e in prof.events()
            if e.name in COPY_OPS and any(list(s) == list(shape) for s in e.input_shapes)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_no_hidden_copy(backend, channels_last):
    shape = (2, 37, 3, 5)
    x = layout(torch.randn(shape), channels_last).requires_grad_()
    dy = layout(torch.randn(shape), channels_last)

    def run():
        pn.pixel_norm(x, backend=backend).backward(dy)

    assert copies_of(shape, run) == []
    # The check can fail: an input in neither layout is copied to NCHW, and that copy is seen.
    odd = torch.randn(2, 37, 5, 3).transpose(2, 3).requires_grad_()
    assert copies_of(odd.shape, lambda: pn.pixel_norm(odd, backend=backend)) != []


# ----- the CUDA kernels through the emulator (tests/test_cuda_emulated.py's runner) ----------------

@pytest.fixture(scope="module")
def emu():
    e = load_emulator()
    yield e
    e.configure()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 37, 3, 5)], ids=str)
def test_cuda_kernels_emulated(emu, shape, channels_last, dtype):
    emu.configure(seed=3, max_grid_blocks=1)  # every grid-stride loop makes several passes
    emulated.run_pixel_norm(emu, shape, dtype, channels_last=channels_last)


# ----- the Triton kernels' GPU configs in NHWC ------------------------------------------------------

if "triton" in pn.IMPLEMENTATIONS and not torch.cuda.is_available():
    from progan_fast.ops.triton import pixel_norm as tpn

    _CL_CONFIGS = tpn._GPU_CONFIGS_CL
else:
    _CL_CONFIGS = []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path")
@pytest.mark.parametrize("cfg", _CL_CONFIGS, ids=lambda c: f"{c.kwargs}-w{c.num_warps}")
def test_every_gpu_config_on_channels_last(cfg, monkeypatch):
    """The launcher's GPU path (the autotuned kernels) on CPU tensors, one config at a time, NHWC,
    with several channel blocks and a partial pixel block."""
    monkeypatch.setattr(tpn, "on_interpreter", lambda t: False)
    for tuned in (tpn._pixel_norm_fwd_tuned_cl, tpn._pixel_norm_bwd_tuned_cl):
        monkeypatch.setattr(tuned, "configs", [cfg])
        monkeypatch.setattr(tuned, "cache", {})
    c = 2 * cfg.kwargs["BLOCK_C"] + 3
    p = cfg.kwargs["BLOCK_P"] + 7
    x = torch.randn(2, c, 1, p, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    y = pn.pixel_norm(x, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().contiguous().requires_grad_()
    yr = pn.reference(xr)
    yr.backward(dy.contiguous())
    assert_layout(y, x, "y")
    assert_layout(x.grad, x, "dx")
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
