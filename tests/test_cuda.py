"""GPU checks (skipped without CUDA): the networks and losses compute on the GPU what they
compute on the CPU, and a short CUDA run writes checkpoints that resume on the CPU."""

import pytest
import torch

from progan_fast import losses, train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.networks import Discriminator, Generator, NetworkConfig

pytestmark = pytest.mark.cuda
CFG = NetworkConfig(max_res=32, latent_size=32, fmap_base=256, fmap_max=32)


@pytest.mark.parametrize("res,alpha", [(4, None), (16, 0.3), (32, None)])
def test_networks_and_gradients_match_the_cpu(res, alpha):
    torch.manual_seed(0)
    G, D = Generator(CFG).double(), Discriminator(CFG).double()
    z = torch.randn(6, CFG.latent_size, dtype=torch.float64)
    reals = torch.rand(6, 3, res, res, dtype=torch.float64) * 2 - 1
    results = []
    for device in ("cpu", "cuda"):
        G.to(device), D.to(device)
        G.zero_grad(), D.zero_grad()
        fakes = G(z.to(device), res, alpha)
        mix = torch.full((6, 1, 1, 1), 0.4, dtype=torch.float64, device=device)
        penalty = losses.gradient_penalty(lambda x: D(x, res, alpha), reals.to(device), fakes, mix=mix)
        loss = losses.d_logistic(D(reals.to(device), res, alpha), D(fakes, res, alpha)) + penalty
        loss.backward()
        results.append([fakes.detach().cpu(), loss.detach().cpu()]
                       + [p.grad.cpu() for p in (*G.parameters(), *D.parameters()) if p.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_a_cuda_run_resumes_on_the_cpu(tmp_path):
    tiny = ["--max-res", "8", "--kimg-per-phase", "0.1", "--batch", "8", "--fmap-base", "64", "--fmap-max", "16",
            "--latent-size", "16", "--no-progress", "--no-tensorboard", "--out", str(tmp_path / "run")]
    assert train.main(tiny + ["--device", "cuda", "--stop-after-kimg", "0.152"]) == 0
    state = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert state["rng_cuda"] and all(t.device.type == "cpu" for t in state["G"].values())
    assert train.main(tiny + ["--device", "cpu", "--resume", "auto"]) == 0
    final = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert final["phase_index"] == 3 and all(torch.isfinite(t).all() for t in final["G"].values())
