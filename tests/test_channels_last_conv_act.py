"""conv2d_bias_lrelu on channels-last (NHWC) activations, on every backend here.

Each backend (``reference``; ``triton`` under the interpreter; ``cpu``, the C++ composite of ATen's
conv and the epilogue twins) runs forward and backward on random NHWC inputs with odd shapes (batch
1, channel counts that are not powers of two, odd H and W) against an independent float64 formula;
the triton and cpu backends must return ``y`` and ``dx`` in ``x``'s memory format and ``dw`` in the
weight's. Also: the double backward (the gradient penalty's path) against the reference's, gradcheck
and gradgradcheck in float64 on channels-last inputs, opcheck of every custom op on channels-last
inputs, "no hidden copy" of an activation in both layouts, and every NHWC Triton config. NCHW:
tests/test_native.py, tests/test_triton_conv_act.py, tests/test_ops.py; the CUDA epilogue kernels
in both layouts through the emulator: tests/test_cuda_emulated.py.
"""

import importlib

import pytest
import torch

from layout_checks import activation_copies, layout
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


def independent_conv(x, w, b, scale, activation, upsample, pixel_norm, positive=None):
    """conv2d_bias_lrelu in float64 by another route than ``ca.reference`` (which the backends'
    results were once checked against with ``ca.reference`` itself on the reference's row): the
    upsample by repeat_interleave, the convolution as a sum of one channel product per kernel tap on
    a zero-padded input, leaky-ReLU by torch.where, pixel norm by sqrt. ``positive`` (optional)
    picks leaky-ReLU's branch per element: a low-precision run whose pre-activation rounds to the
    other side of 0 is then compared on its own branch (tests/test_native.py does the same)."""
    x, w = x.double(), w.double() * scale
    if upsample:
        x = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    n, _, h, wd = x.shape
    k = w.shape[-1]
    p = k // 2
    padded = x.new_zeros(n, x.shape[1], h + 2 * p, wd + 2 * p)
    padded[:, :, p:p + h, p:p + wd] = x
    y = sum(torch.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + wd], w[:, :, i, j])
            for i in range(k) for j in range(k))
    if b is not None:
        y = y + b.double().view(1, -1, 1, 1)
    if activation:
        y = torch.where(y > 0 if positive is None else positive, y, y * 0.2)
    if pixel_norm:
        y = y / (y * y).mean(dim=1, keepdim=True).add(1e-8).sqrt()
    return y


def _run(backend, x, w, b, opts, gy, dtype, positive=None):
    """``(y, dx, dw, db)`` of one backend in ``dtype`` for the output gradient ``gy``."""
    leaves = [t.to(dtype).clone(memory_format=torch.preserve_format).requires_grad_()
              for t in (x, w) + ((b,) if b is not None else ())]
    if backend == "independent":
        y = independent_conv(leaves[0], leaves[1], leaves[2] if b is not None else None, 0.3, **opts,
                             positive=positive)
    else:
        y = ca.IMPLEMENTATIONS[backend](leaves[0], leaves[1], leaves[2] if b is not None else None, 0.3, **opts)
    y.backward(layout(gy, is_channels_last(y)).to(y.dtype))
    return [y] + [t.grad for t in leaves] + ([None] if b is None else [])


# NCHW rows are not here: tests/test_native.py (cpu), tests/test_triton_conv_act.py (triton) and
# tests/test_ops.py (reference) check them. bf16 runs the same kernels with other loads and stores.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_keep_the_layout(name, dtype, backend):
    """NHWC in ``dtype`` against an independent float64 formula on the same (rounded) inputs,
    leaky-ReLU's branch taken from the backend's output (in bf16 the native conv output is rounded
    before its bias and activation, so a pre-activation near 0 can take the other slope than in
    float64): none may differ in fp32, at most 2% in bf16."""
    x, w, b, opts = make(CASES[name], dtype, True)
    n, cout = x.shape[0], w.shape[0]
    oh, ow = (2 * x.shape[2], 2 * x.shape[3]) if opts["upsample"] else x.shape[2:]
    gy = torch.randn(n, cout, oh, ow, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _run(backend, x, w, b, opts, gy, dtype)
    positive = got[0].detach().double() > 0
    want = _run("independent", x.contiguous(), w, b, opts, gy, torch.float64, positive)
    if opts["activation"]:
        plain = independent_conv(x, w, b, 0.3, opts["activation"], opts["upsample"], False)
        other_side = (positive != (plain > 0)).double().mean().item()
        assert other_side <= (0.02 if dtype == torch.bfloat16 else 0.0), f"{other_side:.1%} of the slopes differ"
    tol = TOL[dtype]
    for what, t, r in zip(("y", "dx", "dw", "db"), got, want):
        if r is None:
            continue
        assert t.dtype == dtype and t.shape == r.shape
        # gradients are sums: twice the output's tolerance, three times in bf16, where eager's
        # bias gradient sums in bf16 (0.042 seen for dense_to_4x4's, on the reference)
        grad_scale = 3 if dtype == torch.bfloat16 else 2
        assert _rel_err(t, r) <= (1 if what == "y" else grad_scale) * tol, (what, _rel_err(t, r))
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


@pytest.mark.slow
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


@pytest.mark.slow
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

    assert activation_copies(forward_backward, activations) == []

    def double_backward():  # the gradient penalty's path: d/dw of ||d <y, dy> / dx||^2 (no pixel norm there)
        y = ca.conv2d_bias_lrelu(x, w, b, 0.3, opts["activation"], opts["upsample"], False, backend=backend)
        (gx,) = torch.autograd.grad((y * dy).sum(), x, create_graph=True)
        (gx * gx).sum().backward()  # not square(): pow converts its input (a copy of the test's own)

    assert activation_copies(double_backward, activations) == []
    # The check can fail: an input in neither layout is copied to NCHW, and that copy is seen.
    odd = x.detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert activation_copies(lambda: ca.conv2d_bias_lrelu(odd, w, b, 0.3, **opts, backend=backend), [odd.shape]) != []


# The CUDA epilogue kernels in NHWC through the emulator: tests/test_cuda_emulated.py
# (test_conv_epilogue_channels_last), which kernels/emulation/mutants.py runs.


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
from test_triton_conv_act import _config_id, gpu_launch_path, interpreter_distinct  # noqa: E402, F401 (a fixture)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path")
@pytest.mark.parametrize("entry", interpreter_distinct(_ALL_CONV_CONFIGS), ids=_config_id)
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


@pytest.mark.slow
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
