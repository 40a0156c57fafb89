"""One ProGAN training iteration on a :class:`~progan_fast.gan_state.GANState`, following the seeds' procedure.

1. D step: draw latents, generate fakes without tracking G, compute D's loss on the real batch and
   the fakes (plus the gradient penalty for ``wgan-gp``), one Adam step on D.
2. G step: draw fresh latents, compute G's loss through D (D's parameters frozen), one Adam step on G.
3. EMA of G: ``G_ema = lerp(G_ema, G, 1 - beta)`` (beta 0.999, ProGAN's ``G_smoothing``), over
   the layers grown so far; the others are equal in both (:meth:`GANState.ema_parameters`).

All randomness comes from torch's default generators, whose state the checkpoint carries, so a
resumed run repeats an uninterrupted one bit for bit on the CPU.

Non-finite losses: every optimizer step first checks, on the device, whether its loss or any of
its gradients is NaN or inf, and hands that flag to the fused Adam, which then leaves the weights,
moments and step count untouched. An isolated bad step is skipped; :class:`Iteration` counts them
and the longest run of consecutive ones, and the trainer stops a run whose losses stay non-finite.
Nothing here reads the flag on the host. (The official code has no such guard; StyleGAN3 replaces
non-finite gradients with numbers instead. Skipping keeps the last good weights.)

Data parallel (``torchrun``): each rank draws the global batch's latents and mixing factors and
keeps its rows (:meth:`progan_fast.distributed.World.take`); the D and G passes that train run
through the ``DistributedDataParallel`` wrappers of the state, which average the gradients, so a
skip caused by any rank's non-finite loss happens on every rank.

Mixed precision (``--amp``): the forward passes run under the state's autocast; every op casts its
activations to that dtype and accumulates in float32 (see :mod:`progan_fast.ops._amp`). D's outputs
are cast to float32 before the losses, and the gradient penalty's gradient and norm are float32.

:class:`Iteration` is the whole iteration on buffers whose addresses never change (the dataset or
a batch buffer, a 0-dim alpha tensor, loss accumulators): the unit a CUDA graph captures. Its op
sequence and shapes do not depend on alpha or the data, and it never syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses, ops
from .augment import Augment
from .data import mirror, to_float
from .gan_state import DeviceLossScaler, GANState
from .ops.common import Alpha
from .profiling import nvtx_range


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
    non_finite: torch.Tensor | None = None  # 0-dim float32: 1.0 if D's or G's loss was not finite

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"D_loss": self.d_loss, "G_loss": self.g_loss, **self.stats}


def _backward_and_step(state: GANState, loss: torch.Tensor, net: str) -> torch.Tensor:
    """Backward, then one Adam step on ``net`` unless its loss or a gradient is not finite.

    Returns a 0-dim float32 device flag, 1.0 when this rank's loss was not finite. A non-finite
    loss scales the backward pass by NaN, so every gradient it reaches is NaN even where the
    NaN or inf would not have reached the gradients by itself (a loss term that is only added,
    say). The skip decision then reads the gradients alone. Under DDP these were already averaged
    over the ranks, so a NaN from any rank is in every rank's gradients and all ranks skip together,
    with no collective of our own (which would cost a round trip per optimizer step). In
    fp16 the gradient check also catches the loss scaler's normal overflows; those are not counted
    as bad steps.
    """
    optimizer: torch.optim.Optimizer = getattr(state, f"opt_{net}")
    scaler: DeviceLossScaler | None = getattr(state, f"scaler_{net}")
    loss_bad = loss.detach().isfinite().logical_not()
    with nvtx_range(f"{net} backward"):
        poison = torch.where(loss_bad, float("nan"), 1.0)  # exactly 1.0: finite steps are unchanged
        (loss * (poison if scaler is None else poison * scaler.scale)).backward()
    with nvtx_range(f"{net} optimizer"):
        if scaler is not None:
            scaler.unscale_(optimizer)  # sets scaler.found_inf from the gradients
            found_inf = scaler.found_inf
        else:
            found_inf = state.found_inf.get(net)
            if found_inf is None:
                found_inf = state.found_inf[net] = torch.zeros((), dtype=torch.float32, device=loss.device)
            _check_gradients(optimizer, found_inf)
        if optimizer.defaults.get("fused"):
            optimizer.grad_scale = None
            optimizer.found_inf = found_inf  # the fused Adam skips its step on the device when set
            optimizer.step()
        elif not found_inf.item():  # any other Adam (only tests build one) needs the host to skip
            optimizer.step()
        if scaler is not None:
            scaler.update()  # a skipped step also halves the loss scale
    return loss_bad.float()


def _check_gradients(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Set ``found_inf`` to 1 if any gradient is NaN or inf (one fused pass, on the device)."""
    found_inf.zero_()
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grads.setdefault(p.grad.dtype, []).append(p.grad)
    one = torch.ones((), dtype=torch.float32, device=found_inf.device)
    for same_dtype in grads.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found_inf, one)


def train_step(state: GANState, reals: torch.Tensor, res: int, alpha: Alpha | None,
               real_labels: torch.Tensor | None = None, label_pool: torch.Tensor | None = None,
               augment: Augment | None = None) -> StepLosses:
    """One D step, one G step and the EMA update on a float batch of (already faded) reals.

    ``reals`` is this rank's slice of the global batch (the whole batch for one rank). Returns
    detached float32 loss tensors (no host sync here; the caller reads them when it logs).

    Conditional networks also take ``real_labels`` (the reals' classes) and ``label_pool``, the
    dataset's labels on the device: each fake's class is the label of a uniformly drawn image, so
    fake classes follow the real label distribution (the official ``get_random_labels``).

    ``augment`` (``--augment``): every image D sees -- reals, fakes, the penalty's mixes, in the D
    and the G step -- goes through it first (:mod:`progan_fast.augment`), and with ``--augment-p
    ada`` D's scores on the reals adjust its probability.
    """
    G, D, world = state.G, state.D, state.world
    D_train, G_train = state.D_train or D, state.G_train or G
    global_batch = reals.shape[0] * world.size
    latent_shape = (global_batch, state.config.latent_size)
    autocast = state.autocast(reals.device.type)
    conditional = state.config.num_classes > 0
    if conditional and (real_labels is None or label_pool is None):
        raise ValueError("conditional networks need the reals' labels and the label pool")

    def fake_labels() -> torch.Tensor | None:
        if not conditional:
            return None
        return world.take(label_pool[torch.randint(label_pool.shape[0], (global_batch,), device=reals.device)])

    def critic(net: nn.Module, watch_reals: bool = False):
        if augment is None:
            return lambda x: net(x, res, alpha).float()

        def run(x: torch.Tensor) -> torch.Tensor:
            out = net(augment(x, global_batch, world.take), res, alpha).float()
            if watch_reals and x is reals:  # D's scores on this step's reals: ADA's overfitting statistic
                augment.observe(losses.split_outputs(out)[0], global_batch, world.sum_)
            return out
        return run

    # D step. The "D forward" range holds G's fakes, D on reals and fakes, and the penalty.
    with nvtx_range("D forward"):
        z = world.take(torch.randn(latent_shape, device=reals.device))
        labels_d = fake_labels()
        with autocast:
            with torch.no_grad():
                fakes = G(z, res, alpha, labels_d)
            mix = None
            if state.loss in losses.PENALIZED:  # drawn here (not in the loss) so that ranks can slice it
                mix = world.take(torch.rand(global_batch, 1, 1, 1, device=reals.device, dtype=reals.dtype))
            scale = state.scaler_D.scale if state.scaler_D is not None else None
            d_loss, stats = losses.discriminator_loss(state.loss, critic(D_train, watch_reals=True), reals, fakes,
                                                      grad_scale=scale, mix=mix,
                                                      real_labels=real_labels, fake_labels=labels_d,
                                                      cond_weight=state.cond_weight,
                                                      penalty_norm_scale=losses.penalty_norm_scale(
                                                          res, state.config.max_res, state.gp_resolution))
    state.opt_D.zero_grad(set_to_none=True)
    d_bad = _backward_and_step(state, d_loss, "D")

    # G step, with D frozen so no weight gradients are computed for it.
    D.requires_grad_(False)
    try:
        with nvtx_range("G forward"):
            z = world.take(torch.randn(latent_shape, device=reals.device))
            labels_g = fake_labels()
            with autocast:
                g_loss = losses.generator_loss(state.loss, critic(D)(G_train(z, res, alpha, labels_g)), labels_g,
                                               state.cond_weight)
        state.opt_G.zero_grad(set_to_none=True)
        g_bad = _backward_and_step(state, g_loss, "G")
    finally:
        D.requires_grad_(True)

    with nvtx_range("EMA"), torch.no_grad():
        ema, model = state.ema_parameters(res)  # the layers grown so far: the others are equal (see there)
        torch._foreach_lerp_(ema, model, 1.0 - state.ema_beta)
    if augment is not None:
        stats["augment_p"] = augment.p.detach().clone()  # logged as the window's mean (ADA moves it)
    return StepLosses(d_loss.detach(), g_loss.detach(), stats, torch.maximum(d_bad, g_bad))


@dataclass
class Window:
    """What :meth:`Iteration.read_window` reports for the steps since the last read.

    With several ranks, each rank counts the steps whose loss was non-finite on it, and a window
    reports the most any rank counted (every rank skipped those steps: see
    :func:`_backward_and_step`). All ranks get the same figures, so they take the same decisions.
    """

    steps: int  # steps taken
    loss_sums: dict[str, float]  # each loss term summed over the finite steps (and over the ranks)
    finite_terms: int  # how many (step, rank) terms went into those sums
    non_finite_steps: int  # steps whose D or G loss was not finite (their updates were skipped)
    longest_non_finite_run: int  # the most consecutive such steps ending in this window (a run may begin earlier)

    @property
    def means(self) -> dict[str, float]:
        """Each loss term's mean over the finite steps and the ranks (empty if no step was finite)."""
        return {k: v / self.finite_terms for k, v in self.loss_sums.items()} if self.finite_terms else {}


class Iteration:
    """The whole iteration of one (resolution, phase) on static buffers.

    - ``images``: the dataset at ``res`` (uint8) on the training device; each call samples its
      batch from it on the device. Or None: then :meth:`load_batch` fills ``batch_buffer`` from a
      host copy before each call (for datasets too large for GPU memory).
    - ``batch``: the global batch; this rank trains on ``batch // world.size`` of its samples.
    - ``alpha``: a 0-dim float32 device tensor the caller fills in place (``set_alpha``); read only
      in a fade phase.
    - ``labels``: conditional runs only, every image's class (int64, on the device): the reals'
      labels are gathered with the same indices as their images, and fake labels are drawn from it.
    - on-device counters (created by the first call): running sums of the losses over finite
      steps, the number of finite and non-finite steps, the current and the longest run of
      non-finite steps. :meth:`read_window` reads and resets them when the trainer logs.

    A call draws its randomness in the same order as the eager loop always did (batch indices, the
    mirror coins with ``mirror``, D's latents, a conditional run's fake labels, the penalty's mix,
    G's latents and fake labels), so a captured and an eager run see the same numbers; every rank
    draws the global batch's and keeps its slice.
    """

    def __init__(self, state: GANState, res: int, batch: int, fade: bool, device: torch.device,
                 images: torch.Tensor | None, mirror: bool = False, labels: torch.Tensor | None = None,
                 augment: Augment | None = None) -> None:
        world = state.world
        if batch % world.size:
            raise ValueError(f"the global batch {batch} does not split evenly across {world.size} ranks")
        self.state, self.res, self.batch, self.fade, self.mirror = state, res, batch, fade, mirror
        self.local_batch = batch // world.size
        self.images = images
        self.batch_buffer = None if images is not None else torch.empty(
            (self.local_batch, state.config.image_channels, res, res), dtype=torch.uint8, device=device)
        if (labels is not None) != (state.config.num_classes > 0):
            raise ValueError("labels are needed exactly when the networks are conditional")
        self.labels = labels
        self.augment = augment
        # With staged batches, the indices of this rank's rows (the reals' labels are gathered on the device).
        self.batch_index = torch.zeros(self.local_batch, dtype=torch.int64, device=device) \
            if labels is not None and images is None else None
        self.alpha = torch.ones((), dtype=torch.float32, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(4, dtype=torch.float32, device=device)  # finite, non-finite, run, longest run
        self._staging: torch.Tensor | None = None
        self._staged: torch.cuda.Event | None = None

    def set_alpha(self, alpha: float | None) -> None:
        self.alpha.fill_(1.0 if alpha is None else alpha)

    def load_batch(self, host_images: torch.Tensor) -> None:
        """Sample this step's batch from a host-resident dataset and copy this rank's rows of it
        into ``batch_buffer`` (only those rows are read from host memory).

        The indices come from the CPU generator. On CUDA the copy goes through a pinned staging
        buffer without blocking; the only wait is for the previous step's copy out of that buffer.
        """
        idx = self.state.world.take(torch.randint(host_images.shape[0], (self.batch,)))
        if self.batch_index is not None:
            self.batch_index.copy_(idx)
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
            real_labels = None
            if self.images is not None:
                idx = self.state.world.take(torch.randint(self.images.shape[0], (self.batch,),
                                                          device=self.images.device))
                batch = self.images[idx]
                if self.labels is not None:
                    real_labels = self.labels[idx]
            else:
                batch = self.batch_buffer
                if self.labels is not None:
                    real_labels = self.labels[self.batch_index]
            if self.mirror:  # one coin per image of the global batch; each rank keeps its rows
                flip = self.state.world.take(torch.rand(self.batch, device=batch.device) < 0.5)
                batch = mirror(batch, flip)
            reals = fade_reals(to_float(batch), alpha)
        out = train_step(self.state, reals, self.res, alpha, real_labels, self.labels, self.augment)
        bad = out.non_finite
        for name, value in out.as_dict().items():
            value = torch.where(bad > 0, 0.0, value.detach().float())  # a NaN must not poison the sum
            if name in self.sums:
                self.sums[name].add_(value)
            else:
                self.sums[name] = value.clone()
        finite, non_finite, run, longest = self.counts.unbind()
        finite.add_(1.0 - bad)
        non_finite.add_(bad)
        run.add_(1.0).mul_(bad)  # consecutive non-finite steps; a finite step resets it to 0
        torch.maximum(longest, run, out=longest)

    def read_window(self) -> Window:
        """Read and reset the counters: the loop's one host sync (and, with several ranks, its two
        collectives: one sums the losses and finite counts, one takes the longest runs' max)."""
        world = self.state.world
        names = list(self.sums)
        finite, non_finite, run, longest = self.counts.unbind()
        summed = torch.stack([*(self.sums[k] for k in names), finite, finite + non_finite])
        maxed = torch.stack([non_finite, longest])
        world.sum_(summed)
        world.max_(maxed)
        *sums, finite_terms, rank_steps, non_finite_steps, longest_run = torch.cat([summed, maxed]).tolist()
        for v in self.sums.values():
            v.zero_()
        # The current run is kept: one that goes on into the next window counts there in full.
        self.counts[[0, 1, 3]] = 0.0
        return Window(round(rank_steps / world.size), dict(zip(names, sums)),
                      int(finite_terms), int(non_finite_steps), int(longest_run))

    def read_sums(self) -> dict[str, float]:
        """``{name: sum over the finite steps since the last read}``, then reset (tests and bench)."""
        return self.read_window().loss_sums
