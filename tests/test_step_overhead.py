"""What removing the reference step's overhead must not change (issue 17 item 6).

Speed is measured by ``benchmarks/step_overhead.py``, not here; these tests check the results.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from progan_fast import ops


# ----- the reference conv runs a 1x1 kernel on a 1x1 input (a dense layer) as one GEMM ------------

def dense_by_formula(x, w, b, scale, activation, pixel_norm):
    y = F.conv2d(x, w) * scale + b.view(1, -1, 1, 1)
    y = torch.where(y >= 0, y, 0.2 * y) if activation else y
    return y * torch.rsqrt(y.square().mean(dim=1, keepdim=True) + 1e-8) if pixel_norm else y


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("pixel_norm", [True, False])
def test_reference_dense_layer_is_the_scaled_conv(activation, pixel_norm):
    x = torch.randn(5, 9, 1, 1, dtype=torch.float64)
    w, b = torch.randn(7, 9, 1, 1, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    got = ops.conv2d_bias_lrelu(x, w, b, 0.3, activation=activation, pixel_norm=pixel_norm, backend="reference")
    assert got.shape == (5, 7, 1, 1)
    torch.testing.assert_close(got, dense_by_formula(x, w, b, 0.3, activation, pixel_norm))


def test_reference_dense_layer_without_bias():
    x, w = torch.randn(3, 4, 1, 1, dtype=torch.float64), torch.randn(6, 4, 1, 1, dtype=torch.float64)
    got = ops.conv2d_bias_lrelu(x, w, None, 0.5, activation=False, backend="reference")
    torch.testing.assert_close(got, F.conv2d(x, w) * 0.5)


def test_reference_dense_layer_first_and_second_derivatives():
    """D's dense layers sit inside the gradient penalty: its double backward must be right too.
    The bias keeps pre-activations away from leaky-ReLU's kink, where finite differences lie."""
    def dense(x, w, b):
        return ops.conv2d_bias_lrelu(x, w, b, 0.3, backend="reference")

    x = torch.randn(3, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(4, dtype=torch.float64) + 5).requires_grad_()
    assert torch.autograd.gradcheck(dense, (x, w, b))
    assert torch.autograd.gradgradcheck(dense, (x, w, b))


def test_a_1x1_kernel_on_a_larger_input_is_still_a_conv():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w, b = torch.randn(5, 3, 1, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = ops.conv2d_bias_lrelu(x, w, b, 0.7, activation=False, backend="reference")
    torch.testing.assert_close(got, F.conv2d(x, w) * 0.7 + b.view(1, -1, 1, 1))


# ----- the EMA updates the layers grown so far, and G_ema is bit for bit the full EMA's ----------

from progan_fast.gan_state import GANState  # noqa: E402
from progan_fast.networks import Generator, NetworkConfig  # noqa: E402
from progan_fast.step import train_step  # noqa: E402

TINY = NetworkConfig(max_res=16, latent_size=16, fmap_base=64, fmap_max=16)


def test_grown_parameters_are_the_layers_up_to_res():
    G = Generator(TINY)
    layers = lambda names: {n.rsplit(".", 1)[0] for n in names}  # noqa: E731
    assert layers(G.parameters_grown(4)) == {"input", "conv4", "to_rgb.4"}
    assert layers(G.parameters_grown(8)) == {"input", "conv4", "to_rgb.4", "to_rgb.8", "blocks.8.0", "blocks.8.1"}
    assert G.parameters_grown(16) == {name for name, _ in G.named_parameters()}
    for res in (4, 8, 16):  # everything trained at res or below
        for r in (4, 8, 16):
            if r <= res:
                assert G.parameters_used(r, True) | G.parameters_used(r, False) <= G.parameters_grown(res)


def test_ema_of_the_grown_layers_is_the_full_ema_bit_for_bit():
    """Steps at 4 px (8 and 16 px layers not grown), an 8 px fade, an 8 px stabilize phase and a
    16 px fade (to_rgb.4 no longer trained but its average still moving): after every step G_ema
    equals an EMA over every parameter, exactly."""
    torch.manual_seed(0)
    state = GANState.create(TINY, torch.device("cpu"), loss="wgan-gp")
    full = [p.detach().clone() for p in state.G_ema.parameters()]
    names = [name for name, _ in state.G_ema.named_parameters()]
    moved_while_untrained = set()
    for res, alpha, steps in ((4, None, 3), (8, torch.tensor(0.5), 3), (8, None, 2), (16, torch.tensor(0.5), 2)):
        state.reset_optimizers()
        reals = torch.rand(8, 3, res, res) * 2 - 1
        for _ in range(steps):
            before = [p.detach().clone() for p in state.G_ema.parameters()]
            train_step(state, reals, res, alpha)
            torch._foreach_lerp_(full, [p.detach() for p in state.G.parameters()], 1.0 - state.ema_beta)
            for name, want, got, was in zip(names, full, state.G_ema.parameters(), before):
                assert torch.equal(got, want), f"G_ema.{name} differs from the full EMA at {res}px"
                if not torch.equal(got, was) and name not in state.G.parameters_used(res, alpha is not None):
                    moved_while_untrained.add(name)
    # the test reaches the case where skipping too much would show: an untrained layer whose average moves
    assert {"to_rgb.4.weight", "to_rgb.4.bias"} <= moved_while_untrained


def test_ema_pairs_follow_a_replaced_generator():
    torch.manual_seed(0)
    state = GANState.create(TINY, torch.device("cpu"))
    ema, model = state.ema_parameters(8)
    assert len(ema) == len(model) == len(state.G_ema.parameters_grown(8))
    grown = [p for name, p in state.G.named_parameters() if name in state.G.parameters_grown(8)]
    assert all(g is p for g, p in zip(model, grown, strict=True))
    state.G = Generator(TINY)
    _, model = state.ema_parameters(8)
    assert model[0] is next(state.G.parameters())


# ----- benchmarks/step_overhead.py: its plain loop computes the project's losses -----------------

def load_step_overhead():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"
    spec = importlib.util.spec_from_file_location("step_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("res,alpha", [(4, None), (8, 0.5), (16, 0.5), (16, None)])
def test_the_benchmarks_plain_loop_computes_the_projects_losses(res, alpha):
    bench = load_step_overhead()
    d_rel, g_rel = bench.check(bench.project_state(16, "tiny"), res, 8, alpha)
    assert max(d_rel, g_rel) < 1e-5, (d_rel, g_rel)


def test_the_plain_loop_check_catches_a_different_loss(monkeypatch):
    bench = load_step_overhead()
    monkeypatch.setattr(bench, "LAMBDA", 1.0)  # the plain loop's penalty weight no longer the project's
    d_rel, _ = bench.check(bench.project_state(8, "tiny"), 8, 8, 0.5)
    assert d_rel > 1e-3


def test_step_overhead_smoke_run(capsys):
    bench = load_step_overhead()
    assert bench.main(["--widths", "tiny", "--res", "4,8", "--max-res", "16", "--batch", "4", "--steps", "1",
                       "--repeats", "1", "--warmup", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()]
    assert {(r[0], r[1]) for r in rows} == {(res, v) for res in ("4", "8") for v in ("project", "plain", "plain+ema")}
