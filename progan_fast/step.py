"""One ProGAN training iteration, following the seeds' procedure.

1. D step: draw latents, generate fakes without tracking G, compute D's loss on the real batch and
   the fakes (plus the gradient penalty for ``wgan-gp``), one Adam step on D.
2. G step: draw fresh latents, compute G's loss through D (D's parameters frozen), one Adam step on G.
3. EMA of G: ``G_ema = lerp(G_ema, G, 1 - beta)`` (beta 0.999, ProGAN's ``G_smoothing``).

All randomness comes from torch's default generators, whose state the checkpoint carries, so a
resumed run repeats an uninterrupted one bit for bit on the CPU.

Mixed precision (``--amp``): the forward passes run under ``torch.autocast`` (bf16 by default,
fp16 on request); every op casts its activations to that dtype and accumulates in float32 (see
:mod:`progan_fast.ops._amp`). D's outputs are cast to float32 before the losses, the gradient
penalty's gradient and norm are float32, and the parameters (master weights), their gradients and
Adam's state stay float32. fp16 adds dynamic loss scaling that never leaves the device
(:class:`DeviceLossScaler`).

:class:`Iteration` is the whole iteration on buffers whose addresses never change (the dataset or
a batch buffer, a 0-dim alpha tensor, loss accumulators): the unit a CUDA graph captures. Its op
sequence and shapes do not depend on alpha or the data, and it never syncs with the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses, ops
from .profiling import nvtx_range
from .data import to_float
from .networks import Discriminator, Generator, NetworkConfig
from .ops.fade_in import Alpha

ADAM_LR = 1e-3
ADAM_BETAS = (0.0, 0.99)
ADAM_EPS = 1e-8
EMA_BETA = 0.999

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_adam(module: nn.Module, lr: float = ADAM_LR, fused: bool = False, capturable: bool = False) -> torch.optim.Adam:
    """Adam with ProGAN's settings (lr 1e-3, betas (0, 0.99), eps 1e-8).

    ``fused`` keeps the step count on the device and can skip an update on the device (fp16 loss
    scaling hands it ``found_inf``), so a fused step never syncs with the host, on the CPU too;
    ``capturable`` is what CUDA graph capture requires of any Adam.
    """
    return torch.optim.Adam(module.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            fused=fused or None, capturable=capturable)


class DeviceLossScaler:
    """Dynamic loss scaling for fp16 whose every decision happens on the device.

    The same policy as ``torch.amp.GradScaler`` (start at 2**16, halve on an overflow, double after
    2000 clean steps) without its host reads: the overflow check and unscale is one
    ``_amp_foreach_non_finite_check_and_unscale_`` into a device flag, the fused Adam reads that
    flag and leaves parameters, moments and step count untouched when it is set, and
    ``_amp_update_scale_`` backs the scale off or grows it in place. So it works inside a CUDA graph.
    """

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale, set ``found_inf`` if any is not finite, and tell the
        (fused) optimizer to skip its step when it is."""
        grads: dict[torch.dtype, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads.setdefault(p.grad.dtype, []).append(p.grad)
        self.found_inf.zero_()
        inv_scale = self.scale.reciprocal()
        for same_dtype in grads.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, self.found_inf, inv_scale)
        optimizer.grad_scale = None
        optimizer.found_inf = self.found_inf

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().cpu(), "growth_tracker": self.growth_tracker.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


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
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for float32
    fused_adam: bool = False
    capturable: bool = False
    scaler_D: DeviceLossScaler | None = None  # fp16 only
    scaler_G: DeviceLossScaler | None = None

    @classmethod
    def create(cls, config: NetworkConfig, device: torch.device, loss: str = "nonsat", lr: float = ADAM_LR,
               ema_beta: float = EMA_BETA, amp_dtype: torch.dtype | None = None, fused_adam: bool = False,
               capturable: bool = False) -> GANState:
        if loss not in losses.LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(losses.LOSSES)}")
        if amp_dtype not in (None, *AMP_DTYPES.values()):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, not {amp_dtype}")
        fp16 = amp_dtype == torch.float16
        fused_adam = fused_adam or fp16  # only the fused Adam can skip a step on the device
        G = Generator(config).to(device)
        D = Discriminator(config).to(device)
        G_ema = Generator(config).to(device)
        G_ema.load_state_dict(G.state_dict())
        G_ema.requires_grad_(False)
        return cls(config, G, D, G_ema, make_adam(G, lr, fused_adam, capturable), make_adam(D, lr, fused_adam, capturable),
                   lr, ema_beta, loss, amp_dtype, fused_adam, capturable,
                   DeviceLossScaler(device) if fp16 else None, DeviceLossScaler(device) if fp16 else None)

    def reset_optimizers(self) -> None:
        """Fresh Adam state (at every phase start, as the official code does)."""
        self.opt_G = make_adam(self.G, self.lr, self.fused_adam, self.capturable)
        self.opt_D = make_adam(self.D, self.lr, self.fused_adam, self.capturable)

    def autocast(self, device_type: str):
        """The autocast region of the forward passes (a no-op context without ``--amp``). Autocast's
        weight cache is off: it must be under CUDA graph capture, and our ops do their own casts."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype, cache_enabled=False)


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

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"D_loss": self.d_loss, "G_loss": self.g_loss, **self.stats}


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: DeviceLossScaler | None,
                       net: str) -> None:
    with nvtx_range(f"{net} backward"):
        (loss if scaler is None else loss * scaler.scale).backward()
    with nvtx_range(f"{net} optimizer"):
        if scaler is not None:
            scaler.unscale_(optimizer)
        optimizer.step()  # skipped on the device when scaler.found_inf is set
        if scaler is not None:
            scaler.update()


def train_step(state: GANState, reals: torch.Tensor, res: int, alpha: Alpha | None) -> StepLosses:
    """One D step, one G step and the EMA update on a float batch of (already faded) reals.

    Returns detached float32 loss tensors (no host sync here; the caller reads them when it logs).
    """
    G, D = state.G, state.D
    batch = reals.shape[0]
    latent_shape = (batch, state.config.latent_size)
    autocast = state.autocast(reals.device.type)

    def critic(x: torch.Tensor) -> torch.Tensor:
        return D(x, res, alpha).float()

    # D step. The "D forward" range holds G's fakes, D on reals and fakes, and the penalty.
    with nvtx_range("D forward"):
        z = torch.randn(latent_shape, device=reals.device)
        with autocast:
            with torch.no_grad():
                fakes = G(z, res, alpha)
            scale = state.scaler_D.scale if state.scaler_D is not None else None
            d_loss, stats = losses.discriminator_loss(state.loss, critic, reals, fakes, grad_scale=scale)
    state.opt_D.zero_grad(set_to_none=True)
    _backward_and_step(d_loss, state.opt_D, state.scaler_D, "D")

    # G step, with D frozen so no weight gradients are computed for it.
    D.requires_grad_(False)
    try:
        with nvtx_range("G forward"):
            z = torch.randn(latent_shape, device=reals.device)
            with autocast:
                g_loss = losses.generator_loss(state.loss, critic(G(z, res, alpha)))
        state.opt_G.zero_grad(set_to_none=True)
        _backward_and_step(g_loss, state.opt_G, state.scaler_G, "G")
    finally:
        D.requires_grad_(True)

    with nvtx_range("EMA"):
        update_ema(state.G_ema, G, state.ema_beta)
    return StepLosses(d_loss.detach(), g_loss.detach(), stats)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - beta)


class Iteration:
    """The whole iteration of one (resolution, phase) on static buffers.

    - ``images``: the dataset at ``res`` (uint8) on the training device; each call samples its
      batch from it on the device. Or None: then :meth:`load_batch` fills ``batch_buffer`` from a
      host copy before each call (for datasets too large for GPU memory).
    - ``alpha``: a 0-dim float32 device tensor the caller fills in place (``set_alpha``); read only
      in a fade phase.
    - ``sums``: on-device running sums of the step's losses (created by the first call), read and
      zeroed by :meth:`read_sums` when the trainer logs.

    A call draws its randomness in the same order as the eager loop always did (batch indices, D's
    latents, the penalty's mix, G's latents), so a captured and an eager run see the same numbers.
    """

    def __init__(self, state: GANState, res: int, batch: int, fade: bool, device: torch.device,
                 images: torch.Tensor | None) -> None:
        self.state, self.res, self.batch, self.fade = state, res, batch, fade
        self.images = images
        self.batch_buffer = None if images is not None else torch.empty((batch, 3, res, res), dtype=torch.uint8, device=device)
        self.alpha = torch.ones((), dtype=torch.float32, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self._staging: torch.Tensor | None = None
        self._staged: torch.cuda.Event | None = None

    def set_alpha(self, alpha: float | None) -> None:
        self.alpha.fill_(1.0 if alpha is None else alpha)

    def load_batch(self, host_images: torch.Tensor) -> None:
        """Sample this step's batch from a host-resident dataset and copy it into ``batch_buffer``.

        The indices come from the CPU generator. On CUDA the copy goes through a pinned staging
        buffer without blocking; the only wait is for the previous step's copy out of that buffer.
        """
        idx = torch.randint(host_images.shape[0], (self.batch,))
        if self.batch_buffer.device.type != "cuda":
            torch.index_select(host_images, 0, idx, out=self.batch_buffer)
            return
        if self._staging is None:
            self._staging = torch.empty(self.batch_buffer.shape, dtype=torch.uint8, pin_memory=True)
            self._staged = torch.cuda.Event()
        else:
            self._staged.synchronize()
        torch.index_select(host_images, 0, idx, out=self._staging)
        self.batch_buffer.copy_(self._staging, non_blocking=True)
        self._staged.record()

    def __call__(self) -> None:
        alpha = self.alpha if self.fade else None
        with nvtx_range("data"):
            if self.images is not None:
                idx = torch.randint(self.images.shape[0], (self.batch,), device=self.images.device)
                batch = self.images[idx]
            else:
                batch = self.batch_buffer
            reals = fade_reals(to_float(batch), alpha)
        out = train_step(self.state, reals, self.res, alpha)
        for name, value in out.as_dict().items():
            if name in self.sums:
                self.sums[name].add_(value)
            else:
                self.sums[name] = value.detach().float().clone()

    def read_sums(self) -> dict[str, float]:
        """``{name: sum since the last read}``, then zero the sums: the loop's one host sync."""
        values = {k: float(v) for k, v in self.sums.items()}
        for v in self.sums.values():
            v.zero_()
        return values
