"""Differentiable augmentation for small datasets (``--augment``): DiffAugment (Zhao et al. 2020).

D sees every image, real or fake, through the same random transforms, in every D and G step and
inside the gradient penalty, so it cannot memorise the few reals it has, while G still learns the
un-augmented distribution (the transforms are differentiable: G's gradient flows through them).

The transforms, with DiffAugment's constants, each drawn independently per image:

- ``translation``: shift by up to 1/8 of the side in x and y (whole pixels), zeros shifted in;
- ``cutout``: zero a square of half the side at a random centre (clipped at the edges);
- ``color``: brightness ``+ U(-0.5, 0.5)``, saturation ``(x - mean_c) * U(0, 2) + mean_c``,
  contrast ``(x - mean_chw) * U(0.5, 1.5) + mean_chw``, in that order (on images in [-1, 1]).

``--augment-p P`` applies each transform to an image with probability P (a coin per image and
transform; DiffAugment is P = 1). ``--augment-p ada`` adapts P as StyleGAN2-ADA does: starting at 0,
every :data:`ADA_INTERVAL` steps it moves by ``sign(r_t - ADA_TARGET) * batch * ADA_INTERVAL /
(ADA_KIMG * 1000)`` (clipped to [0, 1]), where ``r_t = E[sign(D(real))]`` over those steps: the
share of reals D is sure of, which grows as D overfits.

Everything is drawn and computed on the images' device with torch's generator there, with the
same ops and shapes whatever P and the data are, and nothing is read back to the host: the step
stays capturable as a CUDA graph, and a resume on the CPU repeats the random draws exactly (the
checkpoint carries the generators and, for ADA, P and its running statistic).

Leaf module: depends on torch only.
"""

from __future__ import annotations

from typing import Callable

import torch

#: The transforms ``--augment`` takes, in the order they are applied (DiffAugment's).
TRANSFORMS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # DiffAugment's: the largest shift, as a share of the side
CUTOUT_RATIO = 0.5  # DiffAugment's: the cut square's side, as a share of the image's
ADA_TARGET = 0.6  # StyleGAN2-ADA's target for E[sign(D(real))]
ADA_INTERVAL = 4  # steps between two adjustments of P (StyleGAN2-ADA's ada_interval)
ADA_KIMG = 500.0  # thousands of images over which P can go from 0 to 1 (StyleGAN2-ADA's ada_kimg)


def parse_policy(text: str) -> tuple[str, ...]:
    """``"translation,cutout,color"`` -> the transforms, in application order; ValueError naming a bad one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TRANSFORMS]
    if bad or not names:
        raise ValueError(f"--augment takes a comma-separated list of {', '.join(TRANSFORMS)}; "
                         f"{'unknown: ' + ', '.join(bad) if bad else 'got nothing'}")
    return tuple(t for t in TRANSFORMS if t in names)


def parse_p(text: str) -> float | str:
    """``--augment-p``: a probability in [0, 1], or ``"ada"``; ValueError otherwise."""
    if text.strip().lower() == "ada":
        return "ada"
    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"--augment-p must be a probability from 0 to 1, or ada, not {text!r}")
    return p


# ----- the transforms, on given parameters (the tests check these against direct formulas) ------

def brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x + b`` with ``b`` ``[N]``."""
    return x + b.view(-1, 1, 1, 1).to(x.dtype)


def saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(x - m) * s + m``, ``m`` the mean over the channels of each pixel (identity for one channel)."""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * s.view(-1, 1, 1, 1).to(x.dtype) + m


def contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(x - m) * c + m``, ``m`` the mean of each image."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c.view(-1, 1, 1, 1).to(x.dtype) + m


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``out[n, :, i, j] = x[n, :, i + dy[n], j + dx[n]]`` where that is inside the image, else 0
    (``dy``, ``dx``: int64 ``[N]``). A gather with clamped indices, masked: fixed shapes, no sync."""
    n, c, h, w = x.shape
    iy = torch.arange(h, device=x.device) + dy.view(-1, 1)  # [N, H]
    ix = torch.arange(w, device=x.device) + dx.view(-1, 1)  # [N, W]
    inside = (((iy >= 0) & (iy < h)).view(n, 1, h, 1) & ((ix >= 0) & (ix < w)).view(n, 1, 1, w))
    rows = x.gather(2, iy.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w))
    out = rows.gather(3, ix.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w))
    return out * inside.to(x.dtype)


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` with the ``size`` rectangle whose top-left is ``(cy - size_y // 2, cx - size_x // 2)``
    set to 0 (the part inside the image). ``cy``, ``cx``: int64 ``[N]``, DiffAugment's offsets."""
    n, _, h, w = x.shape
    top = (cy - size[0] // 2).view(-1, 1)
    left = (cx - size[1] // 2).view(-1, 1)
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_y = (ys >= top) & (ys < top + size[0])  # [N, H]
    in_x = (xs >= left) & (xs < left + size[1])  # [N, W]
    keep = ~(in_y.view(n, 1, h, 1) & in_x.view(n, 1, 1, w))
    return x * keep.to(x.dtype)


def translation_range(side: int) -> int:
    return int(side * TRANSLATION_RATIO + 0.5)


def cutout_size(h: int, w: int) -> tuple[int, int]:
    return int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)


# ----- the random policy ----------------------------------------------------------------------------

class Augment:
    """The run's augmentation: the policy, P (a 0-dim float32 tensor on the device) and ADA's state.

    ``__call__(x, batch, take)`` augments this rank's images ``x``: the parameters are drawn for
    the ``batch`` images of the global batch and ``take`` keeps this rank's rows (as every other
    draw of the step; one rank: the identity), so a run draws the same numbers on any number of ranks.
    """

    def __init__(self, policy: tuple[str, ...], p: float | str, device: torch.device) -> None:
        self.policy = tuple(policy)
        self.adaptive = p == "ada"
        self.p = torch.full((), 0.0 if self.adaptive else float(p), dtype=torch.float32, device=device)
        # ADA: sum of sign(D(real)) and the number of reals since the last adjustment, and the steps taken.
        self.signs = torch.zeros(2, dtype=torch.float32, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, x: torch.Tensor, batch: int,
                 take: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        dev = x.device

        def coin() -> torch.Tensor:  # [N, 1, 1, 1] bool: this transform applies to this image
            return take(torch.rand(batch, device=dev) < self.p).view(-1, 1, 1, 1)

        def uniform() -> torch.Tensor:
            return take(torch.rand(batch, device=dev, dtype=torch.float32))

        _, _, h, w = x.shape
        for name in self.policy:
            if name == "color":
                for fn, lo, width in ((brightness, -0.5, 1.0), (saturation, 0.0, 2.0), (contrast, 0.5, 1.0)):
                    x = torch.where(coin(), fn(x, uniform() * width + lo), x)
            elif name == "translation":
                sy, sx = translation_range(h), translation_range(w)
                dy = take(torch.randint(-sy, sy + 1, (batch,), device=dev))
                dx = take(torch.randint(-sx, sx + 1, (batch,), device=dev))
                x = torch.where(coin(), translate(x, dy, dx), x)
            elif name == "cutout":
                size = cutout_size(h, w)
                cy = take(torch.randint(0, h + (1 - size[0] % 2), (batch,), device=dev))
                cx = take(torch.randint(0, w + (1 - size[1] % 2), (batch,), device=dev))
                x = torch.where(coin(), cutout(x, cy, cx, size), x)
        return x

    def observe(self, real_scores: torch.Tensor, batch: int, sum_: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """ADA: count the signs of D's scores on this step's reals (``sum_`` adds them over the
        ranks), and every :data:`ADA_INTERVAL` steps move P by ``batch * ADA_INTERVAL / (ADA_KIMG *
        1000)`` toward the side that brings ``E[sign]`` to :data:`ADA_TARGET`. On the device, no sync."""
        if not self.adaptive:
            return
        s = real_scores.detach().float().reshape(-1)
        step_signs = torch.stack([s.sign().sum(), torch.full((), float(s.numel()), device=s.device)])
        self.signs.add_(sum_(step_signs))
        self.steps.add_(1)
        due = (self.steps % ADA_INTERVAL) == 0
        r_t = self.signs[0] / self.signs[1].clamp_min(1.0)
        step = batch * ADA_INTERVAL / (ADA_KIMG * 1000.0)
        adjusted = (self.p + torch.sign(r_t - ADA_TARGET) * step).clamp(0.0, 1.0)
        self.p.copy_(torch.where(due, adjusted, self.p))
        self.signs.mul_((~due).float())

    def copy(self) -> Augment:
        """The same policy and P on separate tensors: steps run with the copy (the trainer's timed
        step check, whose steps are undone) leave this one's P and ADA statistic as they were."""
        twin = Augment(self.policy, "ada" if self.adaptive else 0.0, self.p.device)
        twin.p.copy_(self.p)
        twin.signs.copy_(self.signs)
        twin.steps.copy_(self.steps)
        return twin

    def state_dict(self) -> dict:
        return {"p": self.p.detach().cpu(), "signs": self.signs.detach().cpu(), "steps": self.steps.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.p.copy_(state["p"])
        self.signs.copy_(state["signs"])
        self.steps.copy_(state["steps"])
