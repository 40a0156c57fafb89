"""The CUDA kernels (kernels/cuda/*.cu) executed on the CPU by the emulator in kernels/emulation.

Every kernel runs through its real launcher (grid sizing, dtype switch, arguments as on a device)
against the float64 reference, forward and backward, in fp32, fp64, bf16 and fp16, on odd shapes:
batch 1, channels that are not a power of two, pixel counts that leave a partial block and a
partial warp, and grids capped so that every grid-stride loop makes several passes. Threads of a
block run in a seeded random order between barriers, shared memory starts as NaN, every buffer
sits against a guard page and every output starts as NaN, so a missing barrier, an index past the
end and an element never written all fail here. The second half plants such bugs in the
emulator's self-test kernels and checks that each is caught, and that each check can be switched
off (the switch is what catches it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "kernels" / "emulation"

_spec = importlib.util.spec_from_file_location("progan_cuda_emulator", EMULATION / "emulator.py")
emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulator)
EmulatedKernelError = emulator.EmulatedKernelError

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# fp32 in the fast tier; the other dtypes (each its own kernel instantiation) in the slow one.
SWEEP_DTYPES = [torch.float32] + [pytest.param(d, marks=pytest.mark.slow) for d in DTYPES[1:]]
# The kernels compute in float (double for float64) and round once on store; the tolerances cover
# that rounding, device intrinsics' documented error (rsqrtf: 2 ulp) and FMA contraction.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
EPS = 1e-8
THREADS = 256  # every kernel's block size (kThreads in kernels/cuda/*.cu)


@pytest.fixture(scope="module")
def emu():
    try:
        # PROGAN_CUDA_EMULATION_LIBRARY: a library built elsewhere (kernels/emulation/mutants.py's)
        library = os.environ.get("PROGAN_CUDA_EMULATION_LIBRARY")
        e = emulator.Emulator(library) if library else emulator.Emulator.load()
    except emulator.build_module.EmulationBuildError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"the CUDA emulation did not build here: {exc}")
    yield e
    e.configure()


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not torch.isnan(got).any(), f"{what}: NaN (an element never written, or poisoned shared memory read)"
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# (n, c, h, w) cases: batch 1; channels 3, 5, 13; pixel counts that leave a partial block and a
# partial warp (n*h*w = 35, 189, 646); a grid cap of 2 blocks (512 threads) below the 646 pixels
# (and 8398 elements) of the last case, so every grid-stride loop makes several passes.
SHAPES = [
    pytest.param((1, 3, 5, 7), None, id="n1-c3-5x7"),
    pytest.param((3, 5, 7, 9), None, id="n3-c5-7x9"),
    pytest.param((2, 13, 17, 19), 2, id="n2-c13-17x19-grid2"),
]


# ----- one runner per op: both directions through the launchers, compared with the reference ------

def nhwc(t: torch.Tensor) -> torch.Tensor:
    """An [N, C, H, W] tensor's channels-last memory, as the [N, H, W, C] tensor the buffers take."""
    return t.permute(0, 2, 3, 1).contiguous()


def run_pixel_norm(emu, shape, dtype, placement="end", channels_last=False):
    n, c, h, w = shape
    p = h * w
    code = emu.dtype_code(dtype)
    x, dy = inputs(shape, dtype, 1), inputs(shape, dtype, 2)
    # channels_last: the buffers hold NHWC memory; results are read back as [N, H, W, C] and permuted.
    mem, mshape = (nhwc, (n, h, w, c)) if channels_last else ((lambda t: t), shape)
    back = (lambda t: t.permute(0, 3, 1, 2)) if channels_last else (lambda t: t)
    xb = emu.buffer(mem(x), "x", placement)
    y = emu.output(mshape, dtype, "y", placement)
    emu.call("pixel_norm_forward", code, xb, y, n, c, p, EPS, channels_last)
    x64 = x.double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.square().mean(1, keepdim=True) + EPS)
    check(back(y.read()), ref, dtype, "pixel_norm forward")
    dx = emu.output(mshape, dtype, "dx", placement)
    emu.call("pixel_norm_backward", code, emu.buffer(mem(dy), "dy", placement), xb, dx, n, c, p, EPS, channels_last)
    (want,) = torch.autograd.grad(ref, x64, dy.double())
    check(back(dx.read()), want, dtype, "pixel_norm backward")


def run_conv_epilogue(emu, shape, dtype, activation, pixel_norm, with_bias=True, placement="end",
                      channels_last=False):
    n, c, h, w = shape
    p = h * w
    code, acc = emu.dtype_code(dtype), emulator.ACC_DTYPES[dtype]
    conv, bias, dy = inputs(shape, dtype, 3), inputs((c,), dtype, 4), inputs(shape, dtype, 5)
    scale = 0.37
    # channels_last: conv, y, dy and g hold NHWC memory (read back as [N, H, W, C], then permuted).
    mem, mshape = (nhwc, (n, h, w, c)) if channels_last else ((lambda t: t), shape)
    back = (lambda t: t.permute(0, 3, 1, 2)) if channels_last else (lambda t: t)
    y = emu.output(mshape, dtype, "y", placement)
    r = emu.output((n * p,), acc, "r", placement)
    bias_b = emu.buffer(bias, "bias", placement) if with_bias else None
    emu.call("conv_epilogue_forward", code, emu.buffer(mem(conv), "conv", placement), y, bias_b,
             r if pixel_norm else None, n, c, p, scale, activation, pixel_norm, channels_last)
    z = (conv.double() * scale + (bias.double().view(1, c, 1, 1) if with_bias else 0)).requires_grad_()
    v = F.leaky_relu(z, 0.2) if activation else z
    r_ref = torch.rsqrt(v.square().mean(1, keepdim=True) + EPS) if pixel_norm else None
    ref = v * r_ref if pixel_norm else v
    y_got = back(y.read())
    check(y_got, ref, dtype, f"conv_epilogue forward (activation={activation}, pixel_norm={pixel_norm})")
    if pixel_norm:
        check(r.read().view(n, h, w), r_ref.view(n, h, w), acc, "conv_epilogue forward's r")
    # Backward from the forward's own saved y and r, as the glue calls it.
    blocks = emu.value("conv_epilogue_num_blocks", n, p)
    assert blocks == -(-n * p // THREADS)
    g = emu.output(mshape, dtype, "g", placement)
    bias_part = emu.output((blocks, c), acc, "bias_part", placement)
    emu.call("conv_epilogue_backward", code, emu.buffer(mem(dy), "dy", placement),
             emu.buffer(mem(y_got), "y", placement), r if pixel_norm else None, g, bias_part, n, c, p, activation,
             pixel_norm, channels_last)
    # The reference gradient from the saved y and r the kernel gets (in bf16/fp16 y is rounded, and
    # the kernel's gradient is exact for that y): pixel norm's r * (dy - y * mean(dy * y)), then
    # leaky-ReLU's slope where y <= 0.
    y64, dz = y_got.double(), dy.double()
    if pixel_norm:
        dz = r.read().double().view(n, 1, h, w) * (dz - y64 * (dz * y64).mean(1, keepdim=True))
    if activation:
        dz = torch.where(y64 > 0, dz, 0.2 * dz)
    if dtype == torch.float64:  # there y is exact, and so must this formula be
        (exact,) = torch.autograd.grad(ref, z, dy.double())
        torch.testing.assert_close(dz, exact, rtol=1e-10, atol=1e-10)
    if activation or pixel_norm:
        check(back(g.read()), dz, dtype, "conv_epilogue backward's g")
    else:  # g is only written when there is something to apply; the glue uses dy itself
        assert torch.isnan(g.read()).all(), "conv_epilogue backward wrote g without activation or pixel norm"
    # bias_part[b, ch]: the sum of g over block b's pixels q = b * 256 + t of the flattened (n, p).
    per_pixel = dz.permute(0, 2, 3, 1).reshape(n * p, c)
    pad = blocks * THREADS - n * p
    want = torch.cat([per_pixel, per_pixel.new_zeros(pad, c)]).view(blocks, THREADS, c).sum(1)
    tol = TOL[acc] if dtype in (torch.float32, torch.float64) else TOL[dtype]
    torch.testing.assert_close(bias_part.read().double(), want, **tol)


def run_fade_in(emu, shape, dtype, placement="end"):
    n, c, h, w = shape  # the low-resolution shape
    code, acc = emu.dtype_code(dtype), emulator.ACC_DTYPES[dtype]
    alpha = 0.3
    low, high = inputs(shape, dtype, 6), inputs((n, c, 2 * h, 2 * w), dtype, 7)
    grad = inputs((n, c, 2 * h, 2 * w), dtype, 8)
    a = emu.scalar(alpha, dtype)
    out = emu.output(high.shape, dtype, "out", placement)
    emu.call("fade_in_forward", code, emu.buffer(low, "low", placement), emu.buffer(high, "high", placement), a, out,
             n, c, h, w, False)
    low64, high64 = low.double().requires_grad_(), high.double().requires_grad_()
    ref = torch.lerp(low64.repeat_interleave(2, 2).repeat_interleave(2, 3), high64, alpha)
    check(out.read(), ref, dtype, "fade_in forward")
    d_low = emu.output(shape, dtype, "d_low", placement)
    d_high = emu.output(high.shape, dtype, "d_high", placement)
    emu.call("fade_in_backward", code, emu.buffer(grad, "grad", placement), a, d_low, d_high, n, c, h, w, False)
    want_low, want_high = torch.autograd.grad(ref, (low64, high64), grad.double())
    check(d_low.read(), want_low, dtype, "fade_in backward (low)")
    check(d_high.read(), want_high, dtype, "fade_in backward (high)")
    # fade_reals: lerp(up(down(x)), x, alpha) on a full-resolution x.
    faded = emu.output(high.shape, dtype, "out", placement)
    emu.call("fade_reals", code, emu.buffer(high, "x", placement), a, faded, n, c, h, w, False)
    x64 = high.double()
    check(faded.read(), torch.lerp(F.avg_pool2d(x64, 2).repeat_interleave(2, 2).repeat_interleave(2, 3), x64, alpha),
          dtype, "fade_reals")
    assert acc in (torch.float32, torch.float64)


def run_blend(emu, numel, dtype, placement="end"):
    code = emu.dtype_code(dtype)
    old, new, grad = (inputs((numel,), dtype, s) for s in (9, 10, 11))
    alpha = 0.65
    a = emu.scalar(alpha, dtype)
    out = emu.output((numel,), dtype, "out", placement)
    emu.call("blend_forward", code, emu.buffer(old, "old", placement), emu.buffer(new, "new", placement), a, out, numel)
    check(out.read(), torch.lerp(old.double(), new.double(), alpha), dtype, "blend forward")
    d_old, d_new = emu.output((numel,), dtype, "d_old", placement), emu.output((numel,), dtype, "d_new", placement)
    emu.call("blend_backward", code, emu.buffer(grad, "grad", placement), a, d_old, d_new, numel)
    check(d_old.read(), grad.double() * (1 - alpha), dtype, "blend backward (old)")
    check(d_new.read(), grad.double() * alpha, dtype, "blend backward (new)")


def run_downsample2x(emu, shape, dtype, placement="end"):
    n, c, h, w = shape
    code = emu.dtype_code(dtype)
    x = inputs(shape, dtype, 12)
    y = emu.output((n, c, h // 2, w // 2), dtype, "y", placement)
    emu.call("downsample2x_forward", code, emu.buffer(x, "x", placement), y, n, c, h, w, False)
    x64 = x.double().requires_grad_()
    ref = F.avg_pool2d(x64, 2)
    check(y.read(), ref, dtype, "downsample2x forward")
    grad = inputs(ref.shape, dtype, 13)
    dx = emu.output(shape, dtype, "dx", placement)
    emu.call("downsample2x_backward", code, emu.buffer(grad, "grad", placement), dx, n, c, h, w, False)
    (want,) = torch.autograd.grad(ref, x64, grad.double())
    check(dx.read(), want, dtype, "downsample2x backward")


def run_minibatch_stddev(emu, shape, group, dtype, placement="end", channels_last=False):
    """With ``channels_last`` the buffers hold NHWC memory (x, dx [N, H, W, C]; out, grad [N, H, W, C + 1])."""
    mbstd = importlib.import_module("progan_fast.ops.minibatch_stddev")

    def memory(t):  # an [N, C, H, W] tensor as the flat buffer holds it
        return t.permute(0, 2, 3, 1).contiguous() if channels_last else t

    def logical(buf):  # the buffer read back as [N, C, H, W]
        t = buf.read()
        return t.permute(0, 3, 1, 2) if channels_last else t

    n, c, h, w = shape
    p, f = h * w, c * h * w
    g = mbstd.effective_group_size(n, group)
    m = n // g
    code, acc = emu.dtype_code(dtype), emulator.ACC_DTYPES[dtype]
    x = inputs(shape, dtype, 14)
    out = emu.output(memory(torch.empty(n, c + 1, h, w)).shape, dtype, "out", placement)
    part = emu.output((emu.value("minibatch_stddev_part_count", m, f),), acc, "part", placement)
    xb = emu.buffer(memory(x), "x", placement)
    emu.call("minibatch_stddev_forward", code, xb, out, part, g, m, f, p, EPS, channels_last)
    x64 = x.double().requires_grad_()
    ref = mbstd.reference(x64, group, EPS)
    check(logical(out), ref, dtype, "minibatch_stddev forward")
    grad = inputs((n, c + 1, h, w), dtype, 15)
    gs = emu.output((m,), acc, "gs", placement)
    dx = emu.output(memory(x).shape, dtype, "dx", placement)
    emu.call("minibatch_stddev_backward", code, emu.buffer(memory(grad), "grad", placement), xb, gs, dx, g, m, f, p,
             EPS, channels_last)
    (want,) = torch.autograd.grad(ref, x64, grad.double())
    check(logical(dx), want, dtype, "minibatch_stddev backward")


# ----- the kernels ----------------------------------------------------------------------------------

@pytest.fixture
def configure_case(emu, request):
    """Configure the emulator for one case: a seed from the case's id, every check on, the grid cap."""
    def apply(cap):
        emu.configure(seed=zlib.crc32(request.node.name.encode()), max_grid_blocks=cap or 65535 * 8)
    return apply


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,cap", SHAPES)
def test_pixel_norm(emu, configure_case, shape, cap, dtype):
    configure_case(cap)
    run_pixel_norm(emu, shape, dtype)


# Channels-last: fewer than 32 channels take the strided thread-per-pixel kernels, 32 or more the
# warp-per-pixel ones (37 and 70 leave a partial pass of lanes; 2 * 7 * 9 = 126 pixels are 16 blocks
# of 8 warps, and a cap of 2 blocks makes the warp-stride loop take several passes; 2 * 17 * 19 = 646
# pixels give conv_epilogue's backward three blocks, the last partial, and partial warps). 512 is
# the widest the epilogue backward's warp kernel takes, 513 the narrowest it leaves to the strided one.
NHWC_SHAPES = [
    pytest.param((1, 3, 5, 7), None, id="n1-c3-5x7"),
    pytest.param((2, 13, 17, 19), 2, id="n2-c13-17x19-grid2"),
    pytest.param((1, 37, 3, 5), None, id="n1-c37-3x5-warp"),
    pytest.param((2, 70, 7, 9), 2, id="n2-c70-7x9-warp-grid2"),
    pytest.param((2, 33, 17, 19), 2, id="n2-c33-17x19-warp-grid2"),
    pytest.param((1, 512, 1, 3), None, id="n1-c512-1x3-warp"),
    pytest.param((1, 513, 1, 3), None, id="n1-c513-1x3"),
]


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,cap", NHWC_SHAPES)
def test_pixel_norm_channels_last(emu, configure_case, shape, cap, dtype):
    configure_case(cap)
    run_pixel_norm(emu, shape, dtype, channels_last=True)


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation,pixel_norm", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["act-pn", "act", "pn", "linear"])
@pytest.mark.parametrize("shape,cap", SHAPES)
def test_conv_epilogue(emu, configure_case, shape, cap, activation, pixel_norm, dtype):
    configure_case(cap)
    run_conv_epilogue(emu, shape, dtype, activation, pixel_norm)


def test_conv_epilogue_without_bias(emu, configure_case):
    configure_case(None)
    run_conv_epilogue(emu, (2, 3, 5, 7), torch.float32, True, True, with_bias=False)
    run_conv_epilogue(emu, (2, 3, 5, 7), torch.float32, True, True, with_bias=False, channels_last=True)


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation,pixel_norm", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["act-pn", "act", "pn", "linear"])
@pytest.mark.parametrize("shape,cap", NHWC_SHAPES)
def test_conv_epilogue_channels_last(emu, configure_case, shape, cap, activation, pixel_norm, dtype):
    configure_case(cap)
    run_conv_epilogue(emu, shape, dtype, activation, pixel_norm, channels_last=True)


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,cap", [pytest.param((1, 3, 2, 3), None, id="n1-c3-2x3"),
                                       pytest.param((2, 5, 7, 5), 1, id="n2-c5-7x5-grid1")])  # 350 > 256
def test_fade_in_and_fade_reals(emu, configure_case, shape, cap, dtype):
    configure_case(cap)
    run_fade_in(emu, shape, dtype)


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
# 1000 and 4096 take the 16-byte vector path (numel a multiple of the vector width in every dtype);
# 1001 and 37 the scalar one; 4096 with a cap of 1 block runs several grid-stride passes of vectors.
@pytest.mark.parametrize("numel,cap", [(37, None), (1001, 2), (1000, None), (4096, 1)])
def test_blend(emu, configure_case, numel, cap, dtype):
    configure_case(cap)
    run_blend(emu, numel, dtype)


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,cap", [pytest.param((1, 3, 4, 6), None, id="n1-c3-4x6"),
                                       pytest.param((2, 5, 13, 11), 1, id="n2-c5-13x11-odd-grid1"),  # 300 > 256
                                       pytest.param((3, 1, 5, 4), None, id="n3-c1-5x4-odd-h")])
def test_downsample2x(emu, configure_case, shape, cap, dtype):
    configure_case(cap)
    run_downsample2x(emu, shape, dtype)


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,group,cap", [
    pytest.param((1, 3, 2, 2), 4, None, id="n1"),
    pytest.param((6, 5, 3, 3), 4, None, id="n6-g3-c5"),  # group 4 does not divide 6: effective 3
    pytest.param((8, 7, 9, 11), 4, 2, id="n8-g4-f693-grid2"),  # F = 693: three 256-feature blocks, the last partial
])
def test_minibatch_stddev(emu, configure_case, shape, group, cap, dtype):
    configure_case(cap)
    run_minibatch_stddev(emu, shape, group, dtype)


@pytest.mark.parametrize("placement", ["end", "start"])
def test_every_kernel_against_guard_pages_at_both_ends(emu, configure_case, placement):
    """An index past the end faults with 'end'; one before the start with 'start'."""
    configure_case(2)
    shape = (2, 5, 7, 9)
    run_pixel_norm(emu, shape, torch.float32, placement)
    run_pixel_norm(emu, shape, torch.float32, placement, channels_last=True)
    run_pixel_norm(emu, (2, 33, 3, 5), torch.float32, placement, channels_last=True)
    run_conv_epilogue(emu, shape, torch.float32, True, True, placement=placement)
    run_conv_epilogue(emu, shape, torch.float32, False, False, placement=placement)
    run_conv_epilogue(emu, shape, torch.float32, True, True, placement=placement, channels_last=True)
    run_conv_epilogue(emu, shape, torch.float32, True, False, placement=placement, channels_last=True)
    run_conv_epilogue(emu, (2, 33, 3, 5), torch.float32, True, True, placement=placement, channels_last=True)
    run_fade_in(emu, (2, 3, 3, 5), torch.float32, placement)
    run_blend(emu, 999, torch.float32, placement)
    run_blend(emu, 1024, torch.float32, placement)
    run_downsample2x(emu, (2, 3, 7, 5), torch.float32, placement)
    run_minibatch_stddev(emu, (4, 3, 5, 7), 2, torch.float32, placement)


def _kernels_in_sources() -> set[str]:
    names = set()
    for src in (ROOT / "kernels" / "cuda").glob("*.cu"):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", src.read_text()))
    return names


def test_every_kernel_runs_in_every_dtype(emu, configure_case):
    """The table above covers every __global__ kernel of kernels/cuda in all four dtypes (a new kernel
    without a test here fails this)."""
    configure_case(None)
    for dtype in DTYPES:
        run_pixel_norm(emu, (1, 3, 2, 2), dtype)
        run_pixel_norm(emu, (1, 33, 2, 2), dtype, channels_last=True)
        for act, pn in [(True, True), (True, False)]:
            run_conv_epilogue(emu, (1, 3, 2, 2), dtype, act, pn)
        run_conv_epilogue(emu, (1, 33, 2, 2), dtype, True, True, channels_last=True)
        run_fade_in(emu, (1, 2, 2, 2), dtype)
        run_blend(emu, 5, dtype)
        run_blend(emu, 64, dtype)
        run_downsample2x(emu, (1, 2, 4, 4), dtype)
        run_minibatch_stddev(emu, (2, 3, 2, 2), 2, dtype)
    launched = emu.launched_kernels()
    kernels = _kernels_in_sources()
    assert len(kernels) >= 13
    type_names = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "__nv_bfloat16",
                  torch.float16: "__half"}
    for kernel in sorted(kernels):
        for dtype, t in type_names.items():
            assert any(re.fullmatch(rf"{kernel}<{t}(, \d+)?>", k) for k in launched), \
                f"{kernel} never ran in {dtype_id(dtype)} (launched: {sorted(launched)})"


def test_every_launcher_has_an_entry_point(emu):
    header = (ROOT / "kernels" / "include" / "progan" / "cuda_launchers.h").read_text()
    launchers = re.findall(r"^(?:cudaError_t|int64_t)\s+(\w+)\(", header, re.M)
    assert len(launchers) >= 13
    missing = [name for name in launchers if not hasattr(emu.lib, f"progan_emu_{name}")]
    assert not missing, f"kernels/emulation/launchers.cpp lacks entry points for {missing}"


def test_every_shared_variable_is_poisoned(emu):
    """The runtime finds each kernel's __shared__ variables in the library's symbol table (it fills
    them with NaN before each block); a kernel whose variables it missed would read zeros instead."""
    shared = [name for _, name in emu.shared_variables()]
    for src in (ROOT / "kernels" / "cuda").glob("*.cu"):
        text = src.read_text()
        for kernel, body in re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)(.*?)\n}\n",
                                       text, re.S):
            for var in re.findall(r"__shared__\s+[\w:<>]+\s+(\w+)", body):
                found = [s for s in shared if re.search(rf"\b{kernel}<.*::{var}$", s)]
                assert len(found) == 4, f"{src.name}: {kernel}'s __shared__ {var}: found {found}"


def test_rewrite_changes_only_launches(emu):
    """The emulation compiles the CUDA sources' own text: the rewrite step only turns each
    `k<<<...>>>(` into a launch call; undoing that gives the source back byte for byte."""
    build = emulator.build_module
    back = re.compile(r'::progan_emu::launch\((?P<k>[^,]+(?:<[^<>]*>)?), "(?P=k)", __FILE__, __LINE__, (?P<c>.*?)\)\(',
                      re.S)
    launches = 0
    for src in sorted((ROOT / "kernels" / "cuda").glob("*.cu")) + [ROOT / "kernels" / "cuda" / "common.cuh"]:
        text = src.read_text()
        out = build.rewrite(text, str(src))
        assert out.startswith(f'#line 1 "{src}"\n')
        body = out.split("\n", 1)[1]
        launches += len(back.findall(body))
        undone = back.sub(lambda m: f"{m['k']}<<<{m['c']}>>>(", body)
        assert undone == text, src.name
    assert launches >= 13


# ----- the emulator itself: what each check catches --------------------------------------------------

def test_conversions_match_cuda_rounding(emu):
    """__float2half_rn/__float2bfloat16_rn round to nearest even (torch's conversions do too), and
    the reverse conversions are exact, on every 16-bit pattern and on the rounding edge cases."""
    import ctypes

    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype, to_f, from_f in [(torch.float16, "half_to_float", "float_to_half"),
                                (torch.bfloat16, "bfloat16_to_float", "float_to_bfloat16")]:
        as_float = torch.empty(1 << 16, dtype=torch.float32)
        getattr(emu.lib, f"progan_emu_{to_f}")(ctypes.c_void_p(bits.data_ptr()), ctypes.c_void_p(as_float.data_ptr()),
                                               ctypes.c_int64(1 << 16))
        want = bits.view(dtype).float()
        torch.testing.assert_close(as_float, want, rtol=0, atol=0, equal_nan=True)
        # floats between every representable pair (ties included), huge, tiny and subnormal values
        g = torch.Generator().manual_seed(0)
        x = torch.cat([want[torch.isfinite(want)], (want[:-1] + want[1:])[torch.isfinite(want[:-1] + want[1:])] / 2,
                       torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g),
                       torch.tensor([65519.0, 65520.0, 1e10, -1e10, 6e-8, 3e-8, 2.9e-8, 1e-40, 0.0, -0.0,
                                     float("inf"), float("-inf"), float("nan")])])
        out = torch.empty(x.numel(), dtype=torch.int16)
        getattr(emu.lib, f"progan_emu_{from_f}")(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                                 ctypes.c_int64(x.numel()))
        torch.testing.assert_close(out.view(dtype).float(), x.to(dtype).float(), rtol=0, atol=0, equal_nan=True)


def _block_sum(emu, with_barrier, seed, **checks):
    emu.configure(seed=seed, **checks)
    x = torch.randn(256, generator=torch.Generator().manual_seed(seed))
    out = emu.output((1,), torch.float32, "out")
    emu.call("selftest_block_sum", emu.buffer(x, "x"), out, 256, 256, int(with_barrier))
    return out.read().item(), x.sum().item()


def test_missing_barrier_in_a_block_reduction_is_caught(emu):
    for seed in range(8):
        got, want = _block_sum(emu, True, seed)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # Without the barrier warp 0 reads partial sums the other warps have not written yet (poisoned
    # NaN) under most schedules; under some, every other warp happens to finish first, as it may
    # on a GPU. A schedule depends only on the seed (configure restarts the draw), so the count is
    # fixed; the bound leaves room for a change of scheduler, not for a blind one.
    caught = []
    for seed in range(8):
        got, want = _block_sum(emu, False, seed)
        if got != pytest.approx(want, rel=1e-5, abs=1e-5):
            caught.append(seed)
    assert len(caught) >= 4, caught
    # Without poisoning and interleaving, shared memory still holds the partial sums of the run just
    # before on the same data (as it often does on a GPU), and the bug passes: poisoning catches it.
    _block_sum(emu, False, 0, interleave=False, poison_shared=False)
    got, want = _block_sum(emu, False, 0, interleave=False, poison_shared=False)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def _shared_tile(emu, mode, **checks):
    x = torch.arange(1, 65, dtype=torch.float32)
    y = emu.output((64,), torch.float32, "y")
    emu.configure(**checks)
    emu.call("selftest_shared_tile", emu.buffer(x, "x"), y, mode)
    return y.read(), torch.cat([x[:1], x[:-1]])


def test_read_of_uninitialised_shared_memory_is_caught(emu):
    got, want = _shared_tile(emu, 1)
    assert torch.equal(got, want)
    got, _ = _shared_tile(emu, 0)
    assert torch.isnan(got).all()
    _shared_tile(emu, 1, poison_shared=False)  # without poisoning, the last block's data looks valid
    got, _ = _shared_tile(emu, 0, poison_shared=False)
    assert not torch.isnan(got).any()


def test_index_past_a_shared_array_is_caught(emu):
    with pytest.raises(EmulatedKernelError, match=r"out-of-bounds index into a fixed-size array .*shared_tile_kernel"
                                                  r".*thread \(63,0,0\) of block \(0,0,0\)"):
        _shared_tile(emu, 3)


def test_race_without_barrier_is_caught_by_interleaving(emu):
    """Thread t reads what thread t - 1 wrote, without a barrier between: in thread order the bug
    never shows; in the seeded random order it does, for every seed tried."""
    got, want = _shared_tile(emu, 2, interleave=False)
    assert torch.equal(got, want)
    for seed in range(3):
        got, want = _shared_tile(emu, 2, seed=seed)
        assert not torch.equal(got, want)


def test_off_by_one_mask_is_caught_with_kernel_thread_and_index(emu):
    emu.configure(seed=1)
    x = torch.randn(100)
    y = emu.output((100,), torch.float32, "y")
    emu.call("selftest_copy", emu.buffer(x, "x"), y, 100, 1, 0)
    assert torch.equal(y.read(), x)
    with pytest.raises(EmulatedKernelError) as info:
        emu.call("selftest_copy", emu.buffer(x, "x"), emu.output((100,), torch.float32, "y"), 100, 1, 1)
    report = info.value.report
    assert info.value.code == 700
    assert "out-of-bounds read" in report and "copy_kernel" in report
    assert "element 100 of 'x' (100 elements of 4 bytes)" in report
    assert re.search(r"thread \(36,0,0\) of block \(0,0,0\)", report), report  # i = 100 = 36 + 64: the second pass
    # Without guard pages the same bug goes unnoticed.
    emu.configure(seed=1, check_bounds=False)
    emu.call("selftest_copy", emu.buffer(x, "x"), emu.output((100,), torch.float32, "y"), 100, 1, 1)


@pytest.mark.parametrize("bug,expected", [
    (1, r"wait at different __syncthreads: selftest\.cu:\d+ \(threads 0-39\), selftest\.cu:\d+ \(threads 40-63\)"),
    (2, r"reached by 32 of 64 threads; threads 32-63 exited without reaching it"),
    (3, r"names lane 5 in its mask 0xffffffff, and lane 5 has exited"),
    (4, r"deadlock .* threads 0: __syncthreads at selftest\.cu:\d+.* threads 1-31: a warp collective"),
    (5, r"calls it with mask 0x0000ffff, which does not name its own lane"),
    (6, r"lane 0 of warp 0 reads lane 16, which is not in the mask 0x0000ffff"),
])
def test_synchronization_misuse_is_reported_not_hung(emu, bug, expected):
    emu.configure(seed=2)
    y = emu.output((64,), torch.float32, "y")
    emu.call("selftest_sync", y, 64, 0)
    assert torch.equal(y.read(), torch.arange(64.0) + (torch.arange(64) ^ 1).float())
    with pytest.raises(EmulatedKernelError) as info:
        emu.call("selftest_sync", emu.output((64,), torch.float32, "y"), 64, bug)
    assert re.search(expected, info.value.report), info.value.report
    assert "sync_kernel" in info.value.report


def test_a_full_mask_shuffle_in_a_partial_warp_is_reported(emu):
    emu.configure(seed=2)
    with pytest.raises(EmulatedKernelError, match=r"names lane 16 in its mask 0xffffffff, and lane 16 does not exist"):
        emu.call("selftest_sync", emu.output((48,), torch.float32, "y"), 48, 0)


def test_invalid_launch_configuration_is_an_error(emu):
    emu.configure()
    with pytest.raises(EmulatedKernelError, match=r"invalid launch configuration .* block \(2048,1,1\)") as info:
        emu.call("selftest_bad_config", emu.output((64,), torch.float32, "y"))
    assert info.value.code == 9


def test_dynamic_shared_memory_atomics_votes_and_shuffles(emu):
    """The rest of the execution model, used correctly, gives CUDA's results (a 16x4 block)."""
    for seed in range(2):
        emu.configure(seed=seed)
        n = 60  # threads 60-63 contribute 0
        x = torch.randn(64, generator=torch.Generator().manual_seed(seed))
        x[n:] = 0
        y = emu.output((64, 7), torch.float32, "y")
        votes = emu.output((2,), torch.int32, "votes")
        emu.call("selftest_features", emu.buffer(x[:n], "x"), y, votes, n)
        got = y.read()
        lane = torch.arange(64) % 32
        warp_base = torch.arange(64) - lane
        down = torch.where(lane < 31, x[(torch.arange(64) + 1).clamp(max=63)], x)
        up = torch.where(lane >= 2, x[(torch.arange(64) - 2).clamp(min=0)], x)
        half = torch.where(lane < 16, x + x[warp_base + (lane ^ 8)], x)
        width8 = x[warp_base + (lane ^ 4)]
        torch.testing.assert_close(got[:, 0], down)
        torch.testing.assert_close(got[:, 1], up)
        torch.testing.assert_close(got[:, 2], x[warp_base + 3])
        torch.testing.assert_close(got[:, 3], half)
        torch.testing.assert_close(got[:, 4], width8)
        torch.testing.assert_close(got[:, 5], x.sum().expand(64), rtol=1e-5, atol=1e-5)
        any_gt1 = torch.tensor([(x[w * 32:(w + 1) * 32] > 1).any() for w in range(2)]).repeat_interleave(32)
        torch.testing.assert_close(got[:, 6], any_gt1.float() + 2)
        want_votes = [sum(1 << k for k in range(32) if x[w * 32 + k] > 0) for w in range(2)]
        assert [v & 0xFFFFFFFF for v in votes.read().tolist()] == want_votes
