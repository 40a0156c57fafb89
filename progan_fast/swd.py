"""Sliced Wasserstein distance (SWD), the ProGAN paper's sample-quality metric.

It follows the metric as the official code computes it (tkarras/progressive_growing_of_gans,
``metrics/sliced_wasserstein.py``), written anew in torch:

- images as uint8 -> float32 in [0, 255]; fakes are quantised to uint8 first, as the official
  pipeline does, so both sides go through the same rounding;
- a Laplacian pyramid with the 5x5 binomial filter ``[1 4 6 4 1]^T [1 4 6 4 1] / 256``,
  mirror (``reflect``) borders, from the image resolution down to 16px (one level per octave;
  the last level is the low-pass residual);
- per level, ``nhood_size`` 7 x 7 patches at ``nhoods_per_image`` 128 uniformly random positions
  per image; the descriptors of each set are normalised per channel (mean 0, std 1 over all
  patches and pixels of that set, each set on its own statistics, as the official code does);
- ``dir_repeats`` 4 repeats of ``dirs_per_repeat`` 128 random unit directions (the official
  ``API`` class's values; its function defaults are 4 x 4), projections sorted, mean absolute
  difference, averaged over directions and repeats; reported x 1e3 per level and as the average.

Where this departs: below 16px (the early phases of progressive growing) the pyramid is one level
at the image resolution and the patch shrinks to ``min(7, res)``, so 4px and 8px runs get a number
(the official code has no level there). The sample count defaults to :data:`DEFAULT_SWD_IMAGES`
(1024 per side; official: 8192, 16384 for the final figure): enough for a stable laptop-sized
estimate, and a flag (``--n``) for paper-sized ones. With more images asked for than the dataset
holds, every real image is used once and the rest drawn again, in a seeded order. Everything random
(latents, reals, patch positions, directions) comes from generators seeded by ``seed``.

:func:`swd_for_generator` is what the trainer's ``--swd-kimg`` and ``python -m progan_fast.metrics``
call. A leaf module: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SWD_IMAGES",
    "SWD",
    "float_to_uint8",
    "generate_uint8",
    "laplacian_pyramid",
    "pick_reals",
    "pyramid_resolutions",
    "sliced_wasserstein",
    "swd",
    "swd_for_generator",
]

DEFAULT_SWD_IMAGES = 1024
NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_PYRAMID_RES = 16

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """5x5 binomial filter (separable), mirror borders, per channel."""
    c = x.shape[1]
    k = (_BINOMIAL * gain**0.5).to(x)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _pyr_up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Float ``[N, C, H, W]`` -> ``levels`` band-pass images, finest first; the last is the low-pass
    residual. ``_pyr_up`` of the residual plus the bands rebuilds ``x`` exactly (up to rounding)."""
    pyramid = [x.float()]
    for _ in range(1, levels):
        low = _pyr_down(pyramid[-1])
        pyramid[-1] = pyramid[-1] - _pyr_up(low)
        pyramid.append(low)
    return pyramid


def pyramid_resolutions(res: int) -> list[int]:
    """Resolutions of the SWD levels for images of ``res`` pixels: res, res/2, ..., 16 (just res below 16)."""
    out = [res]
    while out[-1] // 2 >= MIN_PYRAMID_RES:
        out.append(out[-1] // 2)
    return out


def _descriptors(level: torch.Tensor, nhood: int, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """``per_image`` random ``nhood x nhood`` patches from each image -> ``[N * per_image, C, nhood, nhood]``."""
    n, c, h, w = level.shape
    count = n * per_image
    ys = torch.randint(0, h - nhood + 1, (count,), generator=gen).to(level.device)
    xs = torch.randint(0, w - nhood + 1, (count,), generator=gen).to(level.device)
    img = torch.arange(count, device=level.device) // per_image
    offs = torch.arange(nhood, device=level.device)
    chan = torch.arange(c, device=level.device)
    # Flat index of every patch pixel, [count, C, nhood, nhood], as the official code builds it.
    idx = (((img[:, None, None, None] * c + chan[None, :, None, None]) * h
            + (ys[:, None, None, None] + offs[None, None, :, None])) * w
           + (xs[:, None, None, None] + offs[None, None, None, :]))
    return level.reshape(-1)[idx]


def _finalize(desc: torch.Tensor) -> torch.Tensor:
    """Per-channel normalisation over all patches and pixels, then flatten to ``[count, C*nhood*nhood]``."""
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    desc = desc / desc.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-8)
    return desc.reshape(desc.shape[0], -1)


def _sorted_projections(x: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Projections of the rows of ``x`` on each direction, sorted: ``[directions, rows]``. On the CPU
    numpy's vectorised in-place sort is used: it is much faster than ``torch.sort`` on these shapes."""
    proj = (dirs.T @ x.T).contiguous()
    if proj.device.type == "cpu":
        proj.numpy().sort(axis=1)
        return proj
    return torch.sort(proj, dim=1).values


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, dir_repeats: int, dirs_per_repeat: int,
                       gen: torch.Generator) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projected sets."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"descriptor sets must have the same [count, dim] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    results = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=gen)
        dirs = (dirs / dirs.square().sum(dim=0, keepdim=True).sqrt()).to(a)
        pa, pb = _sorted_projections(a, dirs), _sorted_projections(b, dirs)
        results.append(float((pa - pb).abs().mean()))
    return sum(results) / len(results)


class SWD:
    """SWD against a fixed set of reals: the real descriptors are computed once, so a trainer can
    score the generator repeatedly at one resolution for the cost of the fakes alone."""

    def __init__(self, reals_uint8: torch.Tensor, seed: int = 0, nhood_size: int = NHOOD_SIZE,
                 nhoods_per_image: int = NHOODS_PER_IMAGE, dir_repeats: int = DIR_REPEATS,
                 dirs_per_repeat: int = DIRS_PER_REPEAT, batch: int = 256) -> None:
        if reals_uint8.dtype != torch.uint8 or reals_uint8.ndim != 4 or reals_uint8.shape[-1] != reals_uint8.shape[-2]:
            raise ValueError("reals must be uint8 [N, C, res, res]")
        self.res = int(reals_uint8.shape[-1])
        self.channels = int(reals_uint8.shape[1])  # each channel is normalised on its own (_finalize)
        self.count = int(reals_uint8.shape[0])
        self.resolutions = pyramid_resolutions(self.res)
        self.nhood = min(nhood_size, self.res)
        self.per_image = nhoods_per_image
        self.dir_repeats, self.dirs_per_repeat = dir_repeats, dirs_per_repeat
        self.batch = batch
        self.seed = seed
        self.real = self._describe(reals_uint8, seed)

    def names(self) -> list[str]:
        return [f"SWDx1e3_{r}" for r in self.resolutions] + ["SWDx1e3_avg"]

    def _describe(self, images_uint8: torch.Tensor, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        per_level: list[list[torch.Tensor]] = [[] for _ in self.resolutions]
        for chunk in images_uint8.split(self.batch):
            for i, level in enumerate(laplacian_pyramid(chunk.float(), len(self.resolutions))):
                per_level[i].append(_descriptors(level, self.nhood, self.per_image, gen))
        return [_finalize(torch.cat(d)) for d in per_level]

    def distance(self, fakes_uint8: torch.Tensor) -> dict[str, float]:
        """``{"SWDx1e3_<res>": ..., "SWDx1e3_avg": ...}`` between the reals and ``fakes_uint8``
        (uint8, the same shape as the reals)."""
        if fakes_uint8.dtype != torch.uint8 or tuple(fakes_uint8.shape[1:]) != (self.channels, self.res, self.res) \
                or fakes_uint8.shape[0] != self.count:
            raise ValueError(f"fakes must be uint8 [{self.count}, {self.channels}, {self.res}, {self.res}], "
                             f"got {fakes_uint8.dtype} {list(fakes_uint8.shape)}")
        fake = self._describe(fakes_uint8, self.seed + 1)
        gen = torch.Generator().manual_seed(self.seed + 2)
        dists = [1e3 * sliced_wasserstein(r, f.to(r.device), self.dir_repeats, self.dirs_per_repeat, gen)
                 for r, f in zip(self.real, fake)]
        out = dict(zip(self.names(), dists + [sum(dists) / len(dists)]))
        return out


def swd(reals_uint8: torch.Tensor, fakes_uint8: torch.Tensor, seed: int = 0, **kw) -> dict[str, float]:
    """SWD x 1e3 per pyramid level and their average between two uint8 image sets of equal shape."""
    return SWD(reals_uint8, seed=seed, **kw).distance(fakes_uint8)


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 ``[N, C, H, W]`` (rounded, clipped), as samples are saved."""
    return ((images.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def pick_reals(dataset_level: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` real images in a seeded order: a random subset, or every image once and then more drawn."""
    gen = torch.Generator().manual_seed(seed)
    total = int(dataset_level.shape[0])
    idx = torch.randperm(total, generator=gen)
    if n > total:
        idx = torch.cat([idx, torch.randint(total, (n - total,), generator=gen)])
    return dataset_level[idx[:n]]


def draw_labels(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` class labels drawn (seeded) from ``labels``, a dataset's: the real label distribution."""
    gen = torch.Generator().manual_seed(seed + 12)
    return labels.cpu()[torch.randint(int(labels.shape[0]), (n,), generator=gen)]


@torch.no_grad()
def generate_uint8(G, n: int, res: int, alpha: float | None, seed: int, device=None, batch: int = 64,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` uint8 samples of ``G`` at ``res``/``alpha`` from seeded N(0, 1) latents (no truncation);
    a conditional ``G`` also takes the ``n`` samples' class ``labels``."""
    device = device or next(G.parameters()).device
    latent = G.config.latent_size
    z = torch.randn(n, latent, generator=torch.Generator().manual_seed(seed))
    ys = [None] * len(z.split(batch)) if labels is None else [y.to(device) for y in labels.split(batch)]
    out = [float_to_uint8(G(zb.to(device), res, alpha, y)).cpu() for zb, y in zip(z.split(batch), ys)]
    return torch.cat(out)


def swd_for_generator(G, reals_uint8: torch.Tensor, res: int, alpha: float | None, n: int = DEFAULT_SWD_IMAGES,
                      seed: int = 0, fake_labels: torch.Tensor | None = None) -> dict[str, float]:
    """SWD between ``n`` samples of ``G`` (give it the EMA generator) at ``res``/``alpha`` and ``n``
    images of ``reals_uint8`` (the dataset's uint8 level at ``res``, ``[N, C, res, res]``); a
    conditional ``G`` gets the fakes' ``n`` class labels.

    The hook for logging during training: every call with the same arguments gives the same
    numbers. It leaves torch's global RNG untouched, so calling it does not change training.
    ``reals_uint8`` must not be modified in place between calls (the dataset's levels never are).
    """
    if int(reals_uint8.shape[-1]) != res:
        raise ValueError(f"reals are {reals_uint8.shape[-1]}px, asked for {res}px")
    was_training = G.training
    G.eval()
    try:
        fakes = generate_uint8(G, n, res, alpha, seed=seed + 10, labels=fake_labels)
    finally:
        G.train(was_training)
    # The real side depends only on (reals, n, seed): keep the last one, so calling this every few
    # kimg at one resolution pays for the reals' descriptors once.
    key = (reals_uint8.data_ptr(), tuple(reals_uint8.shape), reals_uint8.device, n, seed)
    if _LAST_REFERENCE.get("key") != key:
        _LAST_REFERENCE.clear()
        _LAST_REFERENCE.update(key=key, swd=SWD(pick_reals(reals_uint8, n, seed + 11), seed=seed))
    return _LAST_REFERENCE["swd"].distance(fakes)


_LAST_REFERENCE: dict = {}
