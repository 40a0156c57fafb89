"""CUDA graphs on a GPU (skipped without CUDA): a graphed run trains exactly like an eager one,
fp16 overflow handling works inside a graph, and a run re-captures at each phase change and
swaps checkpoints with un-graphed runs."""

import pytest
import torch

from progan_fast import ops, train
from progan_fast.config import RunOptions, TrainConfig
from progan_fast.gan_state import GANState
from progan_fast.graphs import StageGraphs
from progan_fast.networks import NetworkConfig
from progan_fast.step import Iteration
from progan_fast.trainer import Trainer

from test_training import TINY, final_state, synthetic_images

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _deterministic_cudnn():
    # Eager and graphed runs must pick the same conv algorithms to agree to rounding.
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def _state(res, loss, amp_dtype=None, seed=0):
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    cfg = NetworkConfig(max_res=res, latent_size=32, fmap_base=128, fmap_max=32)
    return GANState.create(cfg, torch.device("cuda"), loss=loss, amp_dtype=amp_dtype, fused_adam=True, capturable=True)


def _images(res, n=64):
    return (synthetic_images(n, res) * 127.5 + 127.5).round().to(torch.uint8)


def _train(res, loss, graphed, steps=9, amp_dtype=None, staged=False, batch=8):
    """``steps`` fade iterations with alpha rising, eager or graphed; returns the state."""
    state = _state(res, loss, amp_dtype)
    images = _images(res)
    it = Iteration(state, res, batch, True, torch.device("cuda"), None if staged else images.cuda())
    graphs = StageGraphs() if graphed else None
    for i in range(steps):
        it.set_alpha(i / steps)
        if staged:
            it.load_batch(images)
        if graphed:
            graphs.step("fade", it)
        else:
            it()
    torch.cuda.synchronize()
    if graphed:
        assert graphs.captures == 1 and graphs.current.graph is not None
    return state, it


def _assert_same_networks(a, b, **tol):
    for name in ("G", "D", "G_ema"):
        for (k, x), y in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            torch.testing.assert_close(y, x, msg=f"{name}.{k}", **tol)


@pytest.mark.parametrize("res", [8, 32])
@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_graphed_training_matches_eager(res, loss, backend):
    ops.set_default_backend(backend, "cuda")
    eager, eager_it = _train(res, loss, graphed=False)
    graphed, graphed_it = _train(res, loss, graphed=True)
    _assert_same_networks(eager, graphed, rtol=1e-4, atol=1e-5)
    # The loss sums accumulated inside the graph equal the eager ones.
    e, g = eager_it.read_sums(), graphed_it.read_sums()
    assert set(e) == set(g) and e
    for k in e:
        assert abs(e[k] - g[k]) <= 1e-3 * max(1.0, abs(e[k])), (k, e[k], g[k])


def test_graphed_training_with_staged_batches_matches_eager():
    """A dataset too big for the GPU: batches are copied into the static buffer before each replay."""
    eager, _ = _train(16, "wgan-gp", graphed=False, staged=True)
    graphed, _ = _train(16, "wgan-gp", graphed=True, staged=True)
    _assert_same_networks(eager, graphed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_graphed_amp_training_matches_eager_amp(amp_dtype):
    eager, _ = _train(16, "wgan-gp", graphed=False, amp_dtype=amp_dtype)
    graphed, _ = _train(16, "wgan-gp", graphed=True, amp_dtype=amp_dtype)
    _assert_same_networks(eager, graphed, rtol=1e-3, atol=1e-4)
    for net in (graphed.G, graphed.D):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


def test_fp16_overflow_is_skipped_inside_the_graph():
    state, it = _train(8, "nonsat", graphed=True, amp_dtype=torch.float16)
    graphs = StageGraphs()
    for _ in range(4):  # warm up and capture a fresh graph on the trained state
        graphs.step("again", it)
    D_before = [p.clone() for p in state.D.parameters()]
    state.scaler_D.scale.fill_(2.0**40)
    graphs.step("again", it)  # a replay
    torch.cuda.synchronize()
    assert state.scaler_D.found_inf.item() == 1.0
    assert state.scaler_D.scale.item() == 2.0**39
    assert all(torch.equal(a, b) for a, b in zip(D_before, state.D.parameters()))
    state.scaler_D.scale.fill_(256.0)
    graphs.step("again", it)
    torch.cuda.synchronize()
    assert state.scaler_D.found_inf.item() == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(D_before, state.D.parameters()))


def test_a_graphed_run_recaptures_per_phase_and_swaps_checkpoints_with_eager_runs(tmp_path):
    # TINY: max-res 8, 13 steps per phase, three phases (4 stable, 8 fade, 8 stable).
    out = tmp_path / "run"
    args = TINY + ["--out", str(out), "--device", "cuda", "--cuda-graphs"]
    config = train.config_from_args(train.build_parser().parse_args(args))
    trainer = Trainer(config, RunOptions(out=out, device="cuda", cuda_graphs=True, progress=False, tensorboard=False,
                                         log_kimg=0.05, stop_after_kimg=0.152))
    trainer.run()
    assert trainer.graphs.captures == 2  # 4px stable (13 steps) and 8px fade (stopped at 19 of 26)
    # Graphed checkpoint -> eager on the GPU -> eager on the CPU -> graphed with amp on the GPU.
    assert train.main(TINY + ["--out", str(out), "--device", "cuda", "--resume", "auto", "--stop-after-kimg", "0.2"]) == 0
    assert train.main(TINY + ["--out", str(out), "--device", "cpu", "--resume", "auto", "--stop-after-kimg", "0.25"]) == 0
    assert train.main(TINY + ["--out", str(out), "--device", "cuda", "--resume", "auto", "--cuda-graphs", "--amp"]) == 0
    final = final_state(out)
    assert final["phase_index"] == 3
    assert all(torch.isfinite(t).all() for t in final["G"].values())


def test_default_backend_graphed_run_from_the_cli(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--device", "cuda", "--cuda-graphs", "--amp",
                              "--backend", "auto", "--loss", "wgan-gp"]) == 0
    final = final_state(out)
    assert final["phase_index"] == 3 and all(torch.isfinite(t).all() for t in final["D"].values())
    assert TrainConfig.from_dict(final["config"]).loss == "wgan-gp"


def test_recapture_after_a_capture_left_memory_in_its_pool():
    """An allocation made during a capture that outlives its graph (as the cuBLAS workspace of the
    capture stream does) keeps that capture's private pool alive with no graph using it; capturing
    into that pool again trips PyTorch's allocator assertion. Each capture here gets a pool of its own."""
    lin = torch.nn.Linear(64, 64).cuda()
    x, out = torch.randn(8, 64, device="cuda"), torch.zeros(8, 64, device="cuda")
    survivors = []

    def step():
        if torch.cuda.is_current_stream_capturing():
            survivors.append(torch.empty(4096, device="cuda"))  # allocated in the graph's pool, kept after it
        out.copy_(lin(x))

    graphs = StageGraphs(warmup=1)
    for phase in range(3):
        for _ in range(3):
            graphs.step(phase, step)
    torch.cuda.synchronize()
    assert graphs.captures == 3 and len(survivors) == 3
    torch.testing.assert_close(out, lin(x))
