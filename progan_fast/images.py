"""Image grids as PNG (Pillow): tensors in, files out."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import files


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (values outside are clipped)."""
    x = (images.detach().float().cpu() + 1.0) * 127.5
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, columns: int | None = None, min_tile: int = 64) -> Image.Image:
    """Tile images into one picture, ``columns`` wide (default: square-ish). Tiles smaller than
    ``min_tile`` pixels are enlarged with nearest-neighbour so 4x4 samples stay visible. Images of
    one channel make a grayscale picture (mode L), of three an RGB one."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    if c not in (1, 3):
        raise ValueError(f"make_grid: images of 1 or 3 channels expected, got {c}")
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, columns)
        grid[row * h:(row + 1) * h, col * w:(col + 1) * w] = arr[i]
    picture = Image.fromarray(grid[:, :, 0], "L") if c == 1 else Image.fromarray(grid, "RGB")
    zoom = max(1, math.ceil(min_tile / h))
    if zoom > 1:
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    return picture


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """Write the grid as a PNG, all or nothing; raises :class:`~progan_fast.files.WriteError`."""
    picture = make_grid(images, columns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise files.WriteError(path.parent, e, "the folder of the image") from None
    return files.write_bytes(path, lambda f: picture.save(f, format="PNG"), "the image")
