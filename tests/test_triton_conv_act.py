"""conv2d_bias_lrelu's Triton backend against the eager reference (under the interpreter without a GPU).

The conv is the slowest kernel under the interpreter, so shapes are small and gradcheck /
gradgradcheck use ``fast_mode`` (random projections of the Jacobian) except on a 1x1 dense case.
"""

import importlib

import pytest
import torch

ca = importlib.import_module("progan_fast.ops.conv_act")
pn = importlib.import_module("progan_fast.ops.pixel_norm")
pytestmark = pytest.mark.skipif("triton" not in ca.IMPLEMENTATIONS, reason="Triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |triton - reference_fp64| / max |reference_fp64|
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}

# (x shape, Cout, k, upsample, pixel_norm, activation, bias)
CASES = {
    "3x3": ((2, 5, 8, 8), 7, 3, False, False, True, True),
    "3x3_b1_noact_nobias": ((1, 3, 4, 4), 5, 3, False, False, False, False),
    "dense_1x1": ((3, 48, 1, 1), 40, 1, False, False, True, True),
    "upsample": ((2, 5, 4, 4), 7, 3, True, False, True, True),
    "pixel_norm": ((2, 5, 8, 8), 7, 3, False, True, True, True),
    "up_pn_nobias": ((1, 6, 4, 4), 5, 3, True, True, True, False),
    "to_rgb_1x1": ((2, 5, 8, 8), 3, 1, False, False, False, True),
    "dense_pn": ((2, 32, 1, 1), 48, 1, False, True, True, True),
    "to_gray_1x1": ((2, 5, 8, 8), 1, 1, False, False, False, True),  # --channels 1: toRGB to one channel
    "from_gray_1x1": ((2, 1, 8, 8), 6, 1, False, False, True, True),  # and fromRGB from one
}


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _make(case, dtype, seed=0):
    shape, cout, k, up, pnorm, act, has_bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = torch.randn(cout, shape[1], k, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(cout, generator=g).to(DEVICE, dtype) if has_bias else None
    return x, w, b, dict(activation=act, upsample=up, pixel_norm=pnorm)


def _check_against_reference(x, w, b, opts, scale, tol):
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    bt = leaves[2] if b is not None else None
    br = refs[2] if b is not None else None
    y = ca.conv2d_bias_lrelu(leaves[0], leaves[1], bt, scale, **opts, backend="triton")
    yr = ca.reference(refs[0], refs[1], br, scale, **opts)
    assert y.dtype == x.dtype and y.shape == yr.shape
    assert _rel_err(y, yr) <= tol, ("forward", _rel_err(y, yr))
    gy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    y.backward(gy.to(x.dtype))
    yr.backward(gy.double())
    for name, t, r in zip(("dx", "dw", "db"), leaves, refs):
        assert t.grad.dtype == t.dtype
        assert _rel_err(t.grad, r.grad) <= 2 * tol, (name, _rel_err(t.grad, r.grad))


@pytest.mark.parametrize("dtype", [d if d == torch.float32 else pytest.param(d, marks=pytest.mark.slow)  # fp32 fast
                                   for d in TOL], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_match_the_reference(name, dtype):
    x, w, b, opts = _make(CASES[name], dtype)
    _check_against_reference(x, w, b, opts, 0.3, TOL[dtype])


@pytest.mark.slow  # under the interpreter: tens of seconds
@pytest.mark.parametrize("res,up", [(32, False), (64, True)])
def test_large_resolutions_with_few_channels(res, up):
    # The stages 32x32 and 64x64 (the 64x64 one as G's upsampling conv from 32x32), kept cheap for
    # the interpreter with 3 -> 5 channels, in fp32 and bf16.
    side = res // 2 if up else res
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, opts = _make(((1, 3, side, side), 5, 3, up, True, True, True), dtype, seed=res)
        _check_against_reference(x, w, b, opts, 0.25, TOL[dtype])


def test_16x16_fp32():
    x, w, b, opts = _make(((1, 4, 16, 16), 6, 3, False, True, True, True), torch.float32)
    _check_against_reference(x, w, b, opts, 0.2, TOL[torch.float32])


def test_wide_pixel_norm_falls_back_to_the_pixel_norm_op(monkeypatch):
    monkeypatch.setattr(ca, "PN_FUSE_MAX_COUT", 4)
    calls = []
    real = ca.pixel_norm_triton
    monkeypatch.setattr(ca, "pixel_norm_triton", lambda *a: calls.append(1) or real(*a))
    for case in (CASES["pixel_norm"], CASES["dense_pn"]):
        x, w, b, opts = _make(case, torch.float32)
        _check_against_reference(x, w, b, opts, 0.3, TOL[torch.float32])
    assert len(calls) == 2


def test_fused_pixel_norm_does_not_call_the_pixel_norm_op(monkeypatch):
    monkeypatch.setattr(ca, "pixel_norm_triton", None)  # would raise if called
    x, w, b, opts = _make(CASES["pixel_norm"], torch.float32)
    ca.conv2d_bias_lrelu(x, w, b, 0.3, **opts, backend="triton")


def test_non_contiguous_input():
    x = torch.randn(2, 6, 5, 4, device=DEVICE).transpose(2, 3)
    w, b = torch.randn(5, 6, 3, 3, device=DEVICE), torch.randn(5, device=DEVICE)
    torch.testing.assert_close(ca.conv2d_bias_lrelu(x, w, b, 0.2, backend="triton"), ca.reference(x, w, b, 0.2),
                               rtol=1e-5, atol=1e-5)


def _d(*shape):
    return torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)


# (x shape, Cout, k, upsample, pixel_norm, activation, bias)
GRAD_CASES = {
    "3x3": ((1, 2, 3, 3), 3, 3, False, False, True, True),
    "3x3_noact_nobias": ((2, 3, 2, 3), 2, 3, False, False, False, False),
    "act_nobias": ((1, 2, 3, 3), 3, 3, False, False, True, False),
    "up": ((1, 2, 2, 2), 3, 3, True, False, True, True),
    "up_pn": ((1, 2, 2, 2), 3, 3, True, True, True, True),
    "pn_1x1_noact_nobias": ((1, 2, 2, 2), 3, 1, True, True, False, False),
    "dense": ((2, 4, 1, 1), 5, 1, False, False, True, True),
}


def _grad_inputs(case):
    shape, cout, k, up, pnorm, act, has_bias = case
    x, w = _d(*shape), _d(cout, shape[1], k, k)
    # bias + 5 keeps pre-activations away from leaky-ReLU's kink, where finite differences lie
    b = (torch.randn(cout, dtype=torch.float64, device=DEVICE) + 5).requires_grad_() if has_bias else None
    fn = lambda x, w, b=None: ca.triton_impl(x, w, b, 0.3, act, up, pnorm)  # noqa: E731
    return fn, ((x, w, b) if has_bias else (x, w))


@pytest.mark.slow  # under the interpreter: tens of seconds
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_and_gradgradcheck(name):
    torch.manual_seed(0)
    fn, inputs = _grad_inputs(GRAD_CASES[name])
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=name != "dense")  # one full Jacobian check
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_double_backward_matches_the_reference_gradient_penalty():
    """The WGAN-GP pattern on two stacked layers: d/dparams of ||d out / d x||^2 (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    params = [_d(4, 3, 3, 3), _d(4), _d(5, 4, 1, 1), _d(5)]
    results = []
    for impl in (ca.triton_impl, ca.reference):
        xi = x.clone().requires_grad_()
        h = impl(xi, params[0], params[1], 0.4, True, False, False)
        out = impl(h, params[2], params[3], 0.7, False, False, False)
        (gx,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[1]).view(1, -1, 1, 1)).sum(), xi,
                                    create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), params, allow_unused=True))
    for got, want in zip(*results):
        if want is None or got is None:  # bias: leaky-ReLU's derivative is piecewise constant
            assert (want is None or not want.any()) and (got is None or not got.any())
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


OPCHECK_CASES = [
    ((2, 3, 3, 3), 5, 3, False, False, True, True),
    ((1, 3, 2, 2), 4, 3, True, True, True, False),
    ((3, 6, 1, 1), 5, 1, False, False, False, True),
]


@pytest.mark.slow  # under the interpreter: tens of seconds
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["3x3", "up_pn_nobias", "dense_noact"])
def test_opcheck(case):
    x, w, b, opts = _make(case, torch.float32)
    x.requires_grad_(), w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    args = (x, w, b, 0.3, opts["activation"], opts["upsample"], opts["pixel_norm"])
    torch.library.opcheck(ca._conv_op, args)
    y, r = ca._conv_op(*args)
    g = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(ca._conv_backward_op, (g, x, w, b, y.detach(), r.detach(), *args[3:]))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="channels"):
        ca.triton_impl(torch.zeros(1, 3, 4, 4), torch.zeros(2, 4, 3, 3), None, 1.0)
    with pytest.raises(ValueError, match="odd"):
        ca.conv2d_bias_lrelu(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 2, 2), None, 1.0, backend="triton")


# ----- on a GPU: stage shapes ------------------------------------------------------------------

def _gpu_check(shape, cout, k, dtype, tol, **opts):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(cout, shape[1], k, k, device="cuda", dtype=dtype)
    b = torch.randn(cout, device="cuda", dtype=dtype) * 0.1
    scale = 2 ** 0.5 / (shape[1] * k * k) ** 0.5
    _check_against_reference(x, w, b, opts, scale, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,cout,k,opts", [
    ((16, 512, 8, 8), 512, 3, {}),
    ((16, 512, 4, 4), 512, 3, {"upsample": True, "pixel_norm": True}),
    ((8, 64, 64, 64), 64, 3, {"pixel_norm": True}),
    ((8, 128, 32, 32), 64, 3, {"upsample": True, "pixel_norm": True}),
    ((8, 64, 64, 64), 3, 1, {"activation": False}),
    ((16, 512, 1, 1), 8192, 1, {"pixel_norm": True}),
    ((16, 8192, 1, 1), 512, 1, {}),
], ids=["16x512x8x8", "up_pn_512", "8x64x64x64_pn", "up_pn_64", "to_rgb", "g_input_dense", "d_dense"])
def test_stage_shapes_on_gpu(shape, cout, k, opts, dtype):
    _gpu_check(shape, cout, k, dtype, 2e-2 if dtype == torch.bfloat16 else 1e-4, **opts)


@pytest.mark.cuda
def test_gradgradcheck_on_gpu():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    b = (torch.randn(4, dtype=torch.float64, device="cuda") + 5).requires_grad_()
    fn = lambda x, w, b: ca.triton_impl(x, w, b, 0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


# ----- the fp32 precision policy ---------------------------------------------------------------

@pytest.fixture
def restore_precision():
    levels = (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends)
    saved = [level.fp32_precision for level in levels]
    yield levels
    for level, value in zip(levels, saved):
        level.fp32_precision = value


def test_the_fp32_policy_follows_pytorchs_cudnn_conv_switch(restore_precision):
    from progan_fast.ops.common import fp32_conv_uses_tf32
    from progan_fast.ops.triton.conv_act import product_kind

    conv, cudnn, generic = restore_precision
    conv.fp32_precision, cudnn.fp32_precision, generic.fp32_precision = "tf32", "none", "none"
    assert fp32_conv_uses_tf32()
    conv.fp32_precision = "ieee"
    assert not fp32_conv_uses_tf32()
    conv.fp32_precision = "none"  # defers to cuDNN's, then the generic setting, as PyTorch does
    assert not fp32_conv_uses_tf32()
    cudnn.fp32_precision = "tf32"
    assert fp32_conv_uses_tf32()
    cudnn.fp32_precision, generic.fp32_precision = "none", "tf32"
    assert fp32_conv_uses_tf32()
    torch.backends.cudnn.allow_tf32 = False  # the legacy switch lands on the same flag
    generic.fp32_precision = "none"
    assert not fp32_conv_uses_tf32()
    # the Triton kernel's product follows it for CUDA tensors; CPU (interpreter) convs are exact
    conv.fp32_precision = "tf32"
    assert product_kind(torch.empty(1)) == "ieee"
    assert product_kind(torch.empty(1, dtype=torch.float64)) == "fp64"
    assert product_kind(torch.empty(1, dtype=torch.bfloat16)) == "tensor_core"
    fake_cuda = torch.empty(1, device="meta")
    fake_cuda.__class__ = _OnCuda
    assert product_kind(fake_cuda) == "tf32"
    conv.fp32_precision = "ieee"
    assert product_kind(fake_cuda) == "ieee"


class _OnCuda(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_precision_policy_on_gpu(tf32, restore_precision):
    """With TF32 allowed every conv of the op (forward in Triton, backward in cuDNN) runs TF32 and
    stays within TF32's error; with it refused, every conv is exact to fp32 rounding."""
    restore_precision[0].fp32_precision = "tf32" if tf32 else "ieee"
    from progan_fast.ops.triton.conv_act import product_kind

    torch.manual_seed(0)
    x, w = torch.randn(4, 64, 16, 16, device="cuda"), torch.randn(64, 64, 3, 3, device="cuda")
    b, opts = torch.randn(64, device="cuda"), dict(activation=True, upsample=False, pixel_norm=False)
    assert product_kind(x) == ("tf32" if tf32 else "ieee")
    _check_against_reference(x, w, b, opts, 2 ** 0.5 / (64 * 9) ** 0.5, 5e-3 if tf32 else 4e-5)


# ----- the GPU tile paths, under the interpreter ------------------------------------------------
# Under the interpreter the launcher picks one tile covering each test case, so the K loop over
# channel chunks, several output-channel tiles, partial M tiles and the GPU configs would never
# run. These tests take the GPU path (the autotuned launch) with one config at a time, on shapes
# that need several tiles in every direction: Cin > BLOCK_K, Cout > BLOCK_N, M % BLOCK_M != 0.
# (Under the interpreter the dot is always computed on fp32 operands: the tensor-core and TF32
# configs' tiling is checked here, their arithmetic only on a GPU.)

if "triton" in ca.IMPLEMENTATIONS and not torch.cuda.is_available():
    from progan_fast.ops.triton import conv_act as tca

    _ALL_CONV_CONFIGS = [(kind, None, cfg) for kind, cfgs in tca._CONV_CONFIGS.items() for cfg in cfgs] + \
        [(kind, bucket, cfg) for (kind, bucket), cfgs in tca._CONV_PN_CONFIGS.items() for cfg in cfgs]
else:
    _ALL_CONV_CONFIGS = []


def interpreter_distinct(entries):
    """The configs that differ under the interpreter, one each: it ignores num_warps and num_stages,
    and CPU tensors launch the "ieee" kernel for the fp32, TF32 and tensor-core kinds alike, so two
    configs with the same block sizes (and kind after that mapping, and pixel-norm bucket) compile and
    run the same program. The dropped ones are the same test run twice here; on a GPU every config
    compiles on its own (tests/test_triton_gpu_configs.py, the kernel report)."""
    seen, out = set(), []
    for kind, bucket, cfg in entries:
        key = ("fp64" if kind == "fp64" else "ieee", bucket, tuple(sorted(cfg.kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append((kind, bucket, cfg))
    return out


def _config_id(entry):
    kind, bucket, cfg = entry
    return f"{kind}{'-pn' + str(bucket) if bucket else ''}-" + "x".join(str(v) for v in cfg.kwargs.values())


@pytest.fixture
def gpu_launch_path(monkeypatch):
    """Make the launcher take its GPU path (the autotuned kernels) on CPU tensors; returns a
    function that restricts an autotuner to one config (one config is launched without timing)."""
    monkeypatch.setattr(tca, "on_interpreter", lambda t: False)

    def only(tuned, cfg):
        monkeypatch.setattr(tuned, "configs", [cfg])
        monkeypatch.setattr(tuned, "cache", {})

    return only


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path")
@pytest.mark.parametrize("entry", interpreter_distinct(_ALL_CONV_CONFIGS), ids=_config_id)
def test_every_forward_config_on_several_tiles(entry, gpu_launch_path):
    kind, bucket, cfg = entry
    dtype = torch.float64 if kind == "fp64" else torch.float32
    launched = "fp64" if kind == "fp64" else "ieee"  # what CPU tensors launch: the config is run through it
    bk = cfg.kwargs["BLOCK_K"]
    cin = 2 * bk + 3 if bk > 1 else 5  # two whole channel chunks and a partial one
    if bucket is None:
        cout = cfg.kwargs["BLOCK_N"] + 5  # a second, partial output-channel tile
        opts = dict(activation=True, upsample=True, pixel_norm=False)
        tuned = tca._conv_fwd_tuned[launched]
    else:
        cout = bucket // 2 + 3  # fused pixel norm: one tile of next_pow2(Cout) == bucket channels
        opts = dict(activation=True, upsample=True, pixel_norm=True)
        tuned = tca._conv_fwd_pn_tuned[(launched, bucket)]
    gpu_launch_path(tuned, cfg)
    m_tile = cfg.kwargs["BLOCK_M"]
    n, h = 1, 3  # M = 1 * 6 * 6 = 36 output pixels: not a multiple of any BLOCK_M
    assert (n * 4 * h * h) % m_tile != 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, h, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    y, _ = torch.ops.progan_fast.conv2d_bias_lrelu(x, w, b, 0.1, **opts)
    want = ca.reference(x.double(), w.double(), b.double(), 0.1, **opts)
    assert _rel_err(y, want) <= (1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path")
@pytest.mark.parametrize("cfg", tca._ACT_BWD_CONFIGS if _ALL_CONV_CONFIGS else [], ids=lambda c: str(c.kwargs))
def test_every_backward_config_on_several_tiles(cfg, gpu_launch_path):
    gpu_launch_path(tca._act_bwd_tuned, cfg)
    cout = 2 * cfg.kwargs["BLOCK_C"] + 3  # several channel blocks and a partial one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)  # 120 pixels: a partial BLOCK_P of 128
    w = torch.randn(cout, 4, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    x = x.requires_grad_()
    w, bias = w.requires_grad_(), bias.requires_grad_()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    opts = dict(activation=True, upsample=False, pixel_norm=True)
    y = ca.conv2d_bias_lrelu(x, w, bias, 0.2, **opts, backend="triton")
    yr = ca.reference(xr, wr, br, 0.2, **opts)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    yr.backward(gy)
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (bias.grad, br.grad)):
        assert _rel_err(got, want) <= 1e-10
