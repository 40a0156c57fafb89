"""Training with ``--backend triton`` computes what ``--backend reference`` computes.

Without a GPU the kernels run in Triton's interpreter, so the networks here are tiny. Both
backends consume the random generator identically (kernels draw no random numbers), so the same
seed gives the same latents, batches and penalty mixes, and the losses must agree step by step.
"""

import pytest
import torch

from progan_fast import ops, train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.data import load_default_dataset, to_float
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import fade_reals, train_step

CFG = NetworkConfig(max_res=8, latent_size=8, fmap_base=24, fmap_max=6)
STEPS = [(4, None), (8, 0.0), (8, 0.5), (8, None)]  # 4x4, a fade (alpha as float and tensor), 8x8


def triton_ready(device_type: str) -> bool:
    try:
        ops.set_default_backend("triton", device_type)
        return True
    except ops.BackendUnavailableError:
        return False
    finally:
        ops.set_default_backend("reference")


# The CPU tests need the interpreter (set by conftest where there is no GPU); the GPU twin needs CUDA.
on_cpu = pytest.mark.skipif(not triton_ready("cpu"), reason="Triton on the CPU needs TRITON_INTERPRET=1")


def run_steps(backend: str, loss: str, cfg: NetworkConfig = CFG, device: str = "cpu", batch: int = 4):
    ops.set_default_backend(backend, device)
    torch.manual_seed(0)
    state = GANState.create(cfg, torch.device(device), loss=loss)
    data = load_default_dataset(8)
    losses = []
    for i, (res, alpha) in enumerate(STEPS):
        if i == 2:
            alpha = torch.tensor(alpha, device=device)
        level = data.at(res).to(device)
        reals = fade_reals(to_float(level[torch.randint(level.shape[0], (batch,), device=device)]), alpha)
        out = train_step(state, reals, res, alpha)
        losses.append(torch.stack([out.d_loss, out.g_loss]))
    return torch.stack(losses), state


@on_cpu
@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
def test_training_steps_match_the_reference(loss):
    ref_losses, ref_state = run_steps("reference", loss)
    tri_losses, tri_state = run_steps("triton", loss)
    torch.testing.assert_close(tri_losses[0], ref_losses[0], rtol=1e-5, atol=1e-5)
    # Later steps follow updates made from slightly different float sums: looser, still tight.
    torch.testing.assert_close(tri_losses, ref_losses, rtol=2e-3, atol=2e-3)
    for a, b in zip(tri_state.G_ema.parameters(), ref_state.G_ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@on_cpu
def test_cli_trains_with_the_triton_backend(tmp_path, capsys):
    args = ["--max-res", "4", "--kimg-per-phase", "0.008", "--batch", "4", "--fmap-base", "16", "--fmap-max", "4",
            "--latent-size", "8", "--no-progress", "--no-tensorboard", "--device", "cpu"]
    assert train.main(args + ["--backend", "triton", "--out", str(tmp_path / "tri")]) == 0
    assert "backend triton" in capsys.readouterr().err
    assert train.main(args + ["--backend", "reference", "--out", str(tmp_path / "ref")]) == 0
    tri = load_checkpoint(list_checkpoints(tmp_path / "tri" / "checkpoints")[-1])
    ref = load_checkpoint(list_checkpoints(tmp_path / "ref" / "checkpoints")[-1])
    for name in ref["G"]:
        torch.testing.assert_close(tri["G"][name], ref["G"][name], rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not triton_ready("cuda"), reason="the Triton backend is not available on CUDA here")
@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
def test_training_steps_match_the_reference_on_gpu(loss):
    cfg = NetworkConfig(max_res=8, latent_size=128, fmap_base=1024, fmap_max=128)
    ref_losses, _ = run_steps("reference", loss, cfg, "cuda", batch=32)
    tri_losses, _ = run_steps("triton", loss, cfg, "cuda", batch=32)
    torch.testing.assert_close(tri_losses, ref_losses, rtol=5e-3, atol=5e-3)
