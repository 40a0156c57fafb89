"""Triton kernels of conv2d_bias_lrelu (see :mod:`progan_fast.ops.conv_act`).

Forward (``_conv_fwd_kernel``): one kernel and one pass over memory, an implicit GEMM (rows
M = N*H*W output pixels, columns = Cout, K = k*k*Cin as one flat loop over (tap, Cin chunk))
reading ``x`` directly and writing ``y`` in ``x``'s layout, NCHW or NHWC (channels-last), through
the channel and pixel strides of their ``[N, C, P]`` views (the sample stride is ``C * P`` in both
layouts). The layout is a constexpr (``CHANNELS_LAST``) from which the kernel takes the strides, so
the stride that is 1 is a compile-time constant: in NHWC each A tile ``[BLOCK_M, BLOCK_K]`` is
loaded contiguous over input channels and each output tile is stored contiguous over Cout; in NCHW
both are contiguous over pixels, and the NCHW compilation is the one from before channels-last
(runtime stride arguments cost the fused pixel norm's widest fp32 tile a register spill on sm_90).
``upsample`` is folded into the input addressing (source pixel = output-space tap // 2, zero
padding at the upsampled size): no upsampled tensor is ever written. The epilogue, in registers:
``* scale``, ``+ bias`` (None allowed), leaky-ReLU(0.2), and with ``pixel_norm`` (when one
program's BLOCK_N = next_pow2(Cout) <= :data:`PIXEL_NORM_MAX_COUT` covers every output channel)
the per-pixel normalization, saving ``r = rsqrt(mean(a^2) + eps)`` per pixel (``[N, 1, H, W]``,
fp32, dense in both layouts) for the backward. A 1x1 conv reads the weight in place
(``[Cout, Cin]`` is K-contiguous): on ``[N, C, 1, 1]`` it is a plain GEMM; a 3x3 weight is
permuted once per call to ``[k, k, Cin, Cout]`` so each tap's slab is Cout-contiguous.

``tl.dot`` accumulates in fp32. fp32 inputs follow the project's one fp32 conv precision policy,
PyTorch's cuDNN switch (:func:`progan_fast.ops.common.fp32_conv_uses_tf32`): TF32 tensor cores
(``input_precision="tf32"``, about 1e-3 relative error, like cuDNN's TF32 convs) where PyTorch
allows TF32 for convolutions (its default), an exact FMA dot (``"ieee"``) that matches the
reference within fp32 rounding where it does not; bf16 / fp16 inputs use tensor cores. Under the interpreter every dot is
done on fp32 operands (the interpreter's bf16 ``tl.dot`` returns garbage in triton 3.9). fp64
inputs (gradcheck, and the GPU-vs-CPU tests) accumulate in fp64 without ``tl.dot``, which refuses
an fp64 accumulator in triton 3.6: one input channel per step (``BLOCK_K = 1``), a rank-1 update
of fp64 FMAs. Offsets are int32: the op refuses tensors of 2**31 elements or more.

Backward (``_act_bwd_kernel``, strided like the forward: NCHW or NHWC, contiguous over pixels or
over channels): ``g = lrelu'(pre) * pixel_norm'(grad)`` from the saved output
(``y > 0`` exactly where ``pre > 0``; pixel norm's backward is ``r * (dy - y * mean_c(dy * y))``
in terms of ``y`` and ``r``), plus per-program partial bias sums (reduced by one small ``sum``).
Without activation and pixel norm ``g`` is ``grad`` itself and only the bias sums are computed.
The convolution's own gradients are ATen's (see :mod:`progan_fast.ops.conv_act`).
"""

from __future__ import annotations

import torch

from ..common import fp32_conv_uses_tf32, ncp_strides
from . import AotSpec, compute_dtype, on_interpreter, tl, triton

#: Largest Cout whose pixel norm the forward kernel fuses (one program's BLOCK_N covers every
#: output channel of its pixels): the widest BLOCK_N it is configured (and spill-checked) for.
PIXEL_NORM_MAX_COUT = 512

if triton is not None:

    @triton.jit
    def _conv_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, scale,
        M, Cin, H, W, Cout, OH, OW, stride_wt, stride_wc, stride_wo,
        CHANNELS_LAST: tl.constexpr, KSIZE: tl.constexpr, UPSAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        PIXEL_NORM: tl.constexpr, IEEE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
    ):
        """Implicit GEMM: rows = output pixels (n, oh, ow), columns = Cout, K = (tap, Cin). ``x`` and
        ``y`` are addressed through their (channel, pixel) strides: (H*W, 1) and (OH*OW, 1) in NCHW,
        (1, Cin) and (1, Cout) in NHWC (``CHANNELS_LAST``)."""
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
        if CHANNELS_LAST:
            stride_xc, stride_xp, stride_yc, stride_yp = 1, Cin, 1, Cout
        else:
            stride_xc, stride_xp, stride_yc, stride_yp = hw, 1, ohw, 1
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
            a = tl.load(x_ptr + ((x_base + (ih * W + iw) * stride_xp)[:, None] + ck[None, :] * stride_xc),
                        mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptr + t * stride_wt + ck[:, None] * stride_wc + offs_n[None, :] * stride_wo,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if ACC == tl.float64:  # triton 3.6's tl.dot refuses a float64 accumulator: FMAs instead
                tl.static_assert(BLOCK_K == 1)  # a [BLOCK_M, 1] x [1, BLOCK_N] product: a rank-1 update
                acc += a.to(ACC) * b.to(ACC)
            elif IEEE:  # fp32 operands: "ieee" (exact FMAs) or "tf32" (tensor cores), by policy
                acc = tl.dot(a.to(ACC), b.to(ACC), acc, input_precision=DOT_PRECISION)
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
        y_offs = (n * Cout * ohw + p * stride_yp)[:, None] + offs_n[None, :] * stride_yc
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _act_bwd_kernel(
        dy_ptr, y_ptr, r_ptr, g_ptr, part_ptr, C, P, sn, sc, sp,
        ACTIVATION: tl.constexpr, PIXEL_NORM: tl.constexpr, STORE_G: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    ):
        """g = lrelu'(y) * pixel_norm'(dy) from the saved output; per-program partial bias sums. ``dy``,
        ``y`` and ``g`` share the ``[N, C, P]`` strides ``(sn, sc, sp)``; ``r`` is ``[N, P]``."""
        n = tl.program_id(0)
        pb = tl.program_id(1)
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        base = n.to(tl.int64) * sn
        part_row = part_ptr + (n.to(tl.int64) * tl.num_programs(1) + pb) * C
        if PIXEL_NORM:
            # With a = y / r (the pre-norm activation): dL/da = r * (dy - y * mean_c(dy * y)).
            s = tl.zeros([BLOCK_P], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                offs = base + c[:, None] * sc + p[None, :] * sp
                mask = (c[:, None] < C) & p_mask[None, :]
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
                y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
                s += tl.sum(dy * y, axis=0)
            s = s / C
            r = tl.load(r_ptr + n.to(tl.int64) * P + p, mask=p_mask, other=0.0).to(ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = base + c[:, None] * sc + p[None, :] * sp
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
    # small BLOCK_K (16, the smallest triton 3.6 accepts); 64 x 128 runs one stage (with two, triton 3.6
    # spills 8 B on sm_80 once compiled with the launch's divisibility-16 specialization). "tensor_core" (bf16 / fp16): tensor cores.
    # "tf32" (fp32 where PyTorch allows TF32 convs): tensor cores on fp32 operands, which take twice
    # the registers and shared memory of bf16 ones: the tensor-core tiles with fewer stages, and
    # BLOCK_K 16 where 32 spills (64 x 128 on sm_80; 32 x 128 on sm_90 once compiled with the
    # launch's divisibility-16 specialization, 8 B on triton 3.9); the fused pixel norm's tiles are narrower in
    # M than the "ieee" ones (64 x 256 spills on sm_90, and 512-wide tiles with BLOCK_K 32 on 3.6).
    # "fp64" (gradcheck and the GPU-vs-CPU tests, never training): rank-1 updates, BLOCK_K 1, one
    # stage (with two, 64x64 spills on triton 3.9). (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages):
    _CONV_CONFIGS = {
        "ieee": _cfgs([(128, 64, 16, 8, 2), (64, 128, 16, 8, 1), (64, 64, 16, 4, 2), (32, 64, 16, 4, 2),
                       (64, 32, 16, 4, 2), (32, 32, 16, 4, 2), (128, 32, 16, 4, 2)]),
        "tensor_core": _cfgs([(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (32, 128, 32, 4, 3),
                              (64, 32, 32, 4, 3), (16, 128, 64, 4, 3), (128, 16, 32, 4, 3), (32, 32, 64, 4, 3)]),
        "tf32": _cfgs([(128, 64, 32, 8, 2), (64, 128, 16, 8, 2), (64, 64, 32, 4, 2), (32, 128, 16, 4, 2),
                       (64, 32, 32, 4, 2), (128, 16, 32, 4, 2), (32, 32, 32, 4, 2)]),
        "fp64": _cfgs([(64, 64, 1, 8, 1), (32, 64, 1, 4, 1)]),
    }
    # Fused pixel norm: BLOCK_N = next_pow2(Cout) is fixed by the wrapper; configs per BLOCK_N bucket
    # (<= 128, 256, 512) as (BLOCK_M, BLOCK_K, warps, stages), keyed by (kind, bucket). The widest
    # fp32 tiles (64 x 256, 32 x 512: 64 accumulators a thread) run one stage: with a second one
    # triton 3.6 spills them; 3.9 does not. So does 32 x 256 (with two stages, 8 B on sm_80 with the
    # launch's divisibility-16 specialization, triton 3.9). The other smaller BLOCK_M keep two stages
    # and give low resolutions more programs.
    _PN_BUCKETS = (128, 256, 512)
    _CONV_PN_CONFIGS = {
        ("ieee", 128): _cfgs([(64, 16, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)], with_n=False),
        ("ieee", 256): _cfgs([(64, 16, 8, 1), (32, 16, 8, 1)], with_n=False),
        ("ieee", 512): _cfgs([(32, 16, 8, 1), (16, 16, 8, 2)], with_n=False),
        ("tensor_core", 128): _cfgs([(64, 32, 8, 3), (32, 32, 4, 3), (16, 32, 8, 3)], with_n=False),
        ("tensor_core", 256): _cfgs([(64, 32, 8, 3), (32, 32, 8, 3)], with_n=False),
        ("tensor_core", 512): _cfgs([(32, 32, 8, 3), (16, 32, 8, 3)], with_n=False),
        ("tf32", 128): _cfgs([(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 8, 2)], with_n=False),
        ("tf32", 256): _cfgs([(32, 32, 8, 2), (16, 32, 8, 2)], with_n=False),
        ("tf32", 512): _cfgs([(32, 16, 8, 1), (16, 16, 8, 1)], with_n=False),
        ("fp64", 128): _cfgs([(32, 1, 8, 1)], with_n=False),
        ("fp64", 256): _cfgs([(16, 1, 8, 1)], with_n=False),
        ("fp64", 512): _cfgs([(16, 1, 8, 1)], with_n=False),
    }
    _ACT_BWD_CONFIGS = [
        triton.Config({"BLOCK_C": bc}, num_warps=w) for bc, w in [(8, 4), (16, 4), (32, 4), (32, 8)]
    ]
    # NHWC: the same configs but where one spills with triton 3.6 (the GPU machines') in that layout,
    # replaced by its BLOCK_K-halved twin (regs/spill on sm_80 with 3.6: tf32 128x16x32 255/32 B ->
    # 128x16x16 178/0; bf16 16x128x64 255/32 B -> 16x128x32 232/0; bf16 fused pixel norm 512-wide,
    # BLOCK_M 32 and 16 with BLOCK_K 32: 152 B and 32 B -> BLOCK_K 16 254/0 and 227/0). Compiled with
    # the launch's divisibility-16 specialization (triton 3.9): ieee 64x32x16 spills 8 B on sm_80 with
    # two stages -> one stage 71/0; bf16 16x128x32 24 B on sm_90 -> 16x128x16 64/0.
    _NHWC_REPLACEMENTS = {
        "ieee": {(64, 32, 16, 4, 2): (64, 32, 16, 4, 1)},
        "tf32": {(128, 16, 32, 4, 2): (128, 16, 16, 4, 2)},
        "tensor_core": {(16, 128, 64, 4, 3): (16, 128, 16, 4, 3)},
        ("tensor_core", 512): {(32, 32, 8, 3): (32, 16, 8, 3), (16, 32, 8, 3): (16, 16, 8, 3)},
    }

    def _nhwc_configs(key, cfgs):
        out = []
        for c in cfgs:
            row = (*c.kwargs.values(), c.num_warps, c.num_stages)
            row = _NHWC_REPLACEMENTS.get(key, {}).get(row, row)
            out += _cfgs([row], with_n="BLOCK_N" in c.kwargs)
        return out

    _CONV_CONFIGS_CL = {kind: _nhwc_configs(kind, cfgs) for kind, cfgs in _CONV_CONFIGS.items()}
    _CONV_PN_CONFIGS_CL = {key: _nhwc_configs(key, cfgs) for key, cfgs in _CONV_PN_CONFIGS.items()}
    _CONV_CONFIGS_BY_LAYOUT = {False: (_CONV_CONFIGS, _CONV_PN_CONFIGS), True: (_CONV_CONFIGS_CL, _CONV_PN_CONFIGS_CL)}
    _KEY = ["M", "Cin", "Cout", "OH", "OW", "KSIZE", "UPSAMPLE", "PIXEL_NORM", "CHANNELS_LAST"]
    # Autotuners per layout: {False: (per kind, per (kind, bucket)), True: the same for NHWC}.
    _conv_fwd_tuned_by_layout = {
        cl: ({kind: triton.autotune(cfgs, key=_KEY)(_conv_fwd_kernel) for kind, cfgs in plain.items()},
             {k: triton.autotune(cfgs, key=_KEY)(_conv_fwd_kernel) for k, cfgs in fused.items()})
        for cl, (plain, fused) in _CONV_CONFIGS_BY_LAYOUT.items()}
    _conv_fwd_tuned, _conv_fwd_pn_tuned = _conv_fwd_tuned_by_layout[False]
    # NHWC (channels contiguous): less (32, 4 warps), which spills on sm_90 with the channel stride 1.
    _ACT_BWD_CONFIGS_CL = [c for c in _ACT_BWD_CONFIGS if (c.kwargs["BLOCK_C"], c.num_warps) != (32, 4)]
    _ACT_BWD_CONFIGS_BY_LAYOUT = {False: _ACT_BWD_CONFIGS, True: _ACT_BWD_CONFIGS_CL}
    _act_bwd_tuned, _act_bwd_tuned_cl = (
        triton.autotune(_ACT_BWD_CONFIGS_BY_LAYOUT[cl], key=["C", "P", "BLOCK_P", "ACTIVATION", "PIXEL_NORM"])(
            _act_bwd_kernel) for cl in (False, True))

    # The activation layouts the AOT specs compile: a tag for the spec's name, the forward's
    # CHANNELS_LAST, and the backward's stride that is 1 there (a constant, as the JIT specializes it).
    _LAYOUTS = (("", False, ("sp",)), ("-cl", True, ("sc",)))

    def _aot_specs() -> list:
        """Every compilation the kernel-report test checks (fp32 and bf16 activations, and fp64 for
        the forward's own fp64 path), each in both layouts (NCHW, and NHWC tagged "-cl"): the 3x3
        upsampling conv (the heaviest addressing) for every config, the 1x1 (dense) conv for the
        unfused configs, the fused pixel norm at each bucket's widest BLOCK_N."""
        return [spec for layout in _LAYOUTS for spec in _aot_specs_for_layout(*layout)]

    def _aot_specs_for_layout(cl_tag, channels_last, unit_strides_bwd) -> list:
        specs = []
        ints = {k: "i32" for k in ("M", "Cin", "H", "W", "Cout", "OH", "OW", "stride_wt", "stride_wc", "stride_wo")}
        for dt, kind in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "tensor_core"), ("fp64", "fp64")):
            acc, r_type = (tl.float64, "*fp64") if dt == "fp64" else (tl.float32, "*fp32")
            sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "r_ptr": r_type,
                   "scale": "fp32", **ints}
            flags = {"HAS_BIAS": True, "ACTIVATION": True, "IEEE": kind != "tensor_core", "ACC": acc,
                     "DOT_PRECISION": "tf32" if kind == "tf32" else "ieee", "CHANNELS_LAST": channels_last}
            tag = (f"{dt}-tf32" if kind == "tf32" else dt) + cl_tag
            conv_configs, pn_configs = _CONV_CONFIGS_BY_LAYOUT[channels_last]
            for ksize, up in ((3, True), (1, False)):
                for cfg in conv_configs[kind]:
                    specs.append(AotSpec(
                        f"conv_fwd_k{ksize}:{tag}", _conv_fwd_kernel, sig,
                        {**flags, "KSIZE": ksize, "UPSAMPLE": up, "PIXEL_NORM": False, **cfg.kwargs},
                        cfg.num_warps, cfg.num_stages))
            for bucket in _PN_BUCKETS:
                for cfg in pn_configs[(kind, bucket)]:
                    specs.append(AotSpec(
                        f"conv_fwd_pn{bucket}:{tag}", _conv_fwd_kernel, sig,
                        {**flags, "KSIZE": 3, "UPSAMPLE": True, "PIXEL_NORM": True, "BLOCK_N": bucket, **cfg.kwargs},
                        cfg.num_warps, cfg.num_stages))
            if kind in ("fp64", "tf32"):  # the backward kernel has no code of its own for these
                continue
            bsig = {"dy_ptr": f"*{dt}", "y_ptr": f"*{dt}", "r_ptr": "*fp32", "g_ptr": f"*{dt}", "part_ptr": "*fp32",
                    "C": "i32", "P": "i32", **{k: "i32" for k in ("sn", "sc", "sp") if k not in unit_strides_bwd}}
            for cfg in _ACT_BWD_CONFIGS_BY_LAYOUT[channels_last]:
                specs.append(AotSpec(f"conv_act_bwd:{dt}{cl_tag}", _act_bwd_kernel, bsig,
                                     {"ACTIVATION": True, "PIXEL_NORM": True, "STORE_G": True, "BLOCK_P": 128,
                                      "ACC": tl.float32, **{k: 1 for k in unit_strides_bwd}, **cfg.kwargs},
                                     cfg.num_warps, cfg.num_stages))
        return specs

    AOT_SPECS = _aot_specs()
else:
    AOT_SPECS = []


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def product_kind(t: torch.Tensor) -> str:
    """The forward kernel's product for inputs like ``t``, which selects its configs: fp64 rank-1
    updates, an fp32 dot that is exact ("ieee") or TF32 by the fp32 conv policy
    (:func:`~progan_fast.ops.common.fp32_conv_uses_tf32`; CPU tensors, under the interpreter, are
    always exact), or a tensor-core (bf16 / fp16) dot."""
    if t.dtype == torch.float64:
        return "fp64"
    if t.dtype == torch.float32:
        return "tf32" if t.device.type == "cuda" and fp32_conv_uses_tf32() else "ieee"
    return "tensor_core"


def conv2d_bias_lrelu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                              activation: bool, upsample: bool, pixel_norm: bool,
                              y: torch.Tensor, r: torch.Tensor, channels_last: bool = False) -> None:
    """Writes ``y`` ``[N, Cout, OH, OW]`` (and, with ``pixel_norm``, ``r`` ``[N, 1, OH, OW]``) for
    ``x`` ``[N, Cin, H, W]``; ``x`` and ``y`` both dense NCHW or, with ``channels_last``, both dense
    NHWC; ``y`` non-empty; Cout <= :data:`PIXEL_NORM_MAX_COUT` with ``pixel_norm``."""
    n, cin, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[-1]
    oh, ow = y.shape[-2:]
    m = n * oh * ow
    if k == 1:  # [Cout, Cin, 1, 1] is already K-contiguous: read it as is (dense layers: a plain GEMM)
        wk = weight.reshape(cout, cin)
        strides = (0, wk.stride(1), wk.stride(0))
    else:  # [k, k, Cin, Cout]: each tap's [Cin, Cout] slab is Cout-contiguous
        wk = weight.permute(2, 3, 1, 0).contiguous()
        strides = (cin * cout, cout, 1)
    if x.dtype == torch.float64:  # the kernel's float argument is fp32: keep float64 scaling exact
        wk, scale = wk * scale, 1.0
    b = bias.contiguous() if bias is not None else wk  # dummy pointer, never read
    acc = compute_dtype(x)
    ieee = x.dtype in (torch.float32, torch.float64) or on_interpreter(x)  # interpreter: bf16 tl.dot is wrong
    args = (x, wk, b, y, r if pixel_norm else y, float(scale), m, cin, h, w, cout, oh, ow, *strides)
    kind = product_kind(x)
    flags = dict(CHANNELS_LAST=channels_last, KSIZE=k, UPSAMPLE=upsample, HAS_BIAS=bias is not None,
                 ACTIVATION=activation, PIXEL_NORM=pixel_norm, IEEE=ieee,
                 DOT_PRECISION="tf32" if kind == "tf32" else "ieee", ACC=acc)
    block_n_pn = max(16, triton.next_power_of_2(cout))
    if on_interpreter(x):
        bm = min(128, max(16, triton.next_power_of_2(m)))
        bn = block_n_pn if pixel_norm else min(128, block_n_pn)
        bk = 1 if kind == "fp64" else min(64, max(16, triton.next_power_of_2(cin)))  # fp64: rank-1 updates
        _conv_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(cout, bn))](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **flags)
    elif pixel_norm:
        bucket = next(b for b in _PN_BUCKETS if block_n_pn <= b)
        _conv_fwd_tuned_by_layout[channels_last][1][(kind, bucket)][
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), 1)](*args, BLOCK_N=block_n_pn, **flags)
    else:
        _conv_fwd_tuned_by_layout[channels_last][0][kind][
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))](*args, **flags)


def activation_backward(grad: torch.Tensor, y: torch.Tensor, r: torch.Tensor, activation: bool,
                        pixel_norm: bool, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, db)``: the gradient at the pre-activation (``grad`` itself without activation and
    pixel norm) and the bias gradient (float32, float64 for float64), from ``grad`` and the saved
    ``y``, ``r``; ``grad`` and ``y`` dense NCHW or, with ``channels_last``, both dense NHWC, and
    ``g`` in the same layout."""
    n, cout, oh, ow = y.shape
    p = oh * ow
    acc_t = _acc_dtype(y)
    store_g = activation or pixel_norm
    g = torch.empty_like(y, memory_format=torch.channels_last if channels_last else torch.contiguous_format) \
        if store_g else grad
    if on_interpreter(y):
        block_p = min(1024, triton.next_power_of_2(p))
    else:
        block_p = min(128, triton.next_power_of_2(p))
    num_pb = triton.cdiv(p, block_p)
    part = torch.empty(n * num_pb, cout, device=y.device, dtype=acc_t)
    if y.numel():
        args = (grad, y, r if pixel_norm else y, g, part, cout, p, *ncp_strides(cout, p, channels_last))
        flags = dict(ACTIVATION=activation, PIXEL_NORM=pixel_norm, STORE_G=store_g, BLOCK_P=block_p,
                     ACC=compute_dtype(y))
        if on_interpreter(y):
            _act_bwd_kernel[(n, num_pb)](*args, BLOCK_C=min(64, triton.next_power_of_2(cout)), **flags)
        else:
            (_act_bwd_tuned_cl if channels_last else _act_bwd_tuned)[(n, num_pb)](*args, **flags)
    return g, part.sum(0)
