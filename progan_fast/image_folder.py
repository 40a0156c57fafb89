"""Image folders and zip archives: every image decoded once into the resolution pyramid, and cached.

:func:`load_image_folder` scans the folder (recursively; png, jpg, webp, bmp), decodes the files on
a few threads (centre crop to square, Lanczos resize to ``max_res``; alpha composited over white,
16-bit scaled to 8-bit), skips and counts the files it cannot use, and builds the pyramid with
:func:`progan_fast.data.build_pyramid`. The decoded pyramid is cached in a file keyed on the
folder's names, sizes and mtimes, written atomically and memory-mapped when read back.
:func:`load_image_zip` does the same for the image members of a zip archive, read from the archive
without extracting it (its cache is keyed on the archive's size and mtime). Both give the images
in the same order (sorted relative paths), so a folder and a zip of it give the same dataset.

Depends on :mod:`progan_fast.data`, :mod:`progan_fast.pyramid_file` and on torch, numpy, Pillow and tqdm, nothing else of the package.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from . import files
from . import labels as labelsmod
from . import pyramid_file
from .data import MIN_RES, DataError, ImageDataset, build_pyramid, check_resolution, plural

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder", "load_image_zip"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Bump when the decoding / pyramid pipeline changes, so old cache files are not reused.
_CACHE_FORMAT = "progan_fast.data.cache/2"

_HUGE = "too large to decode safely"  # summary wording for decompression bombs
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 [H, W, 3]; alpha composited over white,
    16-bit scaled (x / 257) to 8-bit."""
    mode = img.mode
    if mode in _16BIT_MODES:
        a = np.asarray(img).astype(np.float32)
        a = np.rint(a / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.rint(np.asarray(img, dtype=np.float32)).clip(0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        out = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return np.rint(out).clip(0, 255).astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _zip_member(archive: zipfile.ZipFile, name: str) -> io.BytesIO:
    return io.BytesIO(archive.read(name))  # ZipFile reads are thread-safe (a lock around the file)


def _decode_image(path, max_res: int):
    """Decode one file -> ("ok", uint8 [3, R, R], (w, h)) | ("small", None, (w, h)) |
    ("huge", None, error message) | ("unreadable", None, error message).  Never raises for bad files.

    "huge": more pixels than twice ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb, or a header
    that claims such a size); Pillow refuses these from the header alone, before decoding.
    ``path``: a file path, or a callable that returns the file (a zip member)."""
    try:
        with Image.open(path() if callable(path) else path) as img:
            w0, h0 = img.size
            if img.format == "JPEG" and min(w0, h0) >= 4 * max_res:
                # DCT-domain downscale by 2/4/8 while keeping >= 2*max_res on the short side.
                img.draft(None, (2 * max_res, 2 * max_res))
            img.load()
            img = ImageOps.exif_transpose(img)
            w, h = img.size
            if min(w, h) < max_res:
                return "small", None, (w, h)
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
            rgb = _to_rgb_array(img)
            if rgb.shape[0] != max_res:
                rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((max_res, max_res), Image.LANCZOS))
            return "ok", np.ascontiguousarray(rgb.transpose(2, 0, 1)), (w, h)
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        return "huge", None, str(e).splitlines()[0] if str(e) else type(e).__name__
    except Exception as e:  # unreadable: zero-byte, truncated, not an image, bomb, bad EXIF, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return "unreadable", None, msg


def _scan(root: Path):
    """Sorted relative posix paths of image files under root, with os.stat results."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                full = os.path.join(dirpath, name)
                rel = Path(os.path.relpath(full, root)).as_posix()
                found.append(rel)
    found.sort()
    return found


def _cache_paths(root: Path, rels: list, max_res: int, cache_dir: Path, labels: bool = False):
    h = hashlib.sha1()
    h.update(_CACHE_FORMAT.encode())
    h.update(f"\0{max_res}\0{root}\0{'labels' if labels else ''}\0".encode())
    for rel in rels:
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return _cache_file(root, h, max_res, cache_dir)


def _cache_file(root: Path, h, max_res: int, cache_dir: Path):
    key = h.hexdigest()[:24]
    folder_tag = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    prefix = f"progan_data_{folder_tag}_{max_res}px_"
    return cache_dir / f"{prefix}{key}.pt", prefix


def _read_cache(path: Path, max_res: int):
    if not path.is_file():
        return None
    try:
        obj = pyramid_file.read(path, max_res, _CACHE_FORMAT)
        return obj["levels"], str(obj["source"]), str(obj["summary"]), obj.get("labels"), obj.get("class_names")
    except Exception:  # corrupt / truncated / foreign file: ignore and rebuild
        return None


def _write_cache(path: Path, prefix: str, dataset: ImageDataset) -> None:
    # A cache that cannot be written (a full disk, an unwritable run folder) stops the run here, with
    # one message: its checkpoints would go to the same disk and fail later, after the training.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise files.WriteError(path.parent, e, "the data cache folder") from None
    pyramid_file.write(path, dataset, _CACHE_FORMAT, "the data cache")
    for old in path.parent.glob(prefix + "*.pt"):  # stale caches of the same source and resolution
        if old != path:
            try:
                old.unlink()
            except OSError:
                pass


def load_image_folder(
    path: Union[str, os.PathLike],
    max_res: int,
    cache_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    labels: bool = False,
) -> ImageDataset:
    """Load every image under ``path`` (recursively) into a resolution pyramid.

    Images are centre-cropped to square and resized to ``max_res`` with Lanczos;
    images whose shorter side is below ``max_res`` and unreadable files are
    skipped and counted in ``summary``.  With ``cache_dir``, the decoded pyramid
    is stored there and reused while the folder's files (names, sizes, mtimes)
    are unchanged.  With ``labels``, each image's class comes from the folder's
    ``dataset.json``, or else from its class subfolder (:mod:`progan_fast.labels`).
    """
    check_resolution(max_res)
    max_res = int(max_res)
    root_given = Path(path)
    if not root_given.exists():
        raise DataError(f"data folder {root_given} does not exist")
    if not root_given.is_dir():
        raise DataError(f"data path {root_given} is not a directory")
    root = root_given.resolve()
    rels = _scan(root)
    if not rels:
        raise DataError(
            f"no image files ({' '.join(IMAGE_EXTENSIONS)}) found in {root_given}"
        )
    json_file = root / labelsmod.LABELS_FILE
    has_json = labels and json_file.is_file()
    found = None
    if labels:
        found = (labelsmod.from_json(json_file.read_text(encoding="utf-8", errors="replace"), rels, str(json_file))
                 if has_json else labelsmod.from_folders(rels, str(root_given)))
    cache = None
    if cache_dir is not None:  # the key covers dataset.json too (its size and mtime) when it gives the labels
        cache = _cache_paths(root, rels + [labelsmod.LABELS_FILE] * has_json, max_res, Path(cache_dir), labels)
    return _load(rels, [str(root / rel) for rel in rels], max_res, str(root_given), cache, progress, found)


def _zip_images(archive: zipfile.ZipFile) -> list[str]:
    """Sorted names of the archive's image members (macOS resource forks under __MACOSX/ left out)."""
    return sorted(
        info.filename for info in archive.infolist()
        if not info.is_dir() and not info.filename.startswith("__MACOSX/")
        and os.path.splitext(info.filename)[1].lower() in IMAGE_EXTENSIONS
    )


def load_image_zip(
    path: Union[str, os.PathLike],
    max_res: int,
    cache_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    labels: bool = False,
) -> ImageDataset:
    """Load every image member of the zip archive ``path`` into a resolution pyramid, reading the
    archive in place (nothing is extracted); otherwise as :func:`load_image_folder`, labels from the
    archive's top-level ``dataset.json`` or class folders included."""
    check_resolution(max_res)
    max_res = int(max_res)
    given = Path(path)
    try:
        archive = zipfile.ZipFile(given)
    except FileNotFoundError:
        raise DataError(f"data archive {given} does not exist") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"data archive {given} is not a readable zip file (truncated or corrupt?): {e}") from None
    with archive:
        names = _zip_images(archive)
        if not names:
            raise DataError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) found in the zip archive {given}")
        found = None
        if labels:
            where = f"{given}:{labelsmod.LABELS_FILE}"
            try:
                text = archive.read(labelsmod.LABELS_FILE).decode("utf-8", "replace")
            except KeyError:
                text = None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"cannot read {where}: {e}") from None
            found = labelsmod.from_json(text, names, where) if text is not None else \
                labelsmod.from_folders(names, str(given))
        cache = None
        if cache_dir is not None:
            root = given.resolve()
            st = os.stat(root)
            h = hashlib.sha1(f"{_CACHE_FORMAT}\0zip\0{max_res}\0{root}\0{st.st_size}\0{st.st_mtime_ns}\0"
                             f"{'labels' if labels else ''}".encode())
            cache = _cache_file(root, h, max_res, Path(cache_dir))
        sources = [functools.partial(_zip_member, archive, name) for name in names]
        return _load(names, sources, max_res, str(given), cache, progress, found)


def _load(rels: list, sources: list, max_res: int, label: str, cache, progress: bool,
          found: labelsmod.Labels | None = None) -> ImageDataset:
    """Decode ``sources`` (paths or zip-member readers, named ``rels``) into the pyramid, through the
    cache file ``cache`` (``(path, prefix)``, or None); ``found``: the images' labels, if any."""
    if cache is not None:
        cached = _read_cache(cache[0], max_res)
        if cached is not None and (cached[3] is not None) == (found is not None):
            levels, source, summary, cached_labels, class_names = cached
            return ImageDataset(levels=levels, source=source, summary=summary, from_cache=True,
                                labels=cached_labels, class_names=class_names)

    n_files = len(rels)
    out = np.empty((n_files, 3, max_res, max_res), dtype=np.uint8)
    kept_labels = []  # the labels of the images kept, in order
    count = 0
    unreadable = []  # (rel, message)
    small = []  # (rel, (w, h))
    huge = []  # (rel, message): over Pillow's decompression-bomb limit
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_decode_image, sources, [max_res] * n_files)
        for i, (rel, (status, arr, info)) in enumerate(tqdm(
            zip(rels, results), total=n_files, desc="decoding images", unit="img",
            disable=None if progress else True, leave=False,
        )):
            if status == "ok":
                out[count] = arr
                count += 1
                if found is not None:
                    kept_labels.append(found.per_image[i])
            elif status == "small":
                small.append((rel, info))
            elif status == "huge":
                huge.append((rel, info))
            else:
                unreadable.append((rel, info))

    if count == 0:
        if small:
            bw, bh = max((wh for _, wh in small), key=lambda wh: (min(wh), wh[0] * wh[1]))
            fit = 1 << (min(bw, bh).bit_length() - 1)
            hint = f"; use --max-res {fit} or lower" if fit >= MIN_RES else ""
            raise DataError(
                f"--max-res {max_res} is too large for the data in {label}: "
                f"the largest usable image is {bw}x{bh}{hint}"
            )
        bad = unreadable + huge
        example = f" (e.g. {bad[0][0]}: {bad[0][1]})" if bad else ""
        too_big = f", {len(huge):,} {_HUGE}" if huge else ""
        raise DataError(
            f"no readable image in {label}: found {plural(n_files, 'image file')}, "
            f"{len(unreadable):,} unreadable{too_big}{example}"
        )

    if count < n_files:
        out.resize((count, 3, max_res, max_res), refcheck=False)  # shrink in place, no copy
    top = torch.from_numpy(out)
    levels = build_pyramid(top)

    skipped = []
    if unreadable:
        skipped.append(f"{len(unreadable):,} unreadable")
    if huge:
        skipped.append(f"{len(huge):,} {_HUGE}")
    if small:
        skipped.append(f"{len(small):,} smaller than {max_res}px")
    summary = f"loaded {plural(count, 'image')} from {label}"
    if found is not None:
        summary += f", {found.num_classes:,} class{'es' if found.num_classes != 1 else ''}"
    if skipped:
        summary += f" (skipped: {', '.join(skipped)})"
    dataset = ImageDataset(levels=levels, source=label, summary=summary,
                           labels=None if found is None else torch.tensor(kept_labels, dtype=torch.int64),
                           class_names=None if found is None else list(found.class_names))
    if cache is not None:
        _write_cache(cache[0], cache[1], dataset)
    return dataset
