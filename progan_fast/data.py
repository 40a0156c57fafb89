"""Datasets in memory: the resolution pyramid used by progressive growing, and the embedded emoji set.

Leaf module: depends only on torch, numpy and Pillow. Image folders are decoded into the same
:class:`ImageDataset` by :mod:`progan_fast.image_folder`.

Every dataset is held in memory as uint8 tensors ``[N, C, res, res]`` (C = 3, RGB, or 1,
grayscale), one per power-of-two resolution from 4 up to ``max_res``.  The top level is decoded
from the files (made square by centre crop, padding or stretching; Lanczos resize); each lower level is the exact
2x2 average of the already-quantised level above, rounded with ``rint`` and
clipped, as in the official ProGAN ``dataset_tool.py``.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DataError",
    "ImageDataset",
    "MAX_SUPPORTED_RES",
    "MIN_RES",
    "build_pyramid",
    "check_resolution",
    "load_default_dataset",
    "plural",
    "to_float",
]

MIN_RES = 4
MAX_SUPPORTED_RES = 1024

_ASSET_PNG = "emoji_atlas.png"
_ASSET_JSON = "emoji_atlas.json"
_DEFAULT_TILE = 64


class DataError(Exception):
    """Bad input data; str(e) is a one-line user-facing message naming the problem
    (the CLI prints it and exits 2)."""


# --------------------------------------------------------------------------- dataset


@dataclass
class ImageDataset:
    levels: dict[int, torch.Tensor]  # res -> uint8 [N, C, res, res] (C: 3 or 1), contiguous, for 4..max_res
    source: str
    summary: str
    from_cache: bool = False  # True when the levels were read from the cache file
    labels: Optional[torch.Tensor] = None  # int64 [N]: each image's class, when the source has labels
    class_names: Optional[list[str]] = None  # class k's name (with labels)
    fit: str = "crop"  # how non-square images were made square (image_folder.FITS)
    single_channel_source: bool = False  # every source image is grayscale (whatever channels it was decoded to)
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    @property
    def max_res(self) -> int:
        return max(self.levels)

    @property
    def channels(self) -> int:
        """3 (RGB) or 1 (grayscale)."""
        return int(self.levels[self.max_res].shape[1])

    def __len__(self) -> int:
        return int(self.levels[self.max_res].shape[0])

    def at(self, res: int) -> torch.Tensor:
        t = self.levels.get(res)
        if t is None:
            have = ", ".join(str(r) for r in sorted(self.levels))
            raise DataError(f"resolution {res} is not available in {self.source} (have: {have})")
        return t

    def fingerprint(self) -> str:
        """Stable hex id of the content: sha1 over the shape and bytes of the max-res level."""
        if self._fingerprint is None:
            top = self.levels[self.max_res].contiguous()
            h = hashlib.sha1()
            h.update(repr(tuple(top.shape)).encode())
            h.update(memoryview(top.numpy()).cast("B"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint


# --------------------------------------------------------------------------- helpers


def check_resolution(max_res: int) -> None:
    """DataError unless max_res is a power of two in [4, MAX_SUPPORTED_RES]."""
    ok = (
        isinstance(max_res, (int, np.integer))
        and not isinstance(max_res, bool)
        and MIN_RES <= int(max_res) <= MAX_SUPPORTED_RES
        and (int(max_res) & (int(max_res) - 1)) == 0
    )
    if not ok:
        raise DataError(
            f"--max-res {max_res!r} is not supported: it must be a power of two "
            f"between {MIN_RES} and {MAX_SUPPORTED_RES} (4, 8, 16, ..., {MAX_SUPPORTED_RES})"
        )


def mirror(batch: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``batch`` ``[N, C, H, W]`` with the images where ``flip`` ``[N]`` (bool) is set flipped left-right.

    The official code's ``mirror_augment`` (CelebA-HQ, LSUN): a fair coin per image, drawn on the
    device by the caller so the whole step stays capturable; the labels of a conditional run are
    untouched by construction (only pixels move).
    """
    if flip.shape != batch.shape[:1]:
        raise ValueError(f"mirror: one flag per image expected, got {tuple(flip.shape)} for {tuple(batch.shape)}")
    return torch.where(flip.view(-1, *([1] * (batch.dim() - 1))), batch.flip(-1), batch)


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1)."""
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {batch_uint8.dtype}")
    return batch_uint8.to(torch.float32).div_(127.5).sub_(1.0)


def _downsample2x(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Exact 2x2 box average of uint8 [N, C, H, W] in float32, rint, clip -> uint8
    (the official ProGAN dataset_tool's ``np.rint((a + b + c + d) * 0.25)``)."""
    src = x.contiguous().numpy()
    n, c, h, w = src.shape
    out = np.empty((n, c, h // 2, w // 2), dtype=np.uint8)
    for i in range(0, n, chunk):
        u = src[i:i + chunk]
        # The sum of four uint8 values is exact in uint16 and in float32, and * 0.25 is
        # exact, so this equals averaging in float32; np.rint rounds half to even.
        s = u[:, :, 0::2, 0::2].astype(np.uint16)
        s += u[:, :, 0::2, 1::2]
        s += u[:, :, 1::2, 0::2]
        s += u[:, :, 1::2, 1::2]
        f = s.astype(np.float32)
        f *= 0.25
        np.rint(f, out=f)
        np.clip(f, 0, 255, out=f)
        out[i:i + chunk] = f
    return torch.from_numpy(out)


def build_pyramid(top: torch.Tensor) -> dict[int, torch.Tensor]:
    """top: uint8 [N, C, R, R] -> {R: top, R/2: ..., ..., 4: ...}."""
    res = int(top.shape[-1])
    levels = {res: top.contiguous()}
    cur = levels[res]
    while res > MIN_RES:
        cur = _downsample2x(cur)
        res //= 2
        levels[res] = cur
    return dict(sorted(levels.items()))


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------- embedded dataset


def _asset(name: str):
    return resources.files(__package__ or "progan_fast") / "assets" / name


def load_default_dataset(max_res: int, channels: int = 3) -> ImageDataset:
    """The embedded 64x64 Noto emoji set (see progan_fast/assets/NOTICE.md); with ``channels=1``
    its luma (Pillow's ``convert("L")``)."""
    check_resolution(max_res)
    if max_res > _DEFAULT_TILE:
        raise DataError(
            f"--max-res {max_res} is too large: the embedded dataset is "
            f"{_DEFAULT_TILE}x{_DEFAULT_TILE}; pass --data DIR for larger images"
        )
    try:
        meta = json.loads(_asset(_ASSET_JSON).read_text(encoding="utf-8"))
        png_bytes = _asset(_ASSET_PNG).read_bytes()
        with Image.open(io.BytesIO(png_bytes)) as im:
            im.load()
            atlas = np.asarray(im.convert("RGB"))
            if channels == 1:
                atlas = np.asarray(Image.fromarray(atlas, "RGB").convert("L"))[:, :, None]
        n, tile, cols = int(meta["tiles"]), int(meta["tile_size"]), int(meta["columns"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"the embedded dataset (progan_fast/assets/{_ASSET_PNG}) could not be read: {e}; "
            "reinstall progan_fast or pass --data DIR"
        ) from None
    rows = -(-n // cols)
    if tile != _DEFAULT_TILE or atlas.shape[0] < rows * tile or atlas.shape[1] < cols * tile:
        raise DataError(f"the embedded dataset (progan_fast/assets/{_ASSET_PNG}) is inconsistent with its metadata")
    # [rows*T, cols*T, 3] -> [rows, cols, T, T, 3] -> [rows*cols, 3, T, T] -> first n tiles
    c = atlas.shape[2]
    grid = atlas[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile, c)
    tiles = grid.transpose(0, 2, 4, 1, 3).reshape(rows * cols, c, tile, tile)[:n]
    top = torch.from_numpy(np.ascontiguousarray(tiles))
    levels = build_pyramid(top)
    levels = {r: t for r, t in levels.items() if r <= max_res}
    source = f"embedded Noto emoji ({n:,} images)"
    summary = f"loaded {plural(n, 'image')} from the embedded Noto emoji dataset ({tile}x{tile}{', gray' if c == 1 else ''})"
    return ImageDataset(levels=levels, source=source, summary=summary)
