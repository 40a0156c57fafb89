"""Image folders and zip archives: every image decoded once into the resolution pyramid, and cached.

:func:`load_image_folder` scans the folder (recursively; png, jpg, webp, bmp), decodes the files on
a few threads (made square by ``fit``: centre crop, pad or stretch; Lanczos resize to ``max_res``;
alpha composited over white, 16-bit scaled to 8-bit; RGB, or one channel with ``channels=1``),
skips and counts the files it cannot use, and builds the pyramid with
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

__all__ = ["FITS", "IMAGE_EXTENSIONS", "load_image_folder", "load_image_zip"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Bump when the decoding / pyramid pipeline changes, so old cache files are not reused.
_CACHE_FORMAT = "progan_fast.data.cache/2"

_HUGE = "too large to decode safely"  # summary wording for decompression bombs
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
#: Pillow modes of single-channel images (gray, gray + alpha, 1-bit, 16/32-bit and float gray): a
#: dataset made only of these is grayscale, and training it as RGB is said once.
SINGLE_CHANNEL_MODES = {"L", "LA", "La", "1", "F"} | _16BIT_MODES

#: How a non-square image is made square (``--fit``): ``crop`` keeps the centred square of the
#: shorter side; ``pad`` keeps the whole image, centred on a square of its border's mean colour;
#: ``stretch`` resizes it to the square, changing its aspect ratio.
FITS = ("crop", "pad", "stretch")


def _check_decoding(fit: str, channels: int) -> None:
    if fit not in FITS:
        raise DataError(f"--fit must be one of {', '.join(FITS)}, not {fit!r}")
    if channels not in (1, 3):
        raise DataError(f"--channels must be 1 or 3, not {channels!r}")


def _cache_identity(fit: str, channels: int) -> str:
    """The decoding choices' part of a cache key; empty for the defaults, so that the caches written
    before these choices existed (all crop, RGB) stay valid."""
    return "" if (fit, channels) == ("crop", 3) else f"\0fit={fit}\0channels={channels}"


def border_mean(a: np.ndarray) -> np.ndarray:
    """The mean colour (float64, one value per channel) of the pixels on the edge of ``a``
    ``[H, W, C]``, each edge pixel counted once: ``pad``'s background."""
    h, w = a.shape[:2]
    if h <= 2 or w <= 2:
        return a.reshape(h * w, -1).mean(axis=0)
    edge = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]).astype(np.float64)
    return edge.mean(axis=0)


def pad_to_square(a: np.ndarray) -> np.ndarray:
    """``a`` ``[H, W, C]`` uint8 centred on a square of side ``max(H, W)`` filled with its border's
    mean colour (rounded); an odd margin puts the extra pixel after the image (bottom, right)."""
    h, w, c = a.shape
    s = max(h, w)
    if h == w:
        return a
    fill = np.rint(border_mean(a)).clip(0, 255).astype(np.uint8)
    out = np.empty((s, s, c), dtype=np.uint8)
    out[:] = fill
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def _usable_side(w: int, h: int, fit: str) -> int:
    """The side of an image that must reach ``max_res`` for it to be used without enlarging: the
    shorter one, except for ``pad``, which scales the longer one to ``max_res``."""
    return max(w, h) if fit == "pad" else min(w, h)


def _to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Any Pillow image -> uint8 ``[H, W, channels]``: RGB as :func:`_to_rgb_array`, or one channel:
    a single-channel image's own values, a colour image's luma (Pillow's ``convert("L")``: ITU-R
    601-2, ``L = R * 299/1000 + G * 587/1000 + B * 114/1000``, of the RGB after alpha compositing)."""
    rgb = _to_rgb_array(img)
    if channels == 3:
        return rgb
    if img.mode in SINGLE_CHANNEL_MODES:
        return np.ascontiguousarray(rgb[:, :, :1])  # the three channels are copies of the one
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)[:, :, None]


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` (C 1 or 3) -> ``[size, size, C]`` with Lanczos."""
    if a.shape[0] == size and a.shape[1] == size:
        return a
    if a.shape[2] == 1:
        return np.asarray(Image.fromarray(a[:, :, 0], "L").resize((size, size), Image.LANCZOS))[:, :, None]
    return np.asarray(Image.fromarray(a, "RGB").resize((size, size), Image.LANCZOS))


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


def _decode_image(path, max_res: int, fit: str = "crop", channels: int = 3):
    """Decode one file -> ("ok", uint8 [channels, R, R], single_channel) | ("small", None, (w, h)) |
    ("huge", None, error message) | ("unreadable", None, error message).  Never raises for bad files.

    ``fit`` makes it square (:data:`FITS`); ``single_channel``: the file is a grayscale image
    (:data:`SINGLE_CHANNEL_MODES`).
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
            if _usable_side(w, h, fit) < max_res:
                return "small", None, (w, h)
            single = img.mode in SINGLE_CHANNEL_MODES
            if fit == "crop":
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                img = img.crop((left, top, left + s, top + s))
            a = _to_array(img, channels)
            if fit == "pad":
                a = pad_to_square(a)
            a = _resize(a, max_res)  # stretch: straight from w x h
            return "ok", np.ascontiguousarray(a.transpose(2, 0, 1)), single
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


def _cache_paths(root: Path, rels: list, max_res: int, cache_dir: Path, labels: bool = False,
                 fit: str = "crop", channels: int = 3):
    h = hashlib.sha1()
    h.update(_CACHE_FORMAT.encode())
    h.update(f"\0{max_res}\0{root}\0{'labels' if labels else ''}\0{_cache_identity(fit, channels)}".encode())
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


def _read_cache(path: Path, max_res: int, fit: str = "crop", channels: int = 3):
    if not path.is_file():
        return None
    try:
        obj = pyramid_file.read(path, max_res, _CACHE_FORMAT, fit=fit, channels=channels)
        return (obj["levels"], str(obj["source"]), str(obj["summary"]), obj.get("labels"), obj.get("class_names"),
                bool(obj.get("single_channel_source", False)))
    except Exception:  # corrupt / truncated / foreign file, or decoded another way: ignore and rebuild
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
    fit: str = "crop",
    channels: int = 3,
) -> ImageDataset:
    """Load every image under ``path`` (recursively) into a resolution pyramid.

    Images are made square by ``fit`` (:data:`FITS`: centre crop by default) and resized to
    ``max_res`` with Lanczos, with ``channels`` 3 (RGB) or 1 (gray); images smaller than
    ``max_res`` (the shorter side; with ``pad`` the longer) and unreadable files are
    skipped and counted in ``summary``.  With ``cache_dir``, the decoded pyramid
    is stored there and reused while the folder's files (names, sizes, mtimes)
    are unchanged.  With ``labels``, each image's class comes from the folder's
    ``dataset.json``, or else from its class subfolder (:mod:`progan_fast.labels`).
    """
    check_resolution(max_res)
    _check_decoding(fit, channels)
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
        cache = _cache_paths(root, rels + [labelsmod.LABELS_FILE] * has_json, max_res, Path(cache_dir), labels,
                             fit, channels)
    return _load(rels, [str(root / rel) for rel in rels], max_res, str(root_given), cache, progress, found,
                 fit, channels)


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
    fit: str = "crop",
    channels: int = 3,
) -> ImageDataset:
    """Load every image member of the zip archive ``path`` into a resolution pyramid, reading the
    archive in place (nothing is extracted); otherwise as :func:`load_image_folder`, labels from the
    archive's top-level ``dataset.json`` or class folders included."""
    check_resolution(max_res)
    _check_decoding(fit, channels)
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
                             f"{'labels' if labels else ''}{_cache_identity(fit, channels)}".encode())
            cache = _cache_file(root, h, max_res, Path(cache_dir))
        sources = [functools.partial(_zip_member, archive, name) for name in names]
        return _load(names, sources, max_res, str(given), cache, progress, found, fit, channels)


def _load(rels: list, sources: list, max_res: int, label: str, cache, progress: bool,
          found: labelsmod.Labels | None = None, fit: str = "crop", channels: int = 3) -> ImageDataset:
    """Decode ``sources`` (paths or zip-member readers, named ``rels``) into the pyramid, through the
    cache file ``cache`` (``(path, prefix)``, or None); ``found``: the images' labels, if any;
    ``fit`` and ``channels``: how (:func:`_decode_image`)."""
    if cache is not None:
        cached = _read_cache(cache[0], max_res, fit, channels)
        if cached is not None and (cached[3] is not None) == (found is not None):
            levels, source, summary, cached_labels, class_names, single = cached
            return ImageDataset(levels=levels, source=source, summary=summary, from_cache=True,
                                labels=cached_labels, class_names=class_names, fit=fit,
                                single_channel_source=single)

    n_files = len(rels)
    out = np.empty((n_files, channels, max_res, max_res), dtype=np.uint8)
    all_single = True  # every image kept is single-channel (grayscale)
    kept_labels = []  # the labels of the images kept, in order
    count = 0
    unreadable = []  # (rel, message)
    small = []  # (rel, (w, h))
    huge = []  # (rel, message): over Pillow's decompression-bomb limit
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_decode_image, sources, [max_res] * n_files, [fit] * n_files, [channels] * n_files)
        for i, (rel, (status, arr, info)) in enumerate(tqdm(
            zip(rels, results), total=n_files, desc="decoding images", unit="img",
            disable=None if progress else True, leave=False,
        )):
            if status == "ok":
                out[count] = arr
                all_single = all_single and info
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
            bw, bh = max((wh for _, wh in small), key=lambda wh: (_usable_side(*wh, fit), wh[0] * wh[1]))
            fits = 1 << (_usable_side(bw, bh, fit).bit_length() - 1)
            hint = f"; use --max-res {fits} or lower" if fits >= MIN_RES else ""
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
        out.resize((count, channels, max_res, max_res), refcheck=False)  # shrink in place, no copy
    top = torch.from_numpy(out)
    levels = build_pyramid(top)

    skipped = []
    if unreadable:
        skipped.append(f"{len(unreadable):,} unreadable")
    if huge:
        skipped.append(f"{len(huge):,} {_HUGE}")
    if small:
        skipped.append(f"{len(small):,} smaller than {max_res}px{' on the longer side' if fit == 'pad' else ''}")
    summary = f"loaded {plural(count, 'image')} from {label}"
    if (fit, channels) != ("crop", 3):
        summary += f" ({'gray' if channels == 1 else 'RGB'}, {fit})"
    if found is not None:
        summary += f", {found.num_classes:,} class{'es' if found.num_classes != 1 else ''}"
    if skipped:
        summary += f" (skipped: {', '.join(skipped)})"
    dataset = ImageDataset(levels=levels, source=label, summary=summary,
                           labels=None if found is None else torch.tensor(kept_labels, dtype=torch.int64),
                           class_names=None if found is None else list(found.class_names), fit=fit,
                           single_channel_source=all_single)
    if cache is not None:
        _write_cache(cache[0], cache[1], dataset)
    return dataset
