"""What a ProGAN run trains: G, D, the EMA of G, their Adam optimizers and fp16 loss scalers.

:class:`GANState` holds them together with the settings of the update (loss, learning rate, EMA
beta, autocast dtype); :mod:`progan_fast.step` performs one training iteration on it, and the
trainer builds it, checkpoints it and restores it.

- Adam follows ProGAN (lr 1e-3, betas (0, 0.99), eps 1e-8). The trainer always uses the fused
  Adam, because only it can skip a step on the device: a step whose loss or a gradient is NaN or
  inf hands the optimizer a device flag and the fused Adam leaves weights, moments and step count
  untouched, with no host sync.
- Mixed precision (``--amp``): :meth:`GANState.autocast` is the region the forward passes run in
  (bf16 by default, fp16 on request); parameters (master weights), their gradients and Adam's
  state stay float32. fp16 adds dynamic loss scaling that never leaves the device
  (:class:`DeviceLossScaler`), so it works inside a CUDA graph.
- Data parallel (``torchrun``): ``world`` says which rank this is, and
  :meth:`GANState.wrap_data_parallel` wraps D and G in ``DistributedDataParallel`` for each phase.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses
from .distributed import SINGLE, World
from .networks import Discriminator, Generator, NetworkConfig

ADAM_LR = 1e-3
ADAM_BETAS = (0.0, 0.99)
ADAM_EPS = 1e-8
EMA_BETA = 0.999

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_adam(module: nn.Module, lr: float = ADAM_LR, fused: bool = False, capturable: bool = False) -> torch.optim.Adam:
    """Adam with ProGAN's settings (lr 1e-3, betas (0, 0.99), eps 1e-8).

    ``fused`` keeps the step count on the device and can skip an update on the device (fp16 loss
    scaling hands it ``found_inf``), so a fused step never syncs with the host, on the CPU too;
    ``capturable`` is what CUDA graph capture requires of any Adam. The trainer always uses the
    fused Adam: only it can skip a non-finite step without a host sync.
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
    fused_adam: bool = True
    capturable: bool = False
    scaler_D: DeviceLossScaler | None = None  # fp16 only
    scaler_G: DeviceLossScaler | None = None
    world: World = SINGLE
    D_train: nn.Module | None = None  # D or G wrapped in DistributedDataParallel, for the passes that
    G_train: nn.Module | None = None  # train them (None: the plain networks)
    _ema_pairs: dict = field(default_factory=dict, repr=False)  # res -> (G, G_ema, their grown parameters)
    found_inf: dict[str, torch.Tensor] = field(default_factory=dict)  # per optimizer: skip this step?
    cond_weight: float = 1.0  # weight of the class terms of a conditional run's losses
    channels_last: bool = False  # the networks' activations in NHWC (networks.Generator.use_channels_last)
    gp_resolution: str = "max"  # the gradient penalty's scale (losses.GP_RESOLUTIONS, losses.penalty_norm_scale)

    @classmethod
    def create(cls, config: NetworkConfig, device: torch.device, loss: str = "nonsat", lr: float = ADAM_LR,
               ema_beta: float = EMA_BETA, amp_dtype: torch.dtype | None = None, fused_adam: bool = True,
               capturable: bool = False, cond_weight: float = 1.0, channels_last: bool = False,
               gp_resolution: str = "max") -> GANState:
        if loss not in losses.LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(losses.LOSSES)}")
        if amp_dtype not in (None, *AMP_DTYPES.values()):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, not {amp_dtype}")
        fp16 = amp_dtype == torch.float16
        fused_adam = fused_adam or fp16  # only the fused Adam can skip a step on the device
        G = Generator(config).to(device).use_channels_last(channels_last)
        D = Discriminator(config).to(device).use_channels_last(channels_last)
        G_ema = Generator(config).to(device).use_channels_last(channels_last)
        G_ema.load_state_dict(G.state_dict())
        G_ema.requires_grad_(False)
        return cls(config, G, D, G_ema, make_adam(G, lr, fused_adam, capturable), make_adam(D, lr, fused_adam, capturable),
                   lr, ema_beta, loss, amp_dtype, fused_adam, capturable,
                   DeviceLossScaler(device) if fp16 else None, DeviceLossScaler(device) if fp16 else None,
                   cond_weight=cond_weight, channels_last=channels_last, gp_resolution=gp_resolution)

    def wrap_data_parallel(self, world: World, device: torch.device, res: int, fading: bool) -> None:
        """Wrap D and G in ``DistributedDataParallel`` for one phase of a multi-rank run (a no-op
        for one rank); called at every phase start.

        Each phase trains only some of the layers (the networks hold every resolution's), so the
        wrappers are rebuilt per phase and told to ignore the others: DDP then all-reduces exactly
        the gradients the phase produces, without ``find_unused_parameters``'s graph walk at every
        step. DDP broadcasts rank 0's weights when it is built. The G step runs through the plain D
        (frozen) and the D step's fakes come from the plain G, so a DDP module is only called in a
        pass whose backward trains it, as DDP requires.
        """
        self.world = world
        if not world.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The old wrappers must be gone before new ones hook the same parameters.
        self.D_train = self.G_train = None
        gc.collect()
        ids = [device.index] if device.type == "cuda" else None
        wrapped = []
        for net in (self.D, self.G):
            unused = {name for name, _ in net.named_parameters()} - net.parameters_used(res, fading)
            DDP._set_params_and_buffers_to_ignore_for_model(net, sorted(unused))
            wrapped.append(DDP(net, device_ids=ids))  # no buffers: nothing else to sync
        self.D_train, self.G_train = wrapped

    def reset_optimizers(self, lr: float | None = None) -> None:
        """Fresh Adam state (at every phase start, as the official code does), with the phase's
        learning rate ``lr`` (the official code's is per resolution) when given."""
        if lr is not None:
            self.lr = lr
        self.opt_G = make_adam(self.G, self.lr, self.fused_adam, self.capturable)
        self.opt_D = make_adam(self.D, self.lr, self.fused_adam, self.capturable)

    def ema_parameters(self, res: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(G_ema's, G's)`` parameters, pairwise, of the layers grown by ``res``: what the EMA
        updates in a step at ``res`` (cached per resolution).

        The layers above ``res`` are left out, which changes no bit of G_ema: those layers of G
        and G_ema start equal (:meth:`create` copies G into G_ema, and a grown run's new layers
        are fresh in both), they get no gradient, so Adam leaves G's unchanged, and ``lerp`` of
        two equal values returns that value exactly. So G_ema is bit for bit the official code's
        moving average over every variable, without the reads and writes of layers that cannot
        change (at paper widths and ``max_res`` 256, most of G at 4 px). Layers below ``res``
        that the phase no longer trains, such as an earlier toRGB, stay in: their average still
        moves towards G's last values, as in the official code.

        G may be wrapped (``torch.compile`` in the benchmark): it is matched to G_ema by order.
        """
        cached = self._ema_pairs.get(res)
        if cached is None or cached[0] is not self.G or cached[1] is not self.G_ema:
            grown = self.G_ema.parameters_grown(res)
            pairs = [(e, g) for (name, e), g in zip(self.G_ema.named_parameters(), self.G.parameters(), strict=True)
                     if name in grown]
            cached = self._ema_pairs[res] = (self.G, self.G_ema, [e for e, _ in pairs], [g for _, g in pairs])
        return cached[2], cached[3]

    def autocast(self, device_type: str):
        """The autocast region of the forward passes (a no-op context without ``--amp``). Autocast's
        weight cache is off: it must be under CUDA graph capture, and our ops do their own casts."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype, cache_enabled=False)

    def snapshot(self) -> Callable[[], None]:
        """Save what a training step changes here; the returned function puts it back bit for bit.

        For steps that are only timed (:mod:`progan_fast.step_choice`): the three networks'
        parameters and buffers (restored in place, so every reference to them stays valid), both
        optimizers' state (the step count included), the fp16 loss scales, and the gradients
        (the tensors themselves: a step replaces them with new ones, it never writes into the old
        ones). torch's random generators are the caller's to save."""
        nets = (self.G, self.D, self.G_ema)
        tensors = [t for net in nets for t in (*net.parameters(), *net.buffers())]
        saved = [t.detach().clone() for t in tensors]
        grads = [(p, p.grad) for net in (self.G, self.D) for p in net.parameters()]
        optimizers = (self.opt_G, self.opt_D)
        opt_states = [{p: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
                       for p, s in opt.state.items()} for opt in optimizers]
        scalers = [(sc, {k: v.clone() for k, v in sc.state_dict().items()})
                   for sc in (self.scaler_D, self.scaler_G) if sc is not None]

        def restore() -> None:
            with torch.no_grad():
                for t, value in zip(tensors, saved):
                    t.copy_(value)
            for p, grad in grads:
                p.grad = grad
            for opt, state in zip(optimizers, opt_states):
                opt.state.clear()
                opt.state.update(state)
            for scaler, state in scalers:
                scaler.load_state_dict(state)

        return restore

    def non_finite_networks(self) -> list[str]:
        """Names of the networks holding a NaN or inf parameter (one device reduction, one sync)."""
        nets = {"G": self.G, "D": self.D, "G_ema": self.G_ema}
        finite = torch.stack([torch.stack([p.isfinite().all() for p in net.parameters()]).all()
                              for net in nets.values()]).tolist()
        return [name for name, ok in zip(nets, finite) if not ok]
