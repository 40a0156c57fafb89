"""``--channels-last``: the networks run their activations in NHWC, every op keeps that layout, and
the results are the NCHW run's within rounding, on every backend that runs on this machine.

The per-op layout tests are ``tests/test_channels_last_<op>.py``; here the whole networks, the
training step with its gradient penalty (a double backward through every D op), and the CLI."""

import pytest
import torch

from progan_fast import ops, train
from progan_fast.gan_state import GANState
from progan_fast.networks import EqualizedConv2d, NetworkConfig
from progan_fast.ops import _native
from progan_fast.ops import triton as triton_backend
from progan_fast.ops.common import is_channels_last
from progan_fast.step import fade_reals, train_step

# Odd widths (channels that are not powers of two) and a tiny latent: the interpreter runs Triton.
CFG = NetworkConfig(max_res=8, latent_size=12, fmap_base=48, fmap_max=12, mbstd_group_size=3)
BACKENDS = ["reference",
            pytest.param("cpu", marks=pytest.mark.skipif(not _native.available(), reason="native library not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not triton_backend.available(), reason="no Triton"))]


def _layouts_seen(module: torch.nn.Module) -> tuple[list, callable]:
    """Every EqualizedConv2d's input and output as (name, shape, channels_last) while hooked."""
    seen = []

    def hook(mod, inputs, output):
        for what, t in (("in", inputs[0]), ("out", output)):
            seen.append((f"{mod._name}.{what}", tuple(t.shape), is_channels_last(t)))

    handles = []
    for name, mod in module.named_modules():
        if isinstance(mod, EqualizedConv2d):
            mod._name = name
            handles.append(mod.register_forward_hook(hook))
    return seen, lambda: [h.remove() for h in handles]


def _dense_in_both(shape) -> bool:
    """C == 1 or H * W == 1: the same memory in both layouts, so counted as NCHW."""
    return shape[1] == 1 or shape[2] * shape[3] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_networks_keep_channels_last_through_every_layer_and_match_nchw(backend):
    ops.set_default_backend(backend)
    torch.manual_seed(0)
    nchw = GANState.create(CFG, torch.device("cpu"), loss="wgan-gp")
    torch.manual_seed(0)
    nhwc = GANState.create(CFG, torch.device("cpu"), loss="wgan-gp", channels_last=True)
    z = torch.randn(3, CFG.latent_size, dtype=torch.float32)  # batch 3: one mbstd group of 3
    alpha = 0.4

    seen_g, unhook_g = _layouts_seen(nhwc.G)
    seen_d, unhook_d = _layouts_seen(nhwc.D)
    fakes = nhwc.G(z, 8, alpha)
    scores = nhwc.D(fakes, 8, alpha)
    unhook_g(), unhook_d()
    assert is_channels_last(fakes)
    wrong = [s for s in seen_g + seen_d if len(s[1]) == 4 and not _dense_in_both(s[1]) and not s[2]]
    assert not wrong, f"activations that lost channels-last: {wrong}"
    assert len(seen_g) >= 10 and len(seen_d) >= 10  # the hooks saw the networks

    ref_fakes = nchw.G(z, 8, alpha)
    assert ref_fakes.is_contiguous()
    torch.testing.assert_close(fakes, ref_fakes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, nchw.D(ref_fakes, 8, alpha), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_a_training_step_with_the_gradient_penalty_matches_nchw(backend):
    """One wgan-gp step (the penalty double-differentiates every D op) in both layouts: the same
    losses and the same updated weights, within float32 rounding."""
    ops.set_default_backend(backend)
    reals = fade_reals(torch.rand(3, 3, 8, 8) * 2 - 1, 0.5)
    states = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        state = GANState.create(CFG, torch.device("cpu"), loss="wgan-gp", channels_last=channels_last)
        torch.manual_seed(1)
        out = train_step(state, reals, 8, torch.tensor(0.5))
        states.append((state, out))
    (a, out_a), (b, out_b) = states
    torch.testing.assert_close(out_b.d_loss, out_a.d_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_b.g_loss, out_a.g_loss, rtol=1e-4, atol=1e-4)
    for (name, pa), pb in zip(a.G.named_parameters(), b.G.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"G.{name}")
    for (name, pa), pb in zip(a.D.named_parameters(), b.D.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"D.{name}")
    # The parameters themselves keep their usual layout: checkpoints do not depend on the flag.
    assert all(p.is_contiguous() for p in b.G.parameters()) and all(p.is_contiguous() for p in b.D.parameters())


def test_channels_last_off_leaves_every_activation_nchw():
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"))
    seen, unhook = _layouts_seen(state.D)
    state.D(state.G(torch.randn(2, CFG.latent_size), 8, 0.5), 8, 0.5)
    unhook()
    assert seen and not any(s[2] for s in seen)


def test_train_cli_channels_last_runs_and_says_so(tmp_path, capsys):
    args = ["--max-res", "8", "--kimg-per-phase", "0.02", "--batch", "4", "--fmap-base", "48", "--fmap-max", "12",
            "--latent-size", "12", "--no-progress", "--no-tensorboard", "--log-kimg", "0.01", "--channels-last",
            "--swd-kimg", "0.02", "--swd-images", "16",
            "--out", str(tmp_path / "run")]
    assert train.main(args) == 0
    printed = capsys.readouterr()
    assert "channels-last" in printed.out + printed.err
    assert "--channels-last" in train.build_parser().format_help()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_graphed_channels_last_training_on_a_gpu_matches_eager_nchw(backend, monkeypatch):
    """On a GPU: 6 fade iterations in NHWC under one CUDA graph against eager NCHW, every backend."""
    from progan_fast.graphs import StageGraphs
    from progan_fast.step import Iteration

    if not all(backend in table for table in ops.all_op_implementations().values()):
        pytest.skip(f"the {backend} backend is not available here")
    ops.set_default_backend(backend, "cuda")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same algorithms in both runs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = NetworkConfig(max_res=16, latent_size=32, fmap_base=96, fmap_max=24)
    images = (torch.rand(64, 3, 16, 16, device="cuda") * 255).to(torch.uint8)
    runs = []
    for channels_last, graphed in ((False, False), (True, True)):
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        state = GANState.create(cfg, torch.device("cuda"), loss="wgan-gp", capturable=True,
                                channels_last=channels_last)
        it = Iteration(state, 16, 8, True, torch.device("cuda"), images)
        graphs = StageGraphs() if graphed else None
        for i in range(6):
            it.set_alpha(i / 6)
            if graphed:
                graphs.step("fade", it)
            else:
                it()
        torch.cuda.synchronize()
        runs.append(state)
    a, b = runs
    for name in ("G", "D", "G_ema"):
        for (k, x), y in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4, msg=f"{name}.{k}")


@pytest.mark.slow
def test_a_run_resumes_across_the_flag_and_trains_as_the_nchw_run(tmp_path):
    """Checkpoints do not depend on the layout: a run stopped with --channels-last resumes without
    it, and ends where an uninterrupted NCHW run ends, within float32 rounding."""
    from test_training import TINY, final_state

    common = TINY + ["--backend", "cpu" if _native.available() else "reference"]
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    split = str(tmp_path / "split")
    assert train.main(common + ["--out", split, "--channels-last", "--stop-after-kimg", "0.104"]) == 0
    assert train.main(common + ["--out", split, "--resume", "auto"]) == 0
    whole, resumed = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert (whole["phase_index"], whole["step"], whole["images"]) == (resumed["phase_index"], resumed["step"],
                                                                      resumed["images"])
    for key in ("G", "D", "G_ema"):
        for name, value in whole[key].items():
            assert resumed[key][name].is_contiguous(), f"{key}.{name} saved in another layout"
            torch.testing.assert_close(resumed[key][name], value, rtol=1e-3, atol=1e-4, msg=f"{key}.{name}")
