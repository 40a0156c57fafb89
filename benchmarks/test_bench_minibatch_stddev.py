"""minibatch_stddev on the discriminator's 4x4 features ``[N, C4, 4, 4]`` at the paper's batch."""

import pytest
import torch

from _bench import DEVICE, MODES, backend_params, dtype_params, implementation, op_module, run_case, stage

TABLE = op_module("minibatch_stddev").IMPLEMENTATIONS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("backend", backend_params(TABLE))
def test_minibatch_stddev(benchmark, memory_floor_gbps, backend, dtype, mode):
    s = stage(4)
    x = torch.randn(s.batch, s.channels, 4, 4, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    run_case(benchmark, memory_floor_gbps, op="minibatch_stddev", res=4, dtype=dtype, mode=mode, backend=backend,
             fn=implementation(TABLE, backend), inputs=[x], grad_inputs=[x] if mode != "fwd" else [])
