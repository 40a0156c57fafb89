"""One ProGAN training iteration, following the seeds' procedure.

1. D step: draw latents, generate fakes without tracking G, compute D's loss on the real batch and
   the fakes (plus the gradient penalty for ``wgan-gp``), one Adam step on D.
2. G step: draw fresh latents, compute G's loss through D (D's parameters frozen), one Adam step on G.
3. EMA of G: ``G_ema = lerp(G_ema, G, 1 - beta)`` (beta 0.999, ProGAN's ``G_smoothing``).

All randomness comes from torch's default generator, whose state the checkpoint carries, so a
resumed run repeats an uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses, ops
from .networks import Discriminator, Generator, NetworkConfig
from .ops.fade_in import Alpha

ADAM_LR = 1e-3
ADAM_BETAS = (0.0, 0.99)
ADAM_EPS = 1e-8
EMA_BETA = 0.999


def make_adam(module: nn.Module, lr: float = ADAM_LR) -> torch.optim.Adam:
    """Adam with ProGAN's settings (lr 1e-3, betas (0, 0.99), eps 1e-8)."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


@dataclass
class GANState:
    """Everything one training iteration reads and updates."""

    config: NetworkConfig
    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Adam
    opt_D: torch.optim.Adam
    lr: float = ADAM_LR
    ema_beta: float = EMA_BETA
    loss: str = "nonsat"

    @classmethod
    def create(cls, config: NetworkConfig, device: torch.device, loss: str = "nonsat", lr: float = ADAM_LR,
               ema_beta: float = EMA_BETA) -> GANState:
        if loss not in losses.LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(losses.LOSSES)}")
        G = Generator(config).to(device)
        D = Discriminator(config).to(device)
        G_ema = Generator(config).to(device)
        G_ema.load_state_dict(G.state_dict())
        G_ema.requires_grad_(False)
        return cls(config, G, D, G_ema, make_adam(G, lr), make_adam(D, lr), lr, ema_beta, loss)

    def reset_optimizers(self) -> None:
        """Fresh Adam state (at every phase start, as the official code does)."""
        self.opt_G = make_adam(self.G, self.lr)
        self.opt_D = make_adam(self.D, self.lr)


def fade_reals(reals: torch.Tensor, alpha: Alpha | None) -> torch.Tensor:
    """Real images during a fade: ``lerp(up2x(down2x(x)), x, alpha)``, as sharp as G's output."""
    if alpha is None:
        return reals
    return ops.fade_reals(reals, alpha)


@dataclass
class StepLosses:
    d_loss: torch.Tensor
    g_loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def train_step(state: GANState, reals: torch.Tensor, res: int, alpha: Alpha | None) -> StepLosses:
    """One D step, one G step and the EMA update on a float batch of (already faded) reals.

    Returns detached loss tensors (no host sync here; the caller reads them when it logs).
    """
    G, D = state.G, state.D
    batch = reals.shape[0]
    latent_shape = (batch, state.config.latent_size)

    # D step.
    z = torch.randn(latent_shape, device=reals.device)
    with torch.no_grad():
        fakes = G(z, res, alpha)
    d_loss, stats = losses.discriminator_loss(state.loss, lambda x: D(x, res, alpha), reals, fakes)
    state.opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    state.opt_D.step()

    # G step, with D frozen so no weight gradients are computed for it.
    z = torch.randn(latent_shape, device=reals.device)
    D.requires_grad_(False)
    try:
        g_loss = losses.generator_loss(state.loss, D(G(z, res, alpha), res, alpha))
        state.opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        state.opt_G.step()
    finally:
        D.requires_grad_(True)

    update_ema(state.G_ema, G, state.ema_beta)
    return StepLosses(d_loss.detach(), g_loss.detach(), stats)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - beta)
