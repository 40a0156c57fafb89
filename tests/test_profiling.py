"""Profiling hooks: NVTX ranges around every phase of a step and every op, the cudaProfiler
window, and ``--profile``'s torch.profiler trace."""

import json

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
    names = []

    class Annotate:
        def __init__(self, name, domain):
            assert domain == profiling.DOMAIN
            names.append(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(profiling._nvtx, "annotate", Annotate)
    yield names
    profiling.enable_nvtx(False)


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
    _one_fade_iteration()
    names = set(recorded_ranges)
    assert STEP_RANGES <= names, STEP_RANGES - names
    assert OP_RANGES <= names, OP_RANGES - names


def test_nvtx_ranges_are_off_by_default(recorded_ranges):
    _one_fade_iteration()
    assert recorded_ranges == []


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
