"""Every op in NHWC on a GPU, for the first GPU session: the Triton kernels (compiled, not
interpreted) and the CUDA kernels against the float64 reference, forward and backward, in fp32 and
bf16, with the layouts of outputs and input gradients checked.

Without CUDA these skip; on the CPU the same kernels' NHWC paths are tested through the
interpreter and the emulation (``tests/test_channels_last_<op>.py``). Shapes are odd on purpose:
batch 3, channels that are not powers of two, 37 and 70 channels for the CUDA kernels' warp-per-pixel
NHWC paths, pixel counts that leave partial blocks."""

import math

import pytest
import torch

from progan_fast import ops
from progan_fast.ops.common import is_channels_last

CL = torch.channels_last
# |got - reference| / max |reference| per element, against the float64 reference on the same
# (rounded) inputs. fp32 (exact convs: the suite's conftest sets that policy): every element within
# 5e-5. bf16: every element within 5e-2, except in the convs with leaky-ReLU: there a few elements
# may take the other slope where a bf16-rounded pre-activation crosses zero, so their gradients
# differ by a slope's worth: 1% of the elements are free up to 0.5. Pixel norm, minibatch stddev,
# the fades, blend and downsample have no slope to flip, so they get no such allowance.
TOL = {torch.float32: 5e-5, torch.bfloat16: 5e-2}
SLOPE_FLIPS = {torch.float32: dict(share=1.0, all=5e-5), torch.bfloat16: dict(share=0.99, all=0.5)}


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, slope_flips: bool = False) -> None:
    err = (got.double() - want).abs() / want.abs().max().clamp_min(1e-12)
    most = TOL[dtype]
    share, bound = (SLOPE_FLIPS[dtype]["share"], SLOPE_FLIPS[dtype]["all"]) if slope_flips else (1.0, most)
    within = (err <= most).double().mean().item()
    assert within >= share and err.max().item() <= bound, \
        f"{what}: {within:.2%} of elements within {most}, worst {err.max().item():.3g}"


def test_only_the_convs_may_have_elements_off_by_a_slope():
    """The check itself, on the CPU: one element in 200 off by 0.3 of the largest (as a gradient that
    took the other slope can be) passes for a conv and fails for every other op (as a bf16 pixel norm
    with a bug in 0.5% of its pixels would)."""
    want = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = want.clone()
    got[::200] += 0.3 * want.abs().max()
    _check(got, want, torch.bfloat16, "conv", slope_flips=True)
    with pytest.raises(AssertionError, match="99.50% of elements within 0.05"):
        _check(got, want, torch.bfloat16, "pixel_norm")


def _cases():
    """``(name, fn(backend) -> callable, input shapes)``; the callable takes the inputs."""
    scale = math.sqrt(2) / math.sqrt(37 * 9)
    w = torch.randn(70, 37, 3, 3, generator=torch.Generator().manual_seed(1))
    b = torch.randn(70, generator=torch.Generator().manual_seed(2))

    def conv(upsample, pixel_norm):
        def make(backend):
            def run(x):
                return ops.conv2d_bias_lrelu(x, w.to(x), b.to(x), scale, True, upsample, pixel_norm, backend=backend)
            return run
        return make

    return [
        ("pixel_norm", lambda be: lambda x: ops.pixel_norm(x, backend=be), [(3, 37, 5, 7)]),
        ("pixel_norm_wide", lambda be: lambda x: ops.pixel_norm(x, backend=be), [(2, 70, 9, 9)]),
        ("conv3x3_pn", conv(False, True), [(3, 37, 6, 5)]),
        ("conv3x3_up_pn", conv(True, True), [(3, 37, 3, 5)]),
        ("conv3x3", conv(False, False), [(3, 37, 7, 7)]),
        ("minibatch_stddev", lambda be: lambda x: ops.minibatch_stddev(x, 3, backend=be), [(6, 37, 4, 4)]),
        ("fade_in", lambda be: lambda lo, hi: ops.fade_in(lo, hi, 0.3, backend=be), [(3, 5, 4, 6), (3, 5, 8, 12)]),
        ("fade_reals", lambda be: lambda x: ops.fade_reals(x, 0.3, backend=be), [(3, 3, 8, 10)]),
        ("blend", lambda be: lambda a, c: ops.blend(a, c, 0.3, backend=be), [(3, 37, 5, 7), (3, 37, 5, 7)]),
        ("downsample2x", lambda be: lambda x: ops.downsample2x(x, backend=be), [(3, 37, 9, 10)]),
    ]


CASES = _cases()


def _available(backend: str) -> bool:
    return all(backend in table for table in ops.all_op_implementations().values())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name,make,shapes", CASES, ids=[c[0] for c in CASES])
def test_every_op_in_nhwc_on_the_gpu(name, make, shapes, backend, dtype):
    if not _available(backend):
        pytest.skip(f"the {backend} backend is not available here")
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    inputs = [t.to("cuda", dtype).contiguous(memory_format=CL).requires_grad_() for t in base]
    out = make(backend)(*inputs)
    assert is_channels_last(out), f"{name}: output strides {out.stride()}"
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad.to("cuda", dtype).contiguous(memory_format=CL))

    # The reference in float64 on the very values the backend saw (its inputs rounded to dtype).
    ref_inputs = [t.detach().double().contiguous().requires_grad_() for t in inputs]
    ref_out = make("reference")(*ref_inputs)
    ref_out.backward(grad.to("cuda", dtype).double())

    slope_flips = name.startswith("conv")  # the cases whose op has a leaky-ReLU
    _check(out, ref_out, dtype, f"{name} output", slope_flips)
    for i, (t, r) in enumerate(zip(inputs, ref_inputs)):
        assert is_channels_last(t.grad), f"{name}: grad of input {i} strides {t.grad.stride()}"
        _check(t.grad, r.grad, dtype, f"{name}: grad of input {i}", slope_flips)
