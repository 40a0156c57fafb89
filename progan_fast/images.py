"""Image grids as PNG (Pillow): tensors in, files out."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import files


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float ``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]`` (values outside are clipped)."""
    x = (images.detach().float().cpu() + 1.0) * 127.5
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, columns: int | None = None, min_tile: int = 64) -> Image.Image:
    """Tile images into one picture, ``columns`` wide (default: square-ish). Tiles smaller than
    ``min_tile`` pixels are enlarged with nearest-neighbour so 4x4 samples stay visible."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    picture = Image.fromarray(grid)
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
