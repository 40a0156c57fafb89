"""conv2d_bias_lrelu on the layers of every stage:

- ``G.conv0``: the generator block's first 3x3 conv, with nearest 2x upsample and pixel norm
  (``[N, C(res/2), res/2, res/2]`` -> ``[N, C(res), res, res]``; res >= 8);
- ``G.conv1``: the generator's 3x3 conv with pixel norm at ``[N, C(res), res, res]``;
- ``D.conv``: the discriminator's 3x3 conv (``C(res) -> C(res)``; at 4px ``C4 + 1 -> C4`` after
  minibatch stddev);
- ``G.dense`` / ``D.dense``: the dense layers (1x1 convs on ``[N, F, 1, 1]``): latent -> 16 C4 and
  16 C4 -> nf(0).

On the CPU only resolutions up to 16 run (convolutions are slow there).
"""

import math

import pytest
import torch

from _bench import CONFIG, DEVICE, LAYOUTS, MODES, ON_GPU, RESOLUTIONS, activation, backend_params, cap, channels, \
    dtype_params, implementation, op_module, run_case, skip_compile_in_smoke, stage

TABLE = op_module("conv_act").IMPLEMENTATIONS
CONV_RES = RESOLUTIONS if ON_GPU else [r for r in RESOLUTIONS if r <= 16]
SQRT2 = math.sqrt(2.0)


def _conv_case(benchmark, floor, backend, op, res, dtype, mode, x_shape, cout, ksize, upsample, pixel_norm,
               first, layout="nchw"):
    skip_compile_in_smoke(benchmark, backend, first)
    grad = mode != "fwd"
    cin = x_shape[1]
    x = activation(*x_shape, layout=layout, dtype=dtype, grad=grad)
    w = torch.randn(cout, cin, ksize, ksize, device=DEVICE, dtype=dtype, requires_grad=grad)
    b = torch.randn(cout, device=DEVICE, dtype=dtype, requires_grad=grad)
    scale = SQRT2 / math.sqrt(cin * ksize * ksize)
    impl = implementation(TABLE, backend)
    run_case(benchmark, floor, op=f"conv_act {op}", res=res, dtype=dtype, mode=mode, backend=backend,
             fn=lambda x, w, b: impl(x, w, b, scale, True, upsample, pixel_norm),
             inputs=[x, w, b], grad_inputs=[x, w, b] if grad else [], layout=layout)


params = pytest.mark.parametrize
modes = params("mode", MODES)
dtypes = params("dtype", dtype_params(elementwise=False))
layouts = params("layout", LAYOUTS)  # not for the dense layers: a [N, F, 1, 1] tensor is both
backends = params("backend", backend_params(TABLE))


@modes
@layouts
@dtypes
@params("res", [r for r in CONV_RES if r >= 8])
@backends
def test_g_conv0_upsample_pn(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    s = stage(res)
    _conv_case(benchmark, memory_floor_gbps, backend, "G.conv0(up,pn)", res, dtype, mode,
               (s.batch, channels(res // 2), res // 2, res // 2), s.channels, 3, True, True, res == 8, layout)


@modes
@layouts
@dtypes
@params("res", CONV_RES)
@backends
def test_g_conv1_pn(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    s = stage(res)
    _conv_case(benchmark, memory_floor_gbps, backend, "G.conv1(pn)", res, dtype, mode,
               (s.batch, s.channels, res, res), s.channels, 3, False, True, res == CONV_RES[0], layout)


@modes
@layouts
@dtypes
@params("res", CONV_RES)
@backends
def test_d_conv(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    s = stage(res)
    cin = s.channels + 1 if res == 4 else s.channels
    _conv_case(benchmark, memory_floor_gbps, backend, "D.conv", res, dtype, mode,
               (s.batch, cin, res, res), s.channels, 3, False, False, res == CONV_RES[0], layout)


@modes
@dtypes
@params("layer", ["G.dense", "D.dense"])
@backends
def test_dense(benchmark, memory_floor_gbps, backend, layer, dtype, mode):
    s = stage(4)
    if layer == "G.dense":
        fin, fout = cap(CONFIG.latent_size), 16 * s.channels
    else:
        fin, fout = 16 * s.channels, cap(CONFIG.nf(0))
    _conv_case(benchmark, memory_floor_gbps, backend, layer, 4, dtype, mode,
               (s.batch, fin, 1, 1), fout, 1, False, False, True)
