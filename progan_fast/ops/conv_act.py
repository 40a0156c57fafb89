"""Equalized-learning-rate convolution + bias + leaky-ReLU (ProGAN paper, section 4.1).

Weights are stored ~N(0, 1) and scaled at run time by ``scale = gain / sqrt(fan_in)``, so Adam's
per-parameter step size acts on every layer at the same dynamic range. One call computes a whole
layer: ``y = conv(x, w) * scale + b``, then leaky-ReLU(0.2) when ``activation``.

Options that later fused kernels compute without writing intermediate tensors, given here so the
networks call one op per layer and a fused backend slots in without touching them:

- ``upsample=True``: nearest 2x upsample of ``x`` first (the generator block's first conv);
- ``pixel_norm=True``: pixelwise normalization of the result (every generator conv).

A 1x1 kernel on an ``[N, C, 1, 1]`` input is a dense layer; the networks use it that way.
Padding is "same" (``k // 2``) for odd kernels.

Backends:

- ``reference``: eager PyTorch (upsampled tensor, ``F.conv2d``, ``leaky_relu``, pixel norm).
- ``triton``: the custom op ``progan_fast::conv2d_bias_lrelu`` -> ``(y, r)``, one kernel and one
  pass over memory: an implicit GEMM (rows M = N*H*W output pixels, columns = Cout,
  K = k*k*Cin as one flat loop over (tap, Cin chunk)) reading NCHW ``x`` directly and writing NCHW
  ``y``. ``upsample`` is folded into the input addressing (source pixel = output-space tap // 2,
  zero padding at the upsampled size): no upsampled tensor is ever written. The epilogue, in
  registers: ``* scale``, ``+ bias`` (None allowed), leaky-ReLU(0.2), and with ``pixel_norm``
  (when one program's BLOCK_N = next_pow2(Cout) <= 512 covers every output channel) the
  per-pixel normalization, saving ``r = rsqrt(mean(a^2) + eps)`` per pixel (``[N, 1, H, W]``,
  fp32) for the backward. Wider pixel-normed layers (the generator's dense 4x4 input layer,
  Cout = 16 * 512 = 8192) run the conv unfused and then ``progan_fast::pixel_norm`` (one more
  read and write of the output). A 1x1 conv reads the weight in place (``[Cout, Cin]`` is
  K-contiguous): on ``[N, C, 1, 1]`` it is a plain GEMM; a 3x3 weight is permuted once per call
  to ``[k, k, Cin, Cout]`` so each tap's slab is Cout-contiguous.
  ``tl.dot`` accumulates in fp32. fp32 inputs use ``input_precision="ieee"`` (Triton's default
  would be TF32, about 1e-3 relative error), so fp32 results match the reference within fp32
  rounding, at FMA speed; bf16 / fp16 inputs use tensor cores. Under the interpreter every dot is
  done on fp32 operands (the interpreter's bf16 ``tl.dot`` returns garbage in triton 3.9). fp64
  inputs (gradcheck, and the GPU-vs-CPU tests) accumulate in fp64 without ``tl.dot``, which
  refuses an fp64 accumulator in triton 3.6: one input channel per step (``BLOCK_K = 1``), a
  rank-1 update of fp64 FMAs.
  Offsets are int32: tensors of 2**31 elements or more are refused.

  Backward (``progan_fast::conv2d_bias_lrelu_backward`` -> ``(dx, dw, db)``): one Triton kernel
  computes ``g = lrelu'(pre) * pixel_norm'(grad)`` from the saved output (``y > 0`` exactly where
  ``pre > 0``; pixel norm's backward is ``r * (dy - y * mean_c(dy * y))`` in terms of ``y`` and
  ``r``) and writes per-program partial bias sums (reduced by one small ``sum``). Without
  activation and pixel norm ``g`` is ``grad`` itself and only the bias sums are computed. The
  conv's data and weight gradients are ATen's ``convolution_backward`` on ``g`` with the weight
  times ``scale`` (``dw`` times ``scale``); with ``upsample`` it runs on the upsampled input and
  ``dx`` is summed over each 2x2 block (the adjoint of nearest upsampling).

  Double backward (this op sits inside the WGAN-GP penalty): the backward op's own autograd is
  written out in differentiable ATen ops (``conv2d``, ``convolution_backward``): the backward is
  bilinear in ``(g, x)`` and ``(g, w)``, and leaky-ReLU's mask is piecewise constant, so
  ``d/dgrad = m * (conv(U gdx, s w) + s conv(U x, gdw) + gdb)``, ``d/dx = s U^T conv_input_grad(g,
  gdw)``, ``d/dw = s conv_weight_grad(U gdx, g)``. With pixel norm (generator only, never
  double-differentiated in training) the pre-activation is recomputed and ``h`` is pulled back
  through the reference's per-pixel activation + pixel-norm backward by autograd; no conv is
  itself double-differentiated.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import _backend, _native, _triton
from ._triton import tl, triton
from .fade_in import upsample2x_reference
from .pixel_norm import _pixel_norm_op
from .pixel_norm import reference as pixel_norm_reference

NEGATIVE_SLOPE = 0.2


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    activation: bool = True,
    upsample: bool = False,
    pixel_norm: bool = False,
) -> torch.Tensor:
    """Eager reference. Scaling the (small) weight instead of the (large) output is the same math
    and what the official code does."""
    if upsample:
        x = upsample2x_reference(x)
    y = F.conv2d(x, weight * scale, bias, padding=weight.shape[-1] // 2)
    if activation:
        y = F.leaky_relu(y, NEGATIVE_SLOPE)
    if pixel_norm:
        y = pixel_norm_reference(y)
    return y


IMPLEMENTATIONS = {"reference": reference}


def conv2d_bias_lrelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    activation: bool = True,
    upsample: bool = False,
    pixel_norm: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``x`` ``[N, Cin, H, W]``, ``weight`` ``[Cout, Cin, k, k]`` (k odd), ``bias`` ``[Cout]`` or None."""
    if weight.shape[-1] % 2 == 0 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"conv2d_bias_lrelu: kernel must be square and odd, got {tuple(weight.shape)}")
    return _backend.dispatch("conv2d_bias_lrelu", IMPLEMENTATIONS, backend,
                             x, weight, bias, scale, activation, upsample, pixel_norm)


# ----- Triton backend ---------------------------------------------------------------------------

#: Largest Cout whose pixel norm is fused into the conv's epilogue (one program's BLOCK_N covers
#: every output channel of its pixels). Wider layers (the generator's 4x4 dense input layer, 8192
#: features) run the conv without pixel norm and then ``progan_fast::pixel_norm``.
_PN_LIMIT = 512  # the widest BLOCK_N the fused kernel is configured (and spill-checked) for
PN_FUSE_MAX_COUT = _PN_LIMIT
PIXEL_NORM_EPS = 1e-8

if triton is not None:

    @triton.jit
    def _conv_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, scale,
        M, Cin, H, W, Cout, OH, OW, stride_wt, stride_wc, stride_wo,
        KSIZE: tl.constexpr, UPSAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
        PIXEL_NORM: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
    ):
        """Implicit GEMM: rows = output pixels (n, oh, ow), columns = Cout, K = (tap, Cin)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        ohw = OH * OW
        n = offs_m // ohw
        p = offs_m % ohw
        oh = p // OW
        ow = p % OW
        hw = H * W
        x_base = n * Cin * hw  # int32 offsets: the wrapper checks every tensor has < 2**31 elements
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Cout
        PAD: tl.constexpr = KSIZE // 2
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        # One flat K loop over (tap, Cin chunk), so the pipeliner sees a single loop.
        n_chunks = tl.cdiv(Cin, BLOCK_K)
        for kk in range(0, KSIZE * KSIZE * n_chunks):
            t = kk // n_chunks
            c0 = (kk - t * n_chunks) * BLOCK_K
            ih = oh + (t // KSIZE - PAD)
            iw = ow + (t % KSIZE - PAD)
            valid = m_mask & (ih >= 0) & (ih < OH) & (iw >= 0) & (iw < OW)
            if UPSAMPLE:  # nearest 2x: output-space tap -> source pixel (negatives are masked)
                ih = ih // 2
                iw = iw // 2
            ck = c0 + tl.arange(0, BLOCK_K)
            k_mask = ck < Cin
            a = tl.load(x_ptr + ((x_base + ih * W + iw)[:, None] + ck[None, :] * hw),
                        mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptr + t * stride_wt + ck[:, None] * stride_wc + offs_n[None, :] * stride_wo,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if ACC == tl.float64:  # triton 3.6's tl.dot refuses a float64 accumulator: FMAs instead
                tl.static_assert(BLOCK_K == 1)  # a [BLOCK_M, 1] x [1, BLOCK_N] product: a rank-1 update
                acc += a.to(ACC) * b.to(ACC)
            elif IEEE:
                acc = tl.dot(a.to(ACC), b.to(ACC), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.to(a.dtype), acc)
        out = acc * scale
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
        if ACTIVATION:
            out = tl.where(out > 0, out, out * 0.2)
        if PIXEL_NORM:  # BLOCK_N >= Cout: this program holds every channel of its pixels
            r = 1.0 / tl.sqrt(tl.sum(out * out, axis=1) / Cout + 1e-8)
            out = out * r[:, None]
            tl.store(r_ptr + offs_m, r.to(r_ptr.dtype.element_ty), mask=m_mask)
        y_offs = (n * Cout * ohw + p)[:, None] + offs_n[None, :] * ohw
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _act_bwd_kernel(
        dy_ptr, y_ptr, r_ptr, g_ptr, part_ptr, C, P,
        ACTIVATION: tl.constexpr, PIXEL_NORM: tl.constexpr, STORE_G: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    ):
        """g = lrelu'(y) * pixel_norm'(dy) from the saved output; per-program partial bias sums."""
        n = tl.program_id(0)
        pb = tl.program_id(1)
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        base = n.to(tl.int64) * C * P
        part_row = part_ptr + (n.to(tl.int64) * tl.num_programs(1) + pb) * C
        if PIXEL_NORM:
            # With a = y / r (the pre-norm activation): dL/da = r * (dy - y * mean_c(dy * y)).
            s = tl.zeros([BLOCK_P], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                offs = base + c[:, None] * P + p[None, :]
                mask = (c[:, None] < C) & p_mask[None, :]
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
                y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
                s += tl.sum(dy * y, axis=0)
            s = s / C
            r = tl.load(r_ptr + n.to(tl.int64) * P + p, mask=p_mask, other=0.0).to(ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * P + p[None, :]
            mask = (c[:, None] < C) & p_mask[None, :]
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            if ACTIVATION or PIXEL_NORM:
                y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
                if PIXEL_NORM:
                    g = r[None, :] * (g - y * s[None, :])
                if ACTIVATION:  # y > 0 exactly where the pre-activation is > 0 (slope and r > 0)
                    g = tl.where(y > 0, g, g * 0.2)
            if STORE_G:
                tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
            tl.store(part_row + c, tl.sum(g, axis=1), mask=c < C)

    def _cfgs(rows, with_n=True):
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if with_n else ("BLOCK_M", "BLOCK_K")
        return [triton.Config(dict(zip(keys, r[:len(keys)])), num_warps=r[-2], num_stages=r[-1]) for r in rows]

    # GPU configs per kind of product (_product_kind), chosen so that none spills on sm_80 / sm_90
    # with triton 3.6 or 3.9 (tests/test_triton_kernel_report.py; CI runs it on both).
    # "ieee" (fp32): input_precision="ieee", an FMA dot that holds whole K slices in registers:
    # small BLOCK_K (16, the smallest triton 3.6 accepts). "tensor_core" (bf16 / fp16): tensor cores.
    # "fp64" (gradcheck and the GPU-vs-CPU tests, never training): rank-1 updates, BLOCK_K 1, one
    # stage (with two, 64x64 spills on triton 3.9). (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages):
    _CONV_CONFIGS = {
        "ieee": _cfgs([(128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (64, 64, 16, 4, 2), (32, 64, 16, 4, 2),
                       (64, 32, 16, 4, 2), (32, 32, 16, 4, 2), (128, 32, 16, 4, 2)]),
        "tensor_core": _cfgs([(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (32, 128, 32, 4, 3),
                              (64, 32, 32, 4, 3), (16, 128, 64, 4, 3), (128, 16, 32, 4, 3), (32, 32, 64, 4, 3)]),
        "fp64": _cfgs([(64, 64, 1, 8, 1), (32, 64, 1, 4, 1)]),
    }
    # Fused pixel norm: BLOCK_N = next_pow2(Cout) is fixed by the wrapper; configs per BLOCK_N bucket
    # (<= 128, 256, 512) as (BLOCK_M, BLOCK_K, warps, stages), keyed by (kind, bucket). The widest
    # fp32 tiles (64 x 256, 32 x 512: 64 accumulators a thread) run one stage: with a second one
    # triton 3.6 spills them (8-16 B; 16 warps spill too, at 128 registers a thread); 3.9 does not.
    # The smaller BLOCK_M next to them keeps two stages and gives low resolutions more programs.
    _PN_BUCKETS = (128, 256, 512)
    _CONV_PN_CONFIGS = {
        ("ieee", 128): _cfgs([(64, 16, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)], with_n=False),
        ("ieee", 256): _cfgs([(64, 16, 8, 1), (32, 16, 8, 2)], with_n=False),
        ("ieee", 512): _cfgs([(32, 16, 8, 1), (16, 16, 8, 2)], with_n=False),
        ("tensor_core", 128): _cfgs([(64, 32, 8, 3), (32, 32, 4, 3), (16, 32, 8, 3)], with_n=False),
        ("tensor_core", 256): _cfgs([(64, 32, 8, 3), (32, 32, 8, 3)], with_n=False),
        ("tensor_core", 512): _cfgs([(32, 32, 8, 3), (16, 32, 8, 3)], with_n=False),
        ("fp64", 128): _cfgs([(32, 1, 8, 1)], with_n=False),
        ("fp64", 256): _cfgs([(16, 1, 8, 1)], with_n=False),
        ("fp64", 512): _cfgs([(16, 1, 8, 1)], with_n=False),
    }
    _ACT_BWD_CONFIGS = [
        triton.Config({"BLOCK_C": bc}, num_warps=w) for bc, w in [(8, 4), (16, 4), (32, 4), (32, 8)]
    ]
    _KEY = ["M", "Cin", "Cout", "OH", "OW", "KSIZE", "UPSAMPLE", "PIXEL_NORM"]
    _conv_fwd_tuned = {kind: triton.autotune(cfgs, key=_KEY)(_conv_fwd_kernel) for kind, cfgs in _CONV_CONFIGS.items()}
    _conv_fwd_pn_tuned = {k: triton.autotune(cfgs, key=_KEY)(_conv_fwd_kernel) for k, cfgs in _CONV_PN_CONFIGS.items()}
    _act_bwd_tuned = triton.autotune(_ACT_BWD_CONFIGS, key=["C", "P", "BLOCK_P", "ACTIVATION", "PIXEL_NORM"])(
        _act_bwd_kernel)

    def _aot_specs() -> list:
        """Every compilation the kernel-report test checks (fp32 and bf16 activations, and fp64 for
        the forward's own fp64 path): the 3x3 upsampling conv (the heaviest addressing) for every
        config, the 1x1 (dense) conv for the unfused configs, the fused pixel norm at each bucket's
        widest BLOCK_N."""
        specs = []
        ints = {k: "i32" for k in ("M", "Cin", "H", "W", "Cout", "OH", "OW", "stride_wt", "stride_wc", "stride_wo")}
        for dt, kind in (("fp32", "ieee"), ("bf16", "tensor_core"), ("fp64", "fp64")):
            acc, r_type = (tl.float64, "*fp64") if dt == "fp64" else (tl.float32, "*fp32")
            sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "r_ptr": r_type,
                   "scale": "fp32", **ints}
            flags = {"HAS_BIAS": True, "ACTIVATION": True, "IEEE": kind != "tensor_core", "ACC": acc}
            for ksize, up in ((3, True), (1, False)):
                for cfg in _CONV_CONFIGS[kind]:
                    specs.append(_triton.AotSpec(
                        f"conv_fwd_k{ksize}:{dt}", _conv_fwd_kernel, sig,
                        {**flags, "KSIZE": ksize, "UPSAMPLE": up, "PIXEL_NORM": False, **cfg.kwargs},
                        cfg.num_warps, cfg.num_stages))
            for bucket in _PN_BUCKETS:
                for cfg in _CONV_PN_CONFIGS[(kind, bucket)]:
                    specs.append(_triton.AotSpec(
                        f"conv_fwd_pn{bucket}:{dt}", _conv_fwd_kernel, sig,
                        {**flags, "KSIZE": 3, "UPSAMPLE": True, "PIXEL_NORM": True, "BLOCK_N": bucket, **cfg.kwargs},
                        cfg.num_warps, cfg.num_stages))
            if dt == "fp64":  # the backward kernel has no fp64-only code
                continue
            bsig = {"dy_ptr": f"*{dt}", "y_ptr": f"*{dt}", "r_ptr": "*fp32", "g_ptr": f"*{dt}", "part_ptr": "*fp32",
                    "C": "i32", "P": "i32"}
            for cfg in _ACT_BWD_CONFIGS:
                specs.append(_triton.AotSpec(f"conv_act_bwd:{dt}", _act_bwd_kernel, bsig,
                                             {"ACTIVATION": True, "PIXEL_NORM": True, "STORE_G": True, "BLOCK_P": 128,
                                              "ACC": tl.float32, **cfg.kwargs}, cfg.num_warps, cfg.num_stages))
        return specs

    AOT_SPECS = _aot_specs()
else:
    AOT_SPECS = []


def _on_interpreter(t: torch.Tensor) -> bool:
    return _triton.INTERPRETER and t.device.type == "cpu"


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _product_kind(t: torch.Tensor) -> str:
    """The forward kernel's product for inputs like ``t`` on a GPU, which selects its configs: fp64
    rank-1 updates, an IEEE fp32 dot, or a tensor-core (bf16 / fp16) dot."""
    if t.dtype == torch.float64:
        return "fp64"
    return "ieee" if t.dtype == torch.float32 else "tensor_core"


def _forward(x, weight, bias, scale, activation, upsample, pixel_norm):
    _triton.check_device("conv2d_bias_lrelu", *([x, weight] if bias is None else [x, weight, bias]))
    x = x.contiguous()
    n, cin, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[-1]
    if weight.shape[1] != cin:
        raise ValueError(f"conv2d_bias_lrelu: input has {cin} channels, weight {tuple(weight.shape)}")
    if pixel_norm and cout > _PN_LIMIT:
        raise ValueError(f"conv2d_bias_lrelu: fused pixel norm needs Cout <= {_PN_LIMIT}, got {cout}")
    oh, ow = (2 * h, 2 * w) if upsample else (h, w)
    if max(x.numel(), n * cout * oh * ow) >= 2**31:
        raise ValueError("conv2d_bias_lrelu (triton): tensors of 2**31 elements or more are not supported")
    y = torch.empty(n, cout, oh, ow, device=x.device, dtype=x.dtype)
    r = torch.empty((n, 1, oh, ow) if pixel_norm else (0,), device=x.device, dtype=_acc_dtype(x))
    m = n * oh * ow
    if y.numel() == 0:
        return y, r
    if k == 1:  # [Cout, Cin, 1, 1] is already K-contiguous: read it as is (dense layers: a plain GEMM)
        wk = weight.reshape(cout, cin)
        strides = (0, wk.stride(1), wk.stride(0))
    else:  # [k, k, Cin, Cout]: each tap's [Cin, Cout] slab is Cout-contiguous
        wk = weight.permute(2, 3, 1, 0).contiguous()
        strides = (cin * cout, cout, 1)
    if x.dtype == torch.float64:  # the kernel's float argument is fp32: keep float64 scaling exact
        wk, scale = wk * scale, 1.0
    b = bias.contiguous() if bias is not None else wk  # dummy pointer, never read
    acc = _triton.compute_dtype(x)
    ieee = x.dtype in (torch.float32, torch.float64) or _on_interpreter(x)  # interpreter: bf16 tl.dot is wrong
    args = (x, wk, b, y, r if pixel_norm else y, float(scale), m, cin, h, w, cout, oh, ow, *strides)
    flags = dict(KSIZE=k, UPSAMPLE=upsample, HAS_BIAS=bias is not None, ACTIVATION=activation,
                 PIXEL_NORM=pixel_norm, IEEE=ieee, ACC=acc)
    block_n_pn = max(16, triton.next_power_of_2(cout))
    kind = _product_kind(x)
    if _on_interpreter(x):
        bm = min(128, max(16, triton.next_power_of_2(m)))
        bn = block_n_pn if pixel_norm else min(128, block_n_pn)
        bk = 1 if kind == "fp64" else min(64, max(16, triton.next_power_of_2(cin)))  # fp64: rank-1 updates
        _conv_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(cout, bn))](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **flags)
    elif pixel_norm:
        bucket = next(b for b in _PN_BUCKETS if block_n_pn <= b)
        _conv_fwd_pn_tuned[(kind, bucket)][lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), 1)](
            *args, BLOCK_N=block_n_pn, **flags)
    else:
        _conv_fwd_tuned[kind][lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))](
            *args, **flags)
    return y, r


def _upsample(x):
    return upsample2x_reference(x)


def _upsample_adjoint(g):
    n, c, h2, w2 = g.shape
    return g.reshape(n, c, h2 // 2, 2, w2 // 2, 2).sum((3, 5))


def _conv_input_weight_grads(g, x_in, weight, mask):
    """ATen's convolution backward for a stride-1 "same" conv: (grad wrt x_in, grad wrt weight)."""
    pad = weight.shape[-1] // 2
    dx, dw, _ = torch.ops.aten.convolution_backward(
        g, x_in, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [mask[0], mask[1], False])
    return dx, dw


def _backward(grad, x, weight, bias, y, r, scale, activation, upsample, pixel_norm):
    _triton.check_device("conv2d_bias_lrelu_backward", grad, x, weight, y)
    grad, x, y = grad.contiguous(), x.contiguous(), y.contiguous()
    n, cout, oh, ow = y.shape
    p = oh * ow
    acc_t = _acc_dtype(y)
    store_g = activation or pixel_norm
    g = torch.empty_like(y) if store_g else grad
    if _on_interpreter(y):
        block_p = min(1024, triton.next_power_of_2(p))
    else:
        block_p = min(128, triton.next_power_of_2(p))
    num_pb = triton.cdiv(p, block_p)
    part = torch.empty(n * num_pb, cout, device=y.device, dtype=acc_t)
    if y.numel():
        args = (grad, y, r if pixel_norm else y, g, part, cout, p)
        flags = dict(ACTIVATION=activation, PIXEL_NORM=pixel_norm, STORE_G=store_g, BLOCK_P=block_p,
                     ACC=_triton.compute_dtype(y))
        if _on_interpreter(y):
            _act_bwd_kernel[(n, num_pb)](*args, BLOCK_C=min(64, triton.next_power_of_2(cout)), **flags)
        else:
            _act_bwd_tuned[(n, num_pb)](*args, **flags)
    db = part.sum(0).to(bias.dtype if bias is not None else weight.dtype)
    x_in = _upsample(x) if upsample else x
    dx, dw = _conv_input_weight_grads(g, x_in, (weight * scale).to(x.dtype), (True, True))
    if upsample:
        dx = _upsample_adjoint(dx)
    return dx, (dw * scale).to(weight.dtype), db


@torch.library.custom_op("progan_fast::conv2d_bias_lrelu", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, activation: bool,
             upsample: bool, pixel_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, r)``: ``r`` ``[N, 1, H, W]`` is pixel norm's per-pixel ``rsqrt(mean(a^2) + eps)``
    (saved for the backward), an empty tensor without pixel norm."""
    return _forward(x, weight, bias, scale, activation, upsample, pixel_norm)


@_conv_op.register_fake
def _conv_op_fake(x, weight, bias, scale, activation, upsample, pixel_norm):
    n, _, h, w = x.shape
    oh, ow = (2 * h, 2 * w) if upsample else (h, w)
    y = x.new_empty(n, weight.shape[0], oh, ow)
    r = x.new_empty((n, 1, oh, ow) if pixel_norm else (0,), dtype=_acc_dtype(x))
    return y, r


@torch.library.custom_op("progan_fast::conv2d_bias_lrelu_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      y: torch.Tensor, r: torch.Tensor, scale: float, activation: bool, upsample: bool,
                      pixel_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of the forward op given ``grad`` = dL/dy and its saved ``y``, ``r``."""
    return _backward(grad, x, weight, bias, y, r, scale, activation, upsample, pixel_norm)


@_conv_backward_op.register_fake
def _conv_backward_op_fake(grad, x, weight, bias, y, r, scale, activation, upsample, pixel_norm):
    db_dtype = bias.dtype if bias is not None else weight.dtype
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0], dtype=db_dtype))


def _setup(ctx, inputs, output):
    x, weight, bias, scale, activation, upsample, pixel_norm = inputs
    y, r = output
    ctx.save_for_backward(x, weight, bias, y, r)
    ctx.opts = (scale, activation, upsample, pixel_norm)
    ctx.set_materialize_grads(False)


def _conv_autograd(k, ctx, grad_y, grad_r):
    # grad_r is always None: r never reaches the caller, and the double backward sends no grad to it.
    x, weight, bias, y, r = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None, None
    dx, dw, db = k.conv2d_bias_lrelu_backward(grad_y, x, weight, bias, y, r, *ctx.opts)
    return dx, dw, (db if bias is not None else None), None, None, None, None


def _setup_bwd(ctx, inputs, output):
    grad, x, weight, bias, y, r, scale, activation, upsample, pixel_norm = inputs
    ctx.save_for_backward(grad, x, weight, bias, y)
    ctx.opts = (scale, activation, upsample, pixel_norm)
    ctx.set_materialize_grads(False)


def _conv_backward_autograd(ctx, gdx, gdw, gdb):
    """Derivative of the backward op's ``(dx, dw, db)`` wrt ``(grad, x, weight, bias)``.

    The backward is ``g = A(grad, pre)`` (leaky-ReLU' and pixel norm's backward, per pixel),
    ``db = sum(g)``, ``dx = U^T conv_input_grad(g, s w)``, ``dw = s conv_weight_grad(U x, g)``
    (``U``: the optional 2x upsample, ``pre`` = conv + bias). Given ``(gdx, gdw, gdb)``:

    - ``h = d/dg = conv(U gdx, s w) + s conv(U x, gdw) + gdb`` (adjoints of the bilinear conv terms);
    - ``d/dx += s U^T conv_input_grad(g, gdw)`` and ``d/dw += s conv_weight_grad(U gdx, g)``;
    - without pixel norm ``A = m(y) * grad`` with ``m`` in {1, 0.2} piecewise constant, so
      ``d/dgrad = m * h`` and nothing flows to ``pre`` (or ``y``, ``bias``): all in differentiable
      ATen ops (``conv2d``, ``convolution_backward``), the path the WGAN-GP penalty takes;
    - with pixel norm (generator only, never inside the penalty) ``pre`` is recomputed and ``h``
      is pulled back through the reference's per-pixel ``A`` by autograd, and the ``pre`` part
      goes on to ``x``, ``w``, ``bias`` through ATen's convolution backward (no conv is
      double-differentiated, which also keeps torch.compile's dynamic-shape tracing working).
    """
    grad, x, weight, bias, y = ctx.saved_tensors
    scale, activation, upsample, pixel_norm = ctx.opts
    if gdx is None and gdw is None and gdb is None:
        return (None,) * 10
    pad = weight.shape[-1] // 2
    x_in = _upsample(x) if upsample else x
    w_eff = (weight * scale).to(x.dtype)
    gdx_in = (_upsample(gdx) if upsample else gdx) if gdx is not None else None
    h = None
    if gdx_in is not None:
        h = F.conv2d(gdx_in, w_eff, padding=pad)
    if gdw is not None:
        t = F.conv2d(x_in, (gdw * scale).to(x.dtype), padding=pad)
        h = t if h is None else h + t
    if gdb is not None:
        t = gdb.to(grad.dtype).view(1, -1, 1, 1)
        h = t.expand_as(grad) if h is None else h + t
    g_pre = g_b = None
    if pixel_norm:
        with torch.no_grad():
            pre = F.conv2d(x_in, w_eff, bias, padding=pad)
        with torch.enable_grad():
            grad_, pre_ = grad.detach().requires_grad_(), pre.requires_grad_()
            a = F.leaky_relu(pre_, NEGATIVE_SLOPE) if activation else pre_
            (g,) = torch.autograd.grad(pixel_norm_reference(a, PIXEL_NORM_EPS), pre_, grad_, create_graph=True)
            g_grad, g_pre = torch.autograd.grad(g, (grad_, pre_), h)
        g = g.detach()
    else:
        # leaky-ReLU's derivative from the saved output, applied as ATen's leaky_relu_backward does
        g = torch.where(y > 0, grad, grad * NEGATIVE_SLOPE) if activation else grad
        g_grad = torch.where(y > 0, h, h * NEGATIVE_SLOPE) if activation else h
    g_x = g_w = None
    if gdw is not None:  # dw = s conv_weight_grad(U x, g)  ->  d/dx = s U^T conv_input_grad(g, gdw)
        g_x, _ = _conv_input_weight_grads(g, x_in, (gdw * scale).to(x.dtype), (True, False))
    if gdx_in is not None:  # dx = U^T conv_input_grad(g, s w)  ->  d/dw = s conv_weight_grad(U gdx, g)
        _, g_w = _conv_input_weight_grads(g, gdx_in, w_eff, (False, True))
    if g_pre is not None:  # pre = conv(U x, s w) + bias
        gi, gw = _conv_input_weight_grads(g_pre, x_in, w_eff, (True, True))
        g_x = gi if g_x is None else g_x + gi
        g_w = gw if g_w is None else g_w + gw
        g_b = g_pre.sum((0, 2, 3)).to(bias.dtype) if bias is not None else None
    if g_x is not None and upsample:
        g_x = _upsample_adjoint(g_x)
    if g_w is not None:
        g_w = (g_w * scale).to(weight.dtype)
    return g_grad, g_x, g_w, g_b, None, None, None, None, None, None





def _register_autograd(k) -> None:
    """First and second derivatives of one pair of ops (Triton's or the native library's)."""
    torch.library.register_autograd(k.conv2d_bias_lrelu, functools.partial(_conv_autograd, k), setup_context=_setup)
    torch.library.register_autograd(k.conv2d_bias_lrelu_backward, _conv_backward_autograd, setup_context=_setup_bwd)


_register_autograd(SimpleNamespace(conv2d_bias_lrelu=_conv_op, conv2d_bias_lrelu_backward=_conv_backward_op))


def triton_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    activation: bool = True,
    upsample: bool = False,
    pixel_norm: bool = False,
) -> torch.Tensor:
    fuse = pixel_norm and weight.shape[0] <= PN_FUSE_MAX_COUT
    y, _ = _conv_op(x, weight, bias, float(scale), activation, upsample, fuse)
    if pixel_norm and not fuse:
        y = _pixel_norm_op(y, PIXEL_NORM_EPS)
    return y


if _triton.available():
    IMPLEMENTATIONS["triton"] = triton_impl


# ----- native backend (progan_fast._C: ATen conv + our fused epilogue, CPU twin and CUDA kernel) ----
#
# ``progan_fast_native::conv2d_bias_lrelu`` -> ``(y, r)`` with the Triton op's signature and
# autograd (the double backward above is written in ATen ops, so it serves both): a thin C++
# composite that runs ATen's conv (oneDNN on the CPU, cuDNN on CUDA) with the *unscaled* weight,
# then ``progan_fast_native::conv_epilogue``: one pass that applies scale, bias, leaky-ReLU and
# (any Cout) pixel norm, saving r. Its backward is ``conv_epilogue_backward`` (g and the bias
# gradient in one pass, deterministic partial sums) and ATen's convolution_backward with the weight
# times scale. Our own implicit-GEMM conv is not used here: on the CPU oneDNN's conv is what the
# reference runs too, and the epilogue is where the reference makes extra passes.

if _native.available():
    NATIVE = SimpleNamespace(conv2d_bias_lrelu=_native.ops.conv2d_bias_lrelu.default,
                             conv2d_bias_lrelu_backward=_native.ops.conv2d_bias_lrelu_backward.default)

    @torch.library.register_fake("progan_fast_native::conv_epilogue")
    def _conv_epilogue_fake(conv, bias, scale, activation, pixel_norm):
        n, _, h, w = conv.shape
        r = conv.new_empty((n, 1, h, w) if pixel_norm else (0,), dtype=_acc_dtype(conv))
        return torch.empty_like(conv, memory_format=torch.contiguous_format), r

    @torch.library.register_fake("progan_fast_native::conv_epilogue_backward")
    def _conv_epilogue_backward_fake(grad, y, r, activation, pixel_norm):
        return torch.empty_like(y, memory_format=torch.contiguous_format), y.new_empty(y.shape[1],
                                                                                         dtype=_acc_dtype(y))

    torch.library.register_fake(NATIVE.conv2d_bias_lrelu, _conv_op_fake)
    torch.library.register_fake(NATIVE.conv2d_bias_lrelu_backward, _conv_backward_op_fake)
    _register_autograd(NATIVE)


def native_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    activation: bool = True,
    upsample: bool = False,
    pixel_norm: bool = False,
) -> torch.Tensor:
    y, _ = NATIVE.conv2d_bias_lrelu(x, weight, bias, float(scale), activation, upsample, pixel_norm)
    return y


_native.register(IMPLEMENTATIONS, native_impl)
