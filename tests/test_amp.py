"""Mixed precision (``--amp``) on the CPU: what is low precision, what stays float32, and fp16 loss
scaling that skips an overflowing step and backs off without ever reading a value on the host."""

import pytest
import torch

from progan_fast import losses, ops, train
from progan_fast.gan_state import DeviceLossScaler, GANState, make_adam
from progan_fast.networks import Discriminator, Generator, NetworkConfig
from progan_fast.step import train_step

from test_training import TINY, final_state, synthetic_images

CFG = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_op_runs_in_the_autocast_dtype_and_leaves_alpha_alone(dtype, backend):
    if backend not in ops.conv_act.IMPLEMENTATIONS:
        pytest.skip("triton is not available")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 4)
    w, b = torch.randn(6, 5, 3, 3), torch.randn(6)
    alpha = torch.tensor(0.3)
    with torch.autocast("cpu", dtype=dtype):
        outs = {
            "conv": ops.conv2d_bias_lrelu(x, w, b, 0.2, pixel_norm=True, backend=backend),
            "pixel_norm": ops.pixel_norm(x, backend=backend),
            "mbstd": ops.minibatch_stddev(x, 2, backend=backend),
            "fade_in": ops.fade_in(x[:, :3, :2, :2], x[:, :3], alpha, backend=backend),
            "blend": ops.blend(x, x.flip(0), alpha, backend=backend),
            "downsample2x": ops.downsample2x(x, backend=backend),
            "fade_reals": ops.fade_reals(x, alpha, backend=backend),
        }
    for name, out in outs.items():
        assert out.dtype == dtype, name
    assert alpha.dtype == torch.float32
    # Same values as the op run on inputs cast by hand, outside autocast.
    expected = ops.blend(x.to(dtype), x.flip(0).to(dtype), alpha, backend=backend)
    torch.testing.assert_close(outs["blend"], expected)
    tol = dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(outs["pixel_norm"].float(), ops.pixel_norm(x, backend="reference"), **tol)
    torch.testing.assert_close(outs["conv"].float(), ops.conv2d_bias_lrelu(x, w, b, 0.2, pixel_norm=True,
                                                                           backend="reference"), **tol)


def test_float64_is_never_cast():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.pixel_norm(x).dtype == torch.float64
        assert ops.downsample2x(x).dtype == torch.float64


@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
def test_bf16_losses_and_gradients_track_float32(loss):
    """Activations are bf16, but the losses are float32 and the weight gradients, which stay float32,
    point where the float32 ones do."""
    torch.manual_seed(0)
    G, D = Generator(CFG), Discriminator(CFG)
    reals = synthetic_images(16, 8)
    z = torch.randn(16, CFG.latent_size)
    results = {}
    for amp in (False, True):
        D.zero_grad()
        torch.manual_seed(1)  # the penalty's mix
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            fakes = G(z, 8, 0.5)
            assert fakes.dtype == (torch.bfloat16 if amp else torch.float32)
            d_loss, _ = losses.discriminator_loss(loss, lambda x: D(x, 8, 0.5).float(), reals, fakes)
        assert d_loss.dtype == torch.float32
        d_loss.backward()
        grads = torch.cat([p.grad.flatten() for p in D.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in D.parameters())
        results[amp] = (d_loss.detach(), grads)
    (l32, g32), (l16, g16) = results[False], results[True]
    assert abs(l16 - l32) < 0.02 * max(1.0, abs(l32))
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.98, cos


@pytest.mark.slow  # autocast on the CPU: minutes on a busy 2-core machine
@pytest.mark.parametrize("dtype", LOW)
def test_an_amp_training_step_keeps_weights_and_adam_state_float32(dtype):
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), loss="wgan-gp", amp_dtype=dtype)
    before = [p.clone() for p in state.G.parameters()]
    for _ in range(3):
        out = train_step(state, synthetic_images(8, 8), 8, torch.tensor(0.5))
    assert out.d_loss.dtype == out.g_loss.dtype == torch.float32
    assert torch.isfinite(out.d_loss) and torch.isfinite(out.g_loss)
    for net in (state.G, state.D, state.G_ema):
        assert all(p.dtype == torch.float32 for p in net.parameters())
    for opt in (state.opt_G, state.opt_D):
        for s in opt.state.values():
            assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
    assert any(not torch.equal(a, b) for a, b in zip(before, state.G.parameters()))
    assert (state.scaler_D is not None) == (dtype == torch.float16)


@pytest.mark.slow  # autocast on the CPU: minutes on a busy 2-core machine
def test_fp16_overflow_skips_the_step_and_backs_off_the_scale():
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), amp_dtype=torch.float16)
    reals = synthetic_images(8, 8)
    for scaler in (state.scaler_D, state.scaler_G):
        scaler.scale.fill_(1024.0)  # 2**16, the default start, overflows in the first steps; that is its job
    train_step(state, reals, 8, None)  # a clean step first, so Adam has state to protect
    assert float(state.scaler_D.found_inf) == 0.0 and int(state.scaler_D.growth_tracker) == 1

    huge = 2.0**40  # far above fp16 range (65504): the first fp16 gradient is inf
    state.scaler_D.scale.fill_(huge)  # loss * scale overflows: every gradient is inf
    D_before = {k: v.clone() for k, v in state.D.state_dict().items()}
    adam_before = {k: v.clone() for s in state.opt_D.state.values() for k, v in s.items()}
    G_before = [p.clone() for p in state.G.parameters()]
    train_step(state, reals, 8, None)

    assert float(state.scaler_D.found_inf) == 1.0
    assert float(state.scaler_D.scale) == huge * 0.5
    assert int(state.scaler_D.growth_tracker) == 0
    for k, v in state.D.state_dict().items():
        assert torch.equal(v, D_before[k]), f"D.{k} changed in a skipped step"
    after = {k: v for s in state.opt_D.state.values() for k, v in s.items()}
    for k, v in adam_before.items():
        assert torch.equal(after[k], v), f"Adam's {k} changed in a skipped step"
    # G's own scaler did not overflow, so G still trained.
    assert float(state.scaler_G.found_inf) == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(G_before, state.G.parameters()))

    # Overflows keep halving the scale until a step fits; then D trains again.
    for _ in range(40):
        train_step(state, reals, 8, None)
        if float(state.scaler_D.found_inf) == 0.0:
            break
    assert float(state.scaler_D.scale) < 2.0**16
    assert float(state.scaler_D.found_inf) == 0.0
    assert any(not torch.equal(v, D_before[k]) for k, v in state.D.state_dict().items())


def test_the_loss_scale_grows_after_a_run_of_clean_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_adam(torch.nn.ParameterList([p]), fused=True)
    scaler = DeviceLossScaler(torch.device("cpu"), init_scale=8.0, growth_interval=2)
    for _ in range(2):
        opt.zero_grad()
        (p.sum() * scaler.scale).backward()
        scaler.unscale_(opt)
        torch.testing.assert_close(p.grad, torch.ones(3))  # unscaled before Adam sees it
        opt.step()
        scaler.update()
    assert float(scaler.scale) == 16.0


@pytest.mark.slow  # autocast on the CPU: minutes on a busy 2-core machine
def test_amp_cli_runs_and_its_checkpoint_resumes_in_float32(tmp_path):
    """An fp16 run (fused Adam, loss scale in the checkpoint) resumes without --amp and vice versa."""
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--amp", "--amp-dtype", "fp16", "--stop-after-kimg", "0.152"]) == 0
    state = final_state(out)
    assert state["loss_scale"]["D"]["scale"] > 0
    assert train.main(TINY + ["--out", str(out), "--resume", "auto", "--stop-after-kimg", "0.3"]) == 0
    assert final_state(out)["loss_scale"] == {}
    assert train.main(TINY + ["--out", str(out), "--resume", "auto", "--amp"]) == 0
    final = final_state(out)
    assert final["phase_index"] == 3
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in final["G"].values())


@pytest.mark.slow  # autocast on the CPU: minutes on a busy 2-core machine
def test_cuda_graphs_flag_on_the_cpu_says_so_and_trains(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--cuda-graphs", "--device", "cpu", "--stop-after-kimg", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "--cuda-graphs needs a CUDA device" in err
    assert final_state(out)["images"] >= 50
