"""Profiling hooks: NVTX ranges around every phase of a step and every op, the cudaProfiler
window, and ``--profile``'s torch.profiler trace."""

import contextlib
import json
import sys

import pytest
import torch

from progan_fast import profiling, train
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import Iteration

from test_training import TINY, final_state, synthetic_images

STEP_RANGES = {"data", "D forward", "penalty", "D backward", "D optimizer", "G forward", "G backward",
               "G optimizer", "EMA"}
OP_RANGES = {"conv2d_bias_lrelu", "pixel_norm", "minibatch_stddev", "fade_in", "blend", "downsample2x", "fade_reals"}


@pytest.fixture
def recorded_ranges(monkeypatch):
    """torch.cuda.nvtx as on a CUDA build of torch (the GPU machines' route), recording each range."""
    names, open_ranges = [], []

    def push(name):
        names.append(name)
        open_ranges.append(name)

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", push)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: open_ranges.pop())
    yield names
    assert open_ranges == []  # every range closed
    profiling.enable_nvtx(False)


def _cpu_torch_nvtx(monkeypatch):
    """torch.cuda.nvtx as on a CPU build of torch: it raises."""
    def fail(*args):
        raise RuntimeError("NVTX functions not installed. Are you sure you have a CUDA build?")
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", fail)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", fail)


def _one_fade_iteration():
    torch.manual_seed(0)
    cfg = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
    state = GANState.create(cfg, torch.device("cpu"), loss="wgan-gp")
    images = (synthetic_images(16, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 4, True, torch.device("cpu"), images)
    it.set_alpha(0.5)
    it()


def test_nvtx_ranges_mark_every_phase_of_a_step_and_every_op(recorded_ranges):
    profiling.enable_nvtx(True)
    recorded_ranges.clear()  # enabling probes the route with one range of its own
    _one_fade_iteration()
    names = set(recorded_ranges)
    assert STEP_RANGES <= names, STEP_RANGES - names
    assert OP_RANGES <= names, OP_RANGES - names


def test_nvtx_ranges_are_off_by_default(recorded_ranges):
    _one_fade_iteration()
    assert recorded_ranges == []


def test_without_a_cuda_torch_the_nvtx_package_carries_the_ranges(monkeypatch):
    _cpu_torch_nvtx(monkeypatch)
    annotated = []

    class FakeNvtx:  # the optional nvtx package (progan_fast[nvtx])
        @staticmethod
        def annotate(name, domain):
            annotated.append((name, domain))
            return contextlib.nullcontext()

    monkeypatch.setitem(sys.modules, "nvtx", FakeNvtx)
    profiling.enable_nvtx(True)
    try:
        _one_fade_iteration()
    finally:
        profiling.enable_nvtx(False)
    assert {name for name, _ in annotated} >= STEP_RANGES | OP_RANGES
    assert {domain for _, domain in annotated} == {profiling.DOMAIN}


def test_nvtx_with_no_route_is_one_clear_error(monkeypatch, tmp_path, capsys):
    # A CPU build of torch and no nvtx package (the package is optional now): --nvtx is refused with
    # one line that names both ways to get NVTX, before the run starts.
    _cpu_torch_nvtx(monkeypatch)
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    with pytest.raises(profiling.NvtxUnavailable):
        profiling.enable_nvtx(True)
    assert not profiling.nvtx_enabled()
    assert train.main(TINY + ["--out", str(tmp_path / "run"), "--nvtx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("progan_fast.train: error: --nvtx needs NVTX") and "Traceback" not in "".join(err)
    assert "torch.cuda.nvtx" in err[-1] and "pip install nvtx" in err[-1]
    assert not list((tmp_path / "run").glob("**/*.pt"))  # nothing trained, nothing saved


def test_cuda_profiler_window_starts_and_stops_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    window = profiling.CudaProfilerWindow(2, 4, enabled=True)
    for step in range(6):
        window.before_step(step)
        calls.append(step)
        window.after_step(step)
    window.close()
    assert calls == [0, 1, "start", 2, 3, "stop", 4, 5]


@pytest.mark.parametrize("text", ["5", "4:2", "a:b", "-1:3"])
def test_a_bad_profiler_window_is_one_clear_error(text, tmp_path, capsys):
    assert train.main(TINY + ["--out", str(tmp_path / "run"), f"--cuda-profiler-steps={text}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("progan_fast.train: error: --cuda-profiler-steps") and "Traceback" not in "".join(err)
    assert not (tmp_path / "run").exists()


def test_profile_writes_a_trace_and_stops_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--profile", "3"]) == 0
    traces = list((out / "profile").glob("trace-*.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::conv") for e in events)
    assert "aten::" in next((out / "profile").glob("summary-*.txt")).read_text()
    state = final_state(out)
    assert state["images"] == 8 * (5 + 3)  # five warm-up steps, three recorded, then a checkpoint
    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 0
    assert final_state(out)["phase_index"] == 3
