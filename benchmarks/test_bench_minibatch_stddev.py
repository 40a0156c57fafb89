"""minibatch_stddev on the discriminator's 4x4 features ``[N, C4, 4, 4]`` at the paper's batch."""

import pytest

from _bench import LAYOUTS, MODES, activation, backend_params, dtype_params, implementation, op_module, run_case, stage

TABLE = op_module("minibatch_stddev").IMPLEMENTATIONS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("backend", backend_params(TABLE))
def test_minibatch_stddev(benchmark, memory_floor_gbps, backend, dtype, layout, mode):
    s = stage(4)
    x = activation(s.batch, s.channels, 4, 4, layout=layout, dtype=dtype, grad=mode != "fwd")
    run_case(benchmark, memory_floor_gbps, op="minibatch_stddev", res=4, dtype=dtype, mode=mode, backend=backend,
             fn=implementation(TABLE, backend), inputs=[x], grad_inputs=[x] if mode != "fwd" else [], layout=layout)
