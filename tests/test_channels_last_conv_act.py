"""conv2d_bias_lrelu in both activation layouts (NCHW and channels-last NHWC), on every backend here.

Each backend (``reference``; ``triton`` under the interpreter; ``cpu``, the C++ composite of ATen's
conv and the epilogue twins; the CUDA epilogue kernels through the emulator, in
tests/test_cuda_emulated.py's runner) runs forward and backward on random inputs in both layouts,
with odd shapes (batch 1, channel counts that are not powers of two, odd H and W), against the
float64 NCHW reference; the triton and cpu backends must return ``y`` and ``dx`` in ``x``'s
memory format and ``dw`` in the weight's. Also: the double backward (the gradient penalty's path)
against the reference's, gradcheck and gradgradcheck in float64 on channels-last inputs, opcheck of
every custom op on channels-last inputs, and "no hidden copy" of an activation, forward, backward
and double backward.
"""

import importlib

import pytest
import torch
from torch.profiler import profile

from layout_checks import cuda_emulated as emulated
from layout_checks import load_emulator
from progan_fast.ops import _native
from progan_fast.ops.common import is_channels_last

ca = importlib.import_module("progan_fast.ops.conv_act")

# Triton here is the interpreter on CPU tensors; on a GPU machine tests/test_channels_last_gpu.py runs the
# compiled kernels on CUDA tensors.
ON_CPU_TRITON = "triton" in ca.IMPLEMENTATIONS and not torch.cuda.is_available()
BACKENDS = [b for b in ("reference", "triton", "cpu")
            if b in ca.IMPLEMENTATIONS and (b != "triton" or ON_CPU_TRITON)]
CL = torch.channels_last
# max |got - reference_fp64| / max |reference_fp64|
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

# (x shape, Cout, k, upsample, pixel_norm, activation, bias)
CASES = {
    "3x3_b1": ((1, 5, 5, 7), 6, 3, False, False, True, True),
    "3x3_noact_nobias": ((2, 3, 3, 5), 5, 3, False, False, False, False),
    "up_pn": ((2, 6, 3, 5), 5, 3, True, True, True, True),
    "up_nobias": ((1, 3, 3, 3), 7, 3, True, False, True, False),
    "pn": ((2, 5, 5, 3), 7, 3, False, True, True, True),
    "to_rgb_1x1": ((2, 5, 5, 7), 3, 1, False, False, False, True),
    "dense_1x1": ((3, 12, 1, 1), 10, 1, False, False, True, True),  # dense in both layouts: NCHW
    "dense_to_4x4": ((2, 6, 1, 1), 5, 3, True, True, True, True),  # 1x1 upsampled: NCHW
}

def layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=CL) if channels_last else t.contiguous()


def expected_format(like: torch.Tensor) -> torch.memory_format:
    return CL if is_channels_last(like) else torch.contiguous_format


def assert_layout(t: torch.Tensor, like: torch.Tensor, what: str) -> None:
    fmt = expected_format(like)
    assert t.is_contiguous(memory_format=fmt), f"{what}: strides {t.stride()} are not {fmt} like {like.stride()}"


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def make(case, dtype, channels_last, seed=0):
    shape, cout, k, up, pnorm, act, has_bias = case
    g = torch.Generator().manual_seed(seed)
    x = layout(torch.randn(shape, generator=g).to(dtype), channels_last)
    w = torch.randn(cout, shape[1], k, k, generator=g).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if has_bias else None
    return x, w, b, dict(activation=act, upsample=up, pixel_norm=pnorm)


def _run(backend, x, w, b, opts, gy, dtype):
    """``(y, dx, dw, db)`` of one backend in ``dtype`` for the output gradient ``gy``."""
    leaves = [t.to(dtype).clone(memory_format=torch.preserve_format).requires_grad_()
              for t in (x, w) + ((b,) if b is not None else ())]
    fn = ca.reference if backend == "float64-reference" else ca.IMPLEMENTATIONS[backend]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, 0.3, **opts)
    y.backward(layout(gy, is_channels_last(y)).to(dtype))
    return [y] + [t.grad for t in leaves] + ([None] if b is None else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, True)], ids=["fp32-nchw", "fp32-nhwc", "bf16-nhwc"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_keep_the_layout(name, channels_last, dtype, backend):
    """fp32 against the float64 NCHW reference; bf16 NHWC against the same backend's bf16 NCHW run
    (in bf16 the native conv output is rounded before its bias and activation, so a pre-activation
    near 0 can take the other leaky-ReLU slope than in float64: a property of bf16, not of the layout)."""
    x, w, b, opts = make(CASES[name], torch.float32, channels_last)
    n, cout = x.shape[0], w.shape[0]
    oh, ow = (2 * x.shape[2], 2 * x.shape[3]) if opts["upsample"] else x.shape[2:]
    gy = torch.randn(n, cout, oh, ow, generator=torch.Generator().manual_seed(1))
    got = _run(backend, x, w, b, opts, gy, dtype)
    if dtype == torch.float64 or dtype == torch.float32:
        want = _run("float64-reference", x.contiguous(), w, b, opts, gy, torch.float64)
    else:
        want = [t.double() if t is not None else None for t in _run(backend, x.contiguous(), w, b, opts, gy, dtype)]
    tol = TOL[dtype]
    for what, t, r in zip(("y", "dx", "dw", "db"), got, want):
        if r is None:
            continue
        assert t.dtype == dtype and t.shape == r.shape
        assert _rel_err(t, r) <= (1 if what == "y" else 2) * tol, (what, _rel_err(t, r))
    y, dx, dw = got[:3]
    assert_layout(y, x, "y")
    assert_layout(dx, x, "dx")
    if backend != "reference":
        assert_layout(dw, w, "dw")


def _penalty_grads(impl, x, params):
    """The WGAN-GP pattern on two stacked layers: d/dparams of ||d out / d x||^2."""
    xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
    h = impl(xi, params[0], params[1], 0.4, True, True, False)
    out = impl(h, params[2], params[3], 0.7, False, False, False)
    (gx,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype).view(1, -1, 1, 1)).sum(),
                                xi, create_graph=True)
    return gx, torch.autograd.grad(gx.square().sum(), params, allow_unused=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_on_channels_last_matches_the_reference(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64).contiguous(memory_format=CL)
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((4, 3, 3, 3), (4,), (5, 4, 1, 1), (5,))]
    gx, got = _penalty_grads(ca.IMPLEMENTATIONS[backend], x, params)
    assert_layout(gx, x, "d out / d x")
    _, want = _penalty_grads(ca.reference, x.contiguous(), params)
    for g, w in zip(got, want):
        if w is None or g is None:  # bias: leaky-ReLU's derivative is piecewise constant
            assert (w is None or not w.any()) and (g is None or not g.any())
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


GRAD_CASES = {  # float64, channels-last x: (x shape, Cout, k, upsample, pixel_norm)
    "3x3": ((1, 3, 3, 5), 4, 3, False, False),
    "up": ((1, 2, 3, 3), 3, 3, True, False),
    "up_pn": ((1, 2, 3, 3), 3, 3, True, True),
}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_and_gradgradcheck_on_channels_last(name, backend):
    shape, cout, k, up, pnorm = GRAD_CASES[name]
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(cout, shape[1], k, k, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(cout, dtype=torch.float64) + 0.1).requires_grad_()
    impl = ca.IMPLEMENTATIONS[backend]

    def fn(x, w, b):
        return impl(x, w, b, 0.3, True, up, pnorm)

    fast = backend == "triton"  # the interpreter is slow: random projections of the Jacobian
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=fast)


OPCHECK_CASES = {
    "3x3": ((2, 3, 3, 5), 5, 3, False, False, True, True),
    "up_pn_nobias": ((1, 3, 3, 3), 4, 3, True, True, True, False),
    "to_rgb_1x1": ((2, 6, 3, 3), 3, 1, False, False, False, True),
}


def _conv_ops():
    ops = []
    if ON_CPU_TRITON:
        ops.append(("triton", ca.TRITON))
    if _native.available():
        ops.append(("cpu", ca.NATIVE))
    return ops


@pytest.mark.parametrize("name,k", _conv_ops(), ids=[o[0] for o in _conv_ops()])
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_on_channels_last(case, name, k):
    x, w, b, opts = make(OPCHECK_CASES[case], torch.float32, True)
    x.requires_grad_(), w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    args = (x, w, b, 0.3, opts["activation"], opts["upsample"], opts["pixel_norm"])
    torch.library.opcheck(k.conv2d_bias_lrelu, args)
    y, r = k.conv2d_bias_lrelu(*args)
    assert_layout(y, x, "y")
    g = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(k.conv2d_bias_lrelu_backward, (g, x, w, b, y.detach(), r.detach(), *args[3:]))


@pytest.mark.skipif(not _native.available(), reason=_native.why_unavailable())
@pytest.mark.parametrize("activation,pixel_norm", [(True, True), (True, False), (False, False)])
def test_opcheck_native_epilogue_on_channels_last(activation, pixel_norm):
    n = _native.ops
    conv = torch.randn(2, 5, 3, 7).contiguous(memory_format=CL)
    b = torch.randn(5)
    torch.library.opcheck(n.conv_epilogue.default, (conv, b, 0.3, activation, pixel_norm))
    y, r = n.conv_epilogue.default(conv, b, 0.3, activation, pixel_norm)
    assert_layout(y, conv, "epilogue y")
    if activation or pixel_norm:  # otherwise g is the gradient itself (an alias, not for opcheck)
        torch.library.opcheck(n.conv_epilogue_backward.default,
                              (torch.randn(2, 5, 3, 7).contiguous(memory_format=CL), y, r, activation, pixel_norm))


COPY_OPS = {"aten::clone", "aten::copy_", "aten::contiguous", "aten::_to_copy", "aten::to"}


def copies_of(shapes, fn) -> list[str]:
    """The copy ops ``fn`` runs on a tensor of one of ``shapes`` (by the profiler's recorded input
    shapes). Weight copies have other shapes and are allowed.

    Under Triton's interpreter each kernel launch copies its arguments to and from host buffers as
    flat 1-d byte tensors, which this does not count (they are not of a 4-d activation shape): so
    the check is clean for the triton backend too, and sees every copy the op's own Python makes."""
    shapes = [list(s) for s in shapes]
    with profile(record_shapes=True) as prof:
        fn()
    return [f"{e.name}{e.input_shapes}" for e in prof.events()
            if e.name in COPY_OPS and any(list(s) in shapes for s in e.input_shapes)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["3x3_b1", "up_pn", "up_nobias"])
def test_no_hidden_copy(name, channels_last, backend):
    x, w, b, opts = make(CASES[name], torch.float32, channels_last)
    x.requires_grad_(), w.requires_grad_()
    y = ca.conv2d_bias_lrelu(x, w, b, 0.3, **opts, backend=backend)
    activations = {tuple(x.shape), tuple(y.shape), (x.shape[0], x.shape[1], *y.shape[2:])}  # + upsampled x
    dy = torch.randn_like(y)

    def forward_backward():
        ca.conv2d_bias_lrelu(x, w, b, 0.3, **opts, backend=backend).backward(dy)

    assert copies_of(activations, forward_backward) == []

    def double_backward():  # the gradient penalty's path: d/dw of ||d <y, dy> / dx||^2 (no pixel norm there)
        y = ca.conv2d_bias_lrelu(x, w, b, 0.3, opts["activation"], opts["upsample"], False, backend=backend)
        (gx,) = torch.autograd.grad((y * dy).sum(), x, create_graph=True)
        (gx * gx).sum().backward()  # not square(): pow converts its input (a copy of the test's own)

    assert copies_of(activations, double_backward) == []
    # The check can fail: an input in neither layout is copied to NCHW, and that copy is seen.
    odd = x.detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert copies_of([odd.shape], lambda: ca.conv2d_bias_lrelu(odd, w, b, 0.3, **opts, backend=backend)) != []


# ----- the CUDA epilogue kernels through the emulator (tests/test_cuda_emulated.py's runner) -------

@pytest.fixture(scope="module")
def emu():
    e = load_emulator()
    yield e
    e.configure()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation,pixel_norm", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["act-pn", "act", "pn", "linear"])
def test_cuda_epilogue_emulated(emu, activation, pixel_norm, channels_last, dtype):
    emu.configure(seed=5, max_grid_blocks=1)  # every grid-stride loop makes several passes
    emulated.run_conv_epilogue(emu, (2, 37, 3, 5), dtype, activation, pixel_norm, channels_last=channels_last)


# ----- the Triton kernels' GPU configs in NHWC (as tests/test_triton_conv_act.py does for NCHW) ---
# Under the interpreter the launcher takes fixed blocks; these take its GPU path (the autotuned
# launch) with one config at a time on channels-last inputs, on shapes that need several tiles in
# every direction, so every NHWC tiling's masks and addressing are checked without a GPU.

if "triton" in ca.IMPLEMENTATIONS and not torch.cuda.is_available():
    from progan_fast.ops.triton import conv_act as tca

    # The NHWC config lists (they differ from NCHW's where a config spills in NHWC), every kind.
    _ALL_CONV_CONFIGS = [(kind, None, cfg) for kind, cfgs in tca._CONV_CONFIGS_CL.items() for cfg in cfgs] + \
        [(kind, bucket, cfg) for (kind, bucket), cfgs in tca._CONV_PN_CONFIGS_CL.items() for cfg in cfgs]
else:
    _ALL_CONV_CONFIGS = []


# The NCHW file's config ids and its fixture that makes the launcher take its GPU path on CPU tensors.
from test_triton_conv_act import _config_id, gpu_launch_path  # noqa: E402, F401 (a fixture)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path")
@pytest.mark.parametrize("entry", _ALL_CONV_CONFIGS, ids=_config_id)
def test_every_forward_config_on_channels_last(entry, gpu_launch_path):
    """Every NHWC config, NHWC in and out. CPU tensors launch the fp32 "ieee" or the fp64 product,
    so the TF32 and tensor-core configs' tiling runs through the "ieee" kernel (their dot only
    differs on a GPU), as the NCHW file does."""
    kind, bucket, cfg = entry
    dtype = torch.float64 if kind == "fp64" else torch.float32
    launched = "fp64" if kind == "fp64" else "ieee"
    plain_tuned, fused_tuned = tca._conv_fwd_tuned_by_layout[True]
    bk = cfg.kwargs["BLOCK_K"]
    cin = 2 * bk + 3 if bk > 1 else 5  # two whole channel chunks and a partial one
    if bucket is None:
        cout = cfg.kwargs["BLOCK_N"] + 5  # a second, partial output-channel tile
        opts = dict(activation=True, upsample=True, pixel_norm=False)
        tuned = plain_tuned[launched]
    else:
        cout = bucket // 2 + 3
        opts = dict(activation=True, upsample=True, pixel_norm=True)
        tuned = fused_tuned[(launched, bucket)]
    gpu_launch_path(tuned, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, 3, 3, generator=g, dtype=dtype).contiguous(memory_format=CL)  # M = 36
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    y, _ = torch.ops.progan_fast.conv2d_bias_lrelu(x, w, b, 0.1, **opts)
    assert_layout(y, x, "y")
    want = ca.reference(x.double().contiguous(), w.double(), b.double(), 0.1, **opts)
    assert _rel_err(y, want) <= (1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path")
@pytest.mark.parametrize("cfg", tca._ACT_BWD_CONFIGS_CL if _ALL_CONV_CONFIGS else [], ids=lambda c: str(c.kwargs))
def test_every_backward_config_on_channels_last(cfg, gpu_launch_path):
    gpu_launch_path(tca._act_bwd_tuned_cl, cfg)
    cout = 2 * cfg.kwargs["BLOCK_C"] + 3  # several channel blocks and a partial one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64).contiguous(memory_format=CL)  # partial BLOCK_P
    w = torch.randn(cout, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True)
    x = x.requires_grad_()
    xr, wr, br = (t.detach().contiguous().requires_grad_() for t in (x, w, bias))
    opts = dict(activation=True, upsample=False, pixel_norm=True)
    y = ca.conv2d_bias_lrelu(x, w, bias, 0.2, **opts, backend="triton")
    yr = ca.reference(xr, wr, br, 0.2, **opts)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy.contiguous(memory_format=CL))
    yr.backward(gy)
    assert_layout(x.grad, x, "dx")
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (bias.grad, br.grad)):
        assert _rel_err(got, want) <= 1e-10
