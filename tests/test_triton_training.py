"""Training with ``--backend triton`` computes what ``--backend reference`` computes.

Without a GPU the kernels run in Triton's interpreter, so the networks here are tiny. Both
backends consume the random generator identically (kernels draw no random numbers), so the same
seed gives the same latents, batches and penalty mixes, and the losses must agree step by step.
"""

from typing import NamedTuple

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


class StepsRun(NamedTuple):
    losses: torch.Tensor  # [step, (D loss, G loss)]
    state: GANState
    ema_start: list[torch.Tensor]  # G_ema's parameters before the first step


def run_steps(backend: str, loss: str, cfg: NetworkConfig = CFG, device: str = "cpu", batch: int = 4) -> StepsRun:
    ops.set_default_backend(backend, device)
    torch.manual_seed(0)
    state = GANState.create(cfg, torch.device(device), loss=loss)
    ema_start = [p.detach().clone() for p in state.G_ema.parameters()]
    data = load_default_dataset(8)
    losses = []
    for i, (res, alpha) in enumerate(STEPS):
        if i == 2:
            alpha = torch.tensor(alpha, device=device)
        level = data.at(res).to(device)
        reals = fade_reals(to_float(level[torch.randint(level.shape[0], (batch,), device=device)]), alpha)
        out = train_step(state, reals, res, alpha)
        losses.append(torch.stack([out.d_loss, out.g_loss]))
    return StepsRun(torch.stack(losses), state, ema_start)


def assert_same_ema_change(run: StepsRun, ref: StepsRun, rel: float = 0.01) -> None:
    """``run``'s G_ema moved as ``ref``'s did.

    With beta 0.999, G_ema moves about 1e-5 in a few steps: far less than a tolerance on its
    values can resolve (at 1e-3 such a comparison passes whatever the EMA did). So compare what
    changed, ``G_ema - G_ema at the start``, elementwise within ``rel`` of the largest change plus
    two float32 ulps of the parameter (the rounding of G_ema itself, the same in every backend up
    to one ulp either way). And the change must stand well above that rounding, so that a missing
    or wrong EMA update in either run fails.
    """
    def flat(tensors):
        return torch.cat([t.detach().flatten().double().cpu() for t in tensors])

    ema, ref_ema = flat(run.state.G_ema.parameters()), flat(ref.state.G_ema.parameters())
    change, ref_change = ema - flat(run.ema_start), ref_ema - flat(ref.ema_start)
    rounding = 2 * torch.finfo(torch.float32).eps * ref_ema.abs()
    largest = ref_change.abs().max().item()
    assert largest > 4 * rounding.max().item(), f"G_ema moved only {largest:.3g}: within rounding, nothing to compare"
    excess = (change - ref_change).abs() - (rel * largest + rounding)
    i = int(excess.argmax())
    assert excess[i] <= 0, (f"G_ema moved differently: element {i} by {change[i].item():.4g} here and "
                            f"{ref_change[i].item():.4g} in the reference (largest change {largest:.3g})")


@on_cpu
@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
@pytest.mark.slow
def test_training_steps_match_the_reference(loss):
    ref = run_steps("reference", loss)
    tri = run_steps("triton", loss)
    torch.testing.assert_close(tri.losses[0], ref.losses[0], rtol=1e-5, atol=1e-5)
    # Later steps follow updates made from slightly different float sums: looser, still tight.
    torch.testing.assert_close(tri.losses, ref.losses, rtol=2e-3, atol=2e-3)
    assert_same_ema_change(tri, ref)


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
    ref = run_steps("reference", loss, cfg, "cuda", batch=32)
    tri = run_steps("triton", loss, cfg, "cuda", batch=32)
    torch.testing.assert_close(tri.losses, ref.losses, rtol=5e-3, atol=5e-3)
