"""pixel_norm on channels-last (NHWC) activations, on every backend here.

Each backend (``reference``; ``triton`` under the interpreter; ``cpu``, the C++ twins) runs forward
and backward on random NHWC inputs with odd shapes against an independent float64 formula, and must
return its output and input gradient in the input's memory format. Also: opcheck of the custom ops
on channels-last inputs (fake and real strides must agree), gradcheck in float64 on channels-last
inputs, "no hidden copy" (no clone / copy of a tensor of the activation's shape inside the op,
forward or backward) in both layouts, and every NHWC Triton config. NCHW: tests/test_ops.py,
tests/test_triton_pixel_norm.py, tests/test_native.py; the CUDA kernels in both layouts through the
emulator: tests/test_cuda_emulated.py.
"""

import importlib

import pytest
import torch
from layout_checks import activation_copies, layout
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


def assert_layout(t: torch.Tensor, like: torch.Tensor, what: str) -> None:
    """``t`` is dense in ``like``'s layout (channels-last stays channels-last)."""
    fmt = CL if (like.is_contiguous(memory_format=CL) and not like.is_contiguous()) else torch.contiguous_format
    assert t.is_contiguous(memory_format=fmt), f"{what}: strides {t.stride()} are not {fmt} like {like.stride()}"


def independent_pixel_norm(x):
    """Pixel norm in float64 by another formula than ``pn.reference`` (rsqrt of a mean)."""
    return x / ((x * x).sum(dim=1, keepdim=True) / x.shape[1] + 1e-8).sqrt()


# NHWC only (NCHW: tests/test_ops.py, tests/test_triton_pixel_norm.py, tests/test_native.py); bf16 slow.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("channels_last", [True], ids=["nhwc"])
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
    yr = independent_pixel_norm(xr)
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


@pytest.mark.slow
@pytest.mark.parametrize("name,fwd,bwd", _custom_ops(), ids=[o[0] for o in _custom_ops()])
def test_opcheck_on_channels_last(name, fwd, bwd):
    x = torch.randn(2, 37, 3, 5).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(fwd, (x, 1e-8))
    g = torch.randn(2, 37, 3, 5).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(bwd, (g, x, 1e-8))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gradcheck_on_channels_last(backend):
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    fn = pn.IMPLEMENTATIONS[backend]
    assert torch.autograd.gradcheck(fn, (x,))
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_no_hidden_copy(backend, channels_last):
    shape = (2, 37, 3, 5)
    x = layout(torch.randn(shape), channels_last).requires_grad_()
    dy = layout(torch.randn(shape), channels_last)

    def run():
        pn.pixel_norm(x, backend=backend).backward(dy)

    assert activation_copies(run, [shape]) == []
    # The check can fail: an input in neither layout is copied to NCHW, and that copy is seen.
    odd = torch.randn(2, 37, 5, 3).transpose(2, 3).requires_grad_()
    assert activation_copies(lambda: pn.pixel_norm(odd, backend=backend), [odd.shape]) != []


# The CUDA kernels in NHWC through the emulator: tests/test_cuda_emulated.py (test_pixel_norm_channels_last).


# ----- the Triton kernels' GPU configs in NHWC ------------------------------------------------------

if "triton" in pn.IMPLEMENTATIONS and not torch.cuda.is_available():
    from progan_fast.ops.triton import pixel_norm as tpn

    # the interpreter ignores num_warps and num_stages: one config per set of block sizes
    _CL_CONFIGS = list({tuple(sorted(c.kwargs.items())): c for c in reversed(tpn._GPU_CONFIGS_CL)}.values())[::-1]
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
