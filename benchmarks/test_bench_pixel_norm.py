"""pixel_norm on the generator's feature maps ``[N, C, res, res]`` of every stage."""

import pytest

from _bench import LAYOUTS, MODES, activation, RESOLUTIONS, backend_params, dtype_params, implementation, op_module, \
    run_case, skip_compile_in_smoke, stage

TABLE = op_module("pixel_norm").IMPLEMENTATIONS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("backend", backend_params(TABLE))
def test_pixel_norm(benchmark, memory_floor_gbps, backend, res, dtype, layout, mode):
    skip_compile_in_smoke(benchmark, backend, res == RESOLUTIONS[0])
    s = stage(res)
    x = activation(s.batch, s.channels, res, res, layout=layout, dtype=dtype, grad=mode != "fwd")
    run_case(benchmark, memory_floor_gbps, op="pixel_norm", res=res, dtype=dtype, mode=mode, backend=backend,
             fn=implementation(TABLE, backend), inputs=[x], grad_inputs=[x] if mode != "fwd" else [], layout=layout)
