"""``--amp-dtype fp16``: pixel norm's mean square and its eps (1e-8) are computed in float32 on every backend.

In fp16 the square of a value below about 1.7e-4 rounds to zero, and so does 1e-8 itself (fp16's
smallest subnormal is 6e-8): a pixel whose features are all 1e-4 would be divided by
``sqrt(0 + 0)``. In float32 it is ``1e-4 / sqrt(1e-8 + 1e-8) = 0.7071``, and an all-zero pixel stays
0. The official code's fp16 mode raises the eps to 1e-4 instead (``G.pixelnorm_epsilon=1e-4``);
progan_fast keeps 1e-8 and computes the statistic in float32.

Every backend on the CPU: the reference, the Triton kernels (under the interpreter), the native
library's CPU twin and the CUDA kernels run by the emulator (kernels/emulation), for pixel norm
alone and fused into the convolution's epilogue.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from progan_fast.ops import _native

pixel_norm_module = importlib.import_module("progan_fast.ops.pixel_norm")
conv_act_module = importlib.import_module("progan_fast.ops.conv_act")

EPS = 1e-8


def tiny_input() -> torch.Tensor:
    """[2, 4, 2, 3] fp16: pixels of features 1e-4 (squares underflow in fp16), 3e-5 (subnormal), and 0."""
    x = torch.full((2, 4, 2, 3), 1e-4, dtype=torch.float64)
    x[0, :, 0, 1] = -3e-5
    x[1, :, 1, :] = 0.0
    x[1, 0, 0, 0] = 2e-4
    return x.half()


def expected(x: torch.Tensor) -> torch.Tensor:
    """The float64 value of ``x / sqrt(mean_c(x^2) + 1e-8)`` for the fp16 input."""
    x64 = x.double()
    return x64 * torch.rsqrt(x64.square().mean(1, keepdim=True) + EPS)


def check(got: torch.Tensor, x: torch.Tensor) -> None:
    assert got.dtype == torch.float16
    want = expected(x)
    assert want[0, 0, 0, 0] == pytest.approx(0.7071, abs=1e-4)  # what a fp16 eps (0) or mean square would break
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


BACKENDS = sorted(pixel_norm_module.IMPLEMENTATIONS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_norm_of_tiny_fp16_features(backend):
    x = tiny_input().requires_grad_()
    y = pixel_norm_module.pixel_norm(x, EPS, backend=backend)
    check(y, x.detach())
    dy = torch.full_like(y, 0.5)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(expected(x64), x64, dy.double())
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("backend", sorted(conv_act_module.IMPLEMENTATIONS))
def test_conv_with_fused_pixel_norm_of_tiny_fp16_outputs(backend):
    # A 1x1 identity convolution without bias or activation: the epilogue's pixel norm sees x itself.
    x = tiny_input()
    weight = torch.eye(4, dtype=torch.float16).view(4, 4, 1, 1)
    y = conv_act_module.IMPLEMENTATIONS[backend](x, weight, None, 1.0, False, False, True)
    check(y, x)


# ----- the CUDA kernels, run by the emulator ------------------------------------------------------

# The emulator is conftest.py's `emu` fixture.


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_pixel_norm_kernel_of_tiny_fp16_features(emu, channels_last):
    x = tiny_input()
    n, c, h, w = x.shape
    mem = x.permute(0, 2, 3, 1).contiguous() if channels_last else x
    y = emu.output(mem.shape, torch.float16, "y")
    emu.call("pixel_norm_forward", emu.dtype_code(torch.float16), emu.buffer(mem, "x"), y, n, c, h * w, EPS,
             channels_last)
    got = y.read()
    check(got.permute(0, 3, 1, 2) if channels_last else got, x)


def test_cuda_conv_epilogue_pixel_norm_of_tiny_fp16_outputs(emu):
    x = tiny_input()
    n, c, h, w = x.shape
    y = emu.output(x.shape, torch.float16, "y")
    r = emu.output((n * h * w,), torch.float32, "r")
    emu.call("conv_epilogue_forward", emu.dtype_code(torch.float16), emu.buffer(x, "conv"), y, None, r, n, c, h * w,
             1.0, False, True, False)
    check(y.read(), x)
