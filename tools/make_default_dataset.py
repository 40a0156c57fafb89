#!/usr/bin/env python3
"""Build the compact default dataset packaged in ``progan_fast/assets/``.

Input: the unpacked npm package ``emoji-datasource-google@16.0.0``
(``npm pack emoji-datasource-google@16.0.0 && tar xzf emoji-datasource-google-16.0.0.tgz``
gives a folder named ``package``).

Output (in ``progan_fast/assets/`` unless ``--out`` is given):
  * ``emoji_atlas.png``  -- lossless RGB PNG, a grid of 64x64 tiles in row-major order
  * ``emoji_atlas.json`` -- tile count, tile size, columns, source and the tile file names

Processing: skin-tone variants (code points 1F3FB..1F3FF) are dropped, each RGBA
image is composited over a white background, images stay 64x64 RGB, and tiles are
sorted by file name so the result is deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin

TILE = 64
SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
ATLAS_NAME = "emoji_atlas.png"
META_NAME = "emoji_atlas.json"


def is_skin_tone_variant(stem: str) -> bool:
    return any(cp in SKIN_TONES for cp in stem.lower().split("-"))


def load_tile(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")
    if rgba.size != (TILE, TILE):
        raise SystemExit(f"error: {path} is {rgba.size[0]}x{rgba.size[1]}, expected {TILE}x{TILE}")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    repo_root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(
        description="Convert the unpacked npm package emoji-datasource-google into the "
        "compact 64x64 RGB emoji atlas packaged with progan_fast.")
    ap.add_argument("package", type=Path,
                    help="path of the unpacked npm package (the folder containing package.json and img/)")
    ap.add_argument("--out", type=Path, default=repo_root / "progan_fast" / "assets",
                    help="output folder (default: progan_fast/assets in this repository)")
    args = ap.parse_args(argv)

    pkg = args.package
    img_dir = pkg / "img" / "google" / "64"
    if not img_dir.is_dir():
        print(f"error: {img_dir} not found; pass the unpacked npm package folder", file=sys.stderr)
        return 2
    version = "unknown"
    pj = pkg / "package.json"
    if pj.is_file():
        meta = json.loads(pj.read_text(encoding="utf-8"))
        version = f"{meta.get('name', '?')}@{meta.get('version', '?')}"

    all_files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".png")
    files = [p for p in all_files if not is_skin_tone_variant(p.stem)]
    n = len(files)
    if n == 0:
        print(f"error: no PNG images in {img_dir}", file=sys.stderr)
        return 2
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    atlas = Image.new("RGB", (cols * TILE, rows * TILE), (255, 255, 255))
    for i, p in enumerate(files):
        r, c = divmod(i, cols)
        atlas.paste(load_tile(p), (c * TILE, r * TILE))

    args.out.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("progan_fast.tiles", str(n))
    info.add_text("progan_fast.tile_size", str(TILE))
    info.add_text("progan_fast.columns", str(cols))
    info.add_text("Source", f"{version} (Google Noto Emoji, Apache-2.0); see NOTICE.md")
    atlas_path = args.out / ATLAS_NAME
    atlas.save(atlas_path, format="PNG", optimize=True, pnginfo=info)
    meta = {
        "tiles": n,
        "tile_size": TILE,
        "columns": cols,
        "rows": rows,
        "source": version,
        "skipped_skin_tone_variants": len(all_files) - n,
        "names": [p.stem for p in files],
    }
    (args.out / META_NAME).write_text(json.dumps(meta, indent=0) + "\n", encoding="utf-8")
    size = atlas_path.stat().st_size + (args.out / META_NAME).stat().st_size
    print(f"wrote {n} tiles ({len(all_files) - n} skin-tone variants dropped) as a "
          f"{cols}x{rows} atlas to {args.out}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
