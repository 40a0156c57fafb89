"""Every GPU autotune config of every pointwise and reduction Triton kernel, run under the
interpreter against the eager reference, forward and backward.

Under the interpreter the launchers pick one block covering each small test case, so the GPU
path (autotuned launches, grids computed from a config's block sizes, several and partial
blocks) would otherwise never run before a GPU does. Here every launcher takes its GPU path on
CPU tensors, with its autotuners restricted to one config at a time (an autotuner with one config
launches it without timing), on shapes larger than every block. The conv's configs have their
own tests in test_triton_conv_act.py.
"""

import importlib

import pytest
import torch

from progan_fast import ops
from progan_fast.ops import triton as triton_backend

pytestmark = [
    pytest.mark.skipif(not triton_backend.available(), reason="Triton backend unavailable"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's view of the GPU path"),
]


def _tuners(module) -> list:
    """The module's autotuned kernels (``triton.autotune`` objects)."""
    from triton.runtime.autotuner import Autotuner

    return [v for v in vars(module).values() if isinstance(v, Autotuner)]


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


#: op family -> (the modules whose launchers run it, a function computing outputs from float64
#: inputs with a backend, the inputs' shapes). Shapes exceed the largest block of every config:
#: pixel_norm C 37 > BLOCK_C 32 and P 323 > BLOCK_P 256; minibatch_stddev F 2535 > BLOCK_F 2048
#: and P 195 > BLOCK 128; the 1D kernels cover 1938 (> 1024) 2x2 blocks or 7752 (> 4096) elements.
CASES = {
    "pixel_norm": (("pixel_norm",), lambda b, x: ops.pixel_norm(x, backend=b), [(2, 37, 17, 19)]),
    "minibatch_stddev": (("minibatch_stddev",), lambda b, x: ops.minibatch_stddev(x, 2, backend=b),
                         [(4, 13, 13, 15)]),
    "fade_in": (("fade_in", "elementwise"), lambda b, lo, hi: ops.fade_in(lo, hi, 0.3, backend=b),
                [(2, 3, 17, 19), (2, 3, 34, 38)]),
    "fade_reals": (("fade_in", "elementwise"), lambda b, x: ops.fade_reals(x, 0.3, backend=b), [(2, 3, 34, 38)]),
    "blend": (("blend", "elementwise"), lambda b, x, y: ops.blend(x, y, 0.3, backend=b),
              [(2, 3, 34, 38), (2, 3, 34, 38)]),
    "downsample2x": (("downsample2x", "elementwise"), lambda b, x: ops.downsample2x(x, backend=b), [(2, 3, 34, 38)]),
}


def _config_count(name: str) -> int:
    modules = CASES[name][0]
    kernel_module = importlib.import_module(f"progan_fast.ops.triton.{modules[0]}")
    return max(len(t.configs) for t in _tuners(kernel_module))


_PARAMS = [(name, i) for name in CASES for i in range(_config_count(name))] if triton_backend.available() else []


@pytest.mark.parametrize("name,index", _PARAMS, ids=[f"{n}-config{i}" for n, i in _PARAMS])
def test_gpu_config_matches_the_reference(name, index, monkeypatch):
    module_names, fn, shapes = CASES[name]
    modules = [importlib.import_module(f"progan_fast.ops.triton.{m}") for m in module_names]
    launched = []
    for module in modules:
        monkeypatch.setattr(module, "on_interpreter", lambda t: False, raising=False)
        for tuner in _tuners(module):
            cfg = tuner.configs[min(index, len(tuner.configs) - 1)]  # a kernel with fewer configs keeps its last
            monkeypatch.setattr(tuner, "configs", [cfg])
            monkeypatch.setattr(tuner, "cache", {})
            monkeypatch.setattr(tuner, "run", _counting(tuner.run, tuner, launched))
    inputs = [_randn(s, seed) for seed, s in enumerate(shapes)]
    xs = [x.float().requires_grad_() for x in inputs]
    refs = [x.clone().requires_grad_() for x in inputs]
    y, want = fn("triton", *xs), fn("reference", *refs)
    torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)
    g = _randn(tuple(want.shape), 99)
    y.backward(g.float())
    want.backward(g)
    for x, r in zip(xs, refs):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=5e-5, atol=5e-5)
    assert launched, "the GPU path was not taken: no autotuned kernel ran"


def _counting(run, tuner, launched: list):
    def counted(*args, **kwargs):
        launched.append(tuner)
        return run(*args, **kwargs)

    return counted
