"""The fade-in family at every stage that fades (res >= 8):

- ``fade_in``: the generator's RGB fade, ``lerp(up2x(low [N, 3, res/2]), high [N, 3, res], alpha)``;
- ``blend``: the discriminator's feature fade on ``[N, C(res/2), res/2, res/2]``;
- ``downsample2x``: the discriminator block's 2x2 average pool of ``[N, C(res/2), res, res]``;
- ``fade_reals``: the real images ``[N, 3, res, res]`` during a fade.
"""

import pytest

from _bench import LAYOUTS, MODES, RESOLUTIONS, activation, backend_params, channels, dtype_params, \
    implementation, op_module, run_case, skip_compile_in_smoke, stage

FADE_IN = op_module("fade_in").FADE_IN_IMPLEMENTATIONS
FADE_REALS = op_module("fade_in").FADE_REALS_IMPLEMENTATIONS
BLEND = op_module("blend").IMPLEMENTATIONS
DOWNSAMPLE = op_module("downsample2x").IMPLEMENTATIONS
FADE_RES = [r for r in RESOLUTIONS if r >= 8]
ALPHA = 0.3


def _case(benchmark, floor, op, table, backend, res, dtype, layout, mode, make_inputs, call):
    skip_compile_in_smoke(benchmark, backend, res == FADE_RES[0])
    grad = mode != "fwd"
    inputs = make_inputs(stage(res), lambda *shape: activation(*shape, layout=layout, dtype=dtype, grad=grad))
    impl = implementation(table, backend)
    run_case(benchmark, floor, op=op, res=res, dtype=dtype, mode=mode, backend=backend,
             fn=lambda *t: call(impl, *t), inputs=inputs, grad_inputs=inputs if grad else [], layout=layout)


params = pytest.mark.parametrize
modes = params("mode", MODES)
layouts = params("layout", LAYOUTS)
dtypes = params("dtype", dtype_params())
resolutions = params("res", FADE_RES)


@modes
@layouts
@dtypes
@resolutions
@params("backend", backend_params(FADE_IN))
def test_fade_in(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    def make(s, randn):
        return [randn(s.batch, 3, res // 2, res // 2), randn(s.batch, 3, res, res)]
    _case(benchmark, memory_floor_gbps, "fade_in", FADE_IN, backend, res, dtype, layout, mode, make,
          lambda f, low, high: f(low, high, ALPHA))


@modes
@layouts
@dtypes
@resolutions
@params("backend", backend_params(BLEND))
def test_blend(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    def make(s, randn):
        shape = (s.batch, channels(res // 2), res // 2, res // 2)
        return [randn(*shape), randn(*shape)]
    _case(benchmark, memory_floor_gbps, "blend", BLEND, backend, res, dtype, layout, mode, make,
          lambda f, old, new: f(old, new, ALPHA))


@modes
@layouts
@dtypes
@resolutions
@params("backend", backend_params(DOWNSAMPLE))
def test_downsample2x(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    def make(s, randn):
        return [randn(s.batch, channels(res // 2), res, res)]
    _case(benchmark, memory_floor_gbps, "downsample2x", DOWNSAMPLE, backend, res, dtype, layout, mode,
          make, lambda f, x: f(x))


@modes
@layouts
@dtypes
@resolutions
@params("backend", backend_params(FADE_REALS))
def test_fade_reals(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    def make(s, randn):
        return [randn(s.batch, 3, res, res)]
    _case(benchmark, memory_floor_gbps, "fade_reals", FADE_REALS, backend, res, dtype, layout, mode,
          make, lambda f, x: f(x, ALPHA))
