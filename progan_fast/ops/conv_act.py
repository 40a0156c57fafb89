"""Equalized-learning-rate convolution + bias + leaky-ReLU (ProGAN paper, section 4.1).

Weights are stored ~N(0, 1) and scaled at run time by ``scale = gain / sqrt(fan_in)``, so Adam's
per-parameter step size acts on every layer at the same dynamic range. One call computes a whole
layer: ``y = conv(x, w) * scale + b``, then leaky-ReLU(0.2) when ``activation``.

Options that fused kernels compute without writing intermediate tensors, given here so the
networks call one op per layer and every backend computes the whole layer:

- ``upsample=True``: nearest 2x upsample of ``x`` first (the generator block's first conv);
- ``pixel_norm=True``: pixelwise normalization of the result (every generator conv).

A 1x1 kernel on an ``[N, C, 1, 1]`` input is a dense layer; the networks use it that way.
Padding is "same" (``k // 2``) for odd kernels.

Backends:

- ``reference``: eager PyTorch (upsampled tensor, ``F.conv2d``, ``leaky_relu``, pixel norm).
- ``triton``: the custom op ``progan_fast::conv2d_bias_lrelu`` -> ``(y, r)``: one implicit-GEMM
  kernel with the upsample folded into its addressing and scale, bias, leaky-ReLU and (Cout <=
  ``PN_FUSE_MAX_COUT``) pixel norm in its epilogue, saving pixel norm's per-pixel ``r`` for the
  backward (kernels in ``ops/triton/conv_act.py``). Wider pixel-normed layers (the generator's
  dense 4x4 input layer, Cout = 16 * 512 = 8192) run the conv unfused and then pixel norm's Triton
  op (one more read and write of the output).
- ``cpu`` / ``cuda``: the native library's ``progan_fast_native::conv2d_bias_lrelu``, same
  signature and autograd: a thin C++ composite that runs ATen's conv (oneDNN on the CPU, cuDNN on
  CUDA) with the *unscaled* weight, then ``progan_fast_native::conv_epilogue``, one pass that
  applies scale, bias, leaky-ReLU and (any Cout) pixel norm, saving ``r``. Its backward is
  ``conv_epilogue_backward`` (g and the bias gradient in one pass, deterministic partial sums) and
  ATen's convolution_backward with the weight times scale. Our own implicit-GEMM conv is not used
  there: on the CPU oneDNN's conv is what the reference runs too, and the epilogue is where the
  reference makes extra passes.

Backward (``progan_fast::conv2d_bias_lrelu_backward`` -> ``(dx, dw, db)``): one Triton kernel
computes ``g = lrelu'(pre) * pixel_norm'(grad)`` from the saved output and the bias gradient; the
conv's data and weight gradients are ATen's ``convolution_backward`` on ``g`` with the weight
times ``scale`` (``dw`` times ``scale``); with ``upsample`` it runs on the upsampled input and
``dx`` is summed over each 2x2 block (the adjoint of nearest upsampling).

Layouts: ``x`` may be dense NCHW or dense NHWC (channels-last); every backend returns ``y`` (and
the backward ``dx``) in ``x``'s layout without copying an activation (:mod:`progan_fast.ops.common`,
"Memory formats"), and ``dw`` in the weight's layout. The Triton forward reads ``x`` and writes ``y``
through their strides (in NHWC its loads are contiguous over input channels, its stores over
Cout); ``r`` is ``[N, 1, H, W]``, dense in both layouts. The native composite runs ATen's conv on
the NHWC input as it is (oneDNN and cuDNN keep channels-last) with the weight in the input's
layout (a copy of a weight at most), and its epilogue kernels are strided too. The backward's
ATen ``convolution_backward`` keeps channels-last; the 2x2-block sum of the upsample adjoint is
taken on a view in the gradient's own layout.

Double backward (this op sits inside the WGAN-GP penalty): the backward op's own autograd is
written out in differentiable ATen ops (``conv2d``, ``convolution_backward``), so it serves the
Triton and the native ops alike: the backward is bilinear in ``(g, x)`` and ``(g, w)``, and
leaky-ReLU's mask is piecewise constant, so ``d/dgrad = m * (conv(U gdx, s w) + s conv(U x, gdw)
+ gdb)``, ``d/dx = s U^T conv_input_grad(g, gdw)``, ``d/dw = s conv_weight_grad(U gdx, g)``. With
pixel norm (generator only, never double-differentiated in training) the pre-activation is
recomputed and ``h`` is pulled back through the reference's per-pixel activation + pixel-norm
backward by autograd; no conv is itself double-differentiated.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import _backend, _native
from . import triton as triton_backend
from .common import dense_layout, is_channels_last, memory_format, to_layout, upsample2x_reference
from .pixel_norm import reference as pixel_norm_reference
from .pixel_norm import triton_impl as pixel_norm_triton
from .triton import conv_act as kernels

NEGATIVE_SLOPE = 0.2
PIXEL_NORM_EPS = 1e-8
#: Largest Cout whose pixel norm the Triton backend fuses into the conv; wider layers (the
#: generator's 4x4 dense input layer, 8192 features) run the conv without pixel norm and then
#: pixel norm's own op.
PN_FUSE_MAX_COUT = kernels.PIXEL_NORM_MAX_COUT

# ----- reference ----------------------------------------------------------------------------------


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
    and what the official code does.

    A 1x1 kernel on a 1x1 input (the networks' dense layers) runs as ``F.linear``, one GEMM: the
    same sum, where oneDNN's 1x1 convolution of a ``[N, C, 1, 1]`` tensor is many times slower on
    the CPU (its backward for D's ``8192 -> 512`` dense layer took 48 ms a call against about 5
    for the GEMM, at batch 16 on one core; ``benchmarks/step_overhead.py``)."""
    if upsample:
        x = upsample2x_reference(x)
    if weight.shape[-1] == 1 and x.shape[-2:] == (1, 1):
        y = F.linear(x.flatten(1), (weight * scale).flatten(1), bias).reshape(x.shape[0], -1, 1, 1)
    else:
        y = F.conv2d(x, weight * scale, bias, padding=weight.shape[-1] // 2)
    if activation:
        y = F.leaky_relu(y, NEGATIVE_SLOPE)
    if pixel_norm:
        y = pixel_norm_reference(y)
    return y


# ----- custom ops: Triton's progan_fast:: ops, and fake tensors for the native ones --------------

def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("progan_fast::conv2d_bias_lrelu", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, activation: bool,
             upsample: bool, pixel_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, r)``: ``r`` ``[N, 1, H, W]`` is pixel norm's per-pixel ``rsqrt(mean(a^2) + eps)``
    (saved for the backward), an empty tensor without pixel norm."""
    triton_backend.check_device("conv2d_bias_lrelu", *([x, weight] if bias is None else [x, weight, bias]))
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    oh, ow = (2 * h, 2 * w) if upsample else (h, w)
    # int32 offsets, and the row index (output pixels, at most y's size) runs a block past its end;
    # checked before dense_layout may copy x.
    triton_backend.check_index_count("conv2d_bias_lrelu", x.numel(), f"the input {tuple(x.shape)}")
    triton_backend.check_index_count("conv2d_bias_lrelu", n * cout * oh * ow, f"the output {(n, cout, oh, ow)}")
    x, cl = dense_layout(x)
    if weight.shape[1] != cin:
        raise ValueError(f"conv2d_bias_lrelu: input has {cin} channels, weight {tuple(weight.shape)}")
    if pixel_norm and cout > kernels.PIXEL_NORM_MAX_COUT:
        raise ValueError(
            f"conv2d_bias_lrelu: fused pixel norm needs Cout <= {kernels.PIXEL_NORM_MAX_COUT}, got {cout}")
    y = torch.empty(n, cout, oh, ow, device=x.device, dtype=x.dtype, memory_format=memory_format(cl))
    r = torch.empty((n, 1, oh, ow) if pixel_norm else (0,), device=x.device, dtype=_acc_dtype(x))
    if y.numel():
        kernels.conv2d_bias_lrelu_forward(x, weight, bias, scale, activation, upsample, pixel_norm, y, r, cl)
    return y, r


@_conv_op.register_fake
def _conv_op_fake(x, weight, bias, scale, activation, upsample, pixel_norm):
    n, _, h, w = x.shape
    _, cl = dense_layout(x)
    oh, ow = (2 * h, 2 * w) if upsample else (h, w)
    y = torch.empty(n, weight.shape[0], oh, ow, dtype=x.dtype, device=x.device, memory_format=memory_format(cl))
    r = x.new_empty((n, 1, oh, ow) if pixel_norm else (0,), dtype=_acc_dtype(x))
    return y, r


def _upsample(x):
    """Nearest 2x upsample in ``x``'s layout (channels-last stays channels-last)."""
    return upsample2x_reference(x)


def _upsample_adjoint(g):
    """Adjoint of nearest 2x upsampling: the sum of each 2x2 block, in ``g``'s layout (for
    channels-last ``g`` over a view of its ``[N, H, W, C]`` memory: no copy, the same four terms)."""
    n, c, h2, w2 = g.shape
    if is_channels_last(g):
        return g.permute(0, 2, 3, 1).reshape(n, h2 // 2, 2, w2 // 2, 2, c).sum((2, 4)).permute(0, 3, 1, 2)
    return g.reshape(n, c, h2 // 2, 2, w2 // 2, 2).sum((3, 5))


def _eff_weight(weight, scale, dtype, channels_last):
    """``weight * scale`` in ``dtype``, in the activations' layout (ATen's convolutions pick their
    output layout from the input's and the weight's: a weight in the input's layout keeps the
    input's). A copy of a weight at most."""
    return to_layout((weight * scale).to(dtype), channels_last)


def _conv_input_weight_grads(g, x_in, weight, mask):
    """ATen's convolution backward for a stride-1 "same" conv: (grad wrt x_in, grad wrt weight)."""
    pad = weight.shape[-1] // 2
    dx, dw, _ = torch.ops.aten.convolution_backward(
        g, x_in, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [mask[0], mask[1], False])
    return dx, dw


@torch.library.custom_op("progan_fast::conv2d_bias_lrelu_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      y: torch.Tensor, r: torch.Tensor, scale: float, activation: bool, upsample: bool,
                      pixel_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of the forward op given ``grad`` = dL/dy and its saved ``y``, ``r``."""
    triton_backend.check_device("conv2d_bias_lrelu_backward", grad, x, weight, y)
    x, cl = dense_layout(x)
    y = to_layout(y, cl)  # y was written in x's layout: no copy
    grad = to_layout(grad, cl)
    g, db = kernels.activation_backward(grad, y, r, activation, pixel_norm, cl)
    db = db.to(bias.dtype if bias is not None else weight.dtype)
    x_in = _upsample(x) if upsample else x
    dx, dw = _conv_input_weight_grads(g, x_in, _eff_weight(weight, scale, x.dtype, cl), (True, True))
    if upsample:
        dx = _upsample_adjoint(dx)
    return to_layout(dx, cl), _weight_layout((dw * scale).to(weight.dtype), weight), db


def _weight_layout(dw, weight):
    """``dw`` in ``weight``'s layout (ATen's weight gradient follows the input's): a weight-sized copy."""
    return to_layout(dw, is_channels_last(weight))


@_conv_backward_op.register_fake
def _conv_backward_op_fake(grad, x, weight, bias, y, r, scale, activation, upsample, pixel_norm):
    db_dtype = bias.dtype if bias is not None else weight.dtype
    _, cl = dense_layout(x)
    return (torch.empty_like(x, memory_format=memory_format(cl)),
            torch.empty_like(weight, memory_format=memory_format(is_channels_last(weight))),
            weight.new_empty(weight.shape[0], dtype=db_dtype))


TRITON = SimpleNamespace(conv2d_bias_lrelu=_conv_op, conv2d_bias_lrelu_backward=_conv_backward_op)

if _native.available():
    NATIVE = SimpleNamespace(conv2d_bias_lrelu=_native.ops.conv2d_bias_lrelu.default,
                             conv2d_bias_lrelu_backward=_native.ops.conv2d_bias_lrelu_backward.default)

    @torch.library.register_fake("progan_fast_native::conv_epilogue")
    def _conv_epilogue_fake(conv, bias, scale, activation, pixel_norm):
        n, _, h, w = conv.shape
        _, cl = dense_layout(conv)
        r = conv.new_empty((n, 1, h, w) if pixel_norm else (0,), dtype=_acc_dtype(conv))
        return torch.empty_like(conv, memory_format=memory_format(cl)), r

    @torch.library.register_fake("progan_fast_native::conv_epilogue_backward")
    def _conv_epilogue_backward_fake(grad, y, r, activation, pixel_norm):
        _, cl = dense_layout(y)
        return torch.empty_like(y, memory_format=memory_format(cl)), y.new_empty(y.shape[1], dtype=_acc_dtype(y))

    torch.library.register_fake(NATIVE.conv2d_bias_lrelu, _conv_op_fake)
    torch.library.register_fake(NATIVE.conv2d_bias_lrelu_backward, _conv_backward_op_fake)


# ----- autograd (first and second order, shared by the Triton and the native ops) ---------------

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
    w_eff = _eff_weight(weight, scale, x.dtype, is_channels_last(x))
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
        g_w = _weight_layout((g_w * scale).to(weight.dtype), weight)
    return g_grad, g_x, g_w, g_b, None, None, None, None, None, None


def _register_autograd(k) -> None:
    """First and second derivatives of one pair of ops (Triton's or the native library's)."""
    torch.library.register_autograd(k.conv2d_bias_lrelu, functools.partial(_conv_autograd, k), setup_context=_setup)
    torch.library.register_autograd(k.conv2d_bias_lrelu_backward, _conv_backward_autograd, setup_context=_setup_bwd)


_register_autograd(TRITON)
if _native.available():
    _register_autograd(NATIVE)


# ----- backends and the public function -----------------------------------------------------------

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
        y = pixel_norm_triton(y, PIXEL_NORM_EPS)
    return y


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


IMPLEMENTATIONS = {"reference": reference}
if triton_backend.available():
    IMPLEMENTATIONS["triton"] = triton_impl
_native.register(IMPLEMENTATIONS, native_impl)


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
