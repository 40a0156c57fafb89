"""Tests for progan_fast.data and progan_fast.image_folder (images are generated on the fly with Pillow)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from progan_fast import data, image_folder
from progan_fast.data import (
    DataError,
    check_resolution,
    load_default_dataset,
    to_float,
)
from progan_fast.image_folder import load_image_folder

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def solid(color, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def load(folder, max_res=8, **kw):
    return load_image_folder(folder, max_res, progress=False, **kw)


def pixel(ds, i, y=0, x=0, res=None):
    t = ds.at(res or max(ds.levels))
    return tuple(int(v) for v in t[i, :, y, x])


def close(a, b, tol):
    return all(abs(int(p) - int(q)) <= tol for p, q in zip(a, b))


# --------------------------------------------------------------------------- scanning


def test_recursive_scan_all_extensions_sorted(tmp_path):
    colors = {}
    files = [
        ("a.png", {}),
        ("b.JPG", {"quality": 95}),
        ("c.jpeg", {"quality": 95}),
        ("d.bmp", {}),
        ("sub/deeper/e.PNG", {}),
        ("sub/f.webp", {"lossless": True}),
    ]
    if not features.check("webp"):
        files = [f for f in files if not f[0].endswith(".webp")]
    for i, (name, kw) in enumerate(files):
        color = (40 * i + 10, 200 - 30 * i, 100)
        colors[name] = color
        save(tmp_path / name, solid(color), **kw)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "x.gif").write_bytes(b"GIF89a")  # unsupported extension: ignored

    ds = load(tmp_path)
    assert len(ds) == len(files)
    assert ds.summary == f"loaded {len(files)} images from {tmp_path}"
    assert ds.source == str(tmp_path)
    # Order follows the sorted relative paths.
    for i, name in enumerate(sorted(colors)):
        assert close(pixel(ds, i, 4, 4), colors[name], 3), name


# --------------------------------------------------------------------------- modes


def test_mode_conversions(tmp_path):
    # Files are named so that sorted order = index below.
    save(tmp_path / "0_gray.png", solid(100, mode="L"))
    pal = solid(0, mode="P")
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.paste(1, (0, 0, 8, 8))
    save(tmp_path / "1_palette.png", pal)
    rgba = solid((0, 0, 0, 0), mode="RGBA")  # fully transparent black
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    save(tmp_path / "2_rgba.png", rgba)
    a16 = np.zeros((8, 8), np.uint16)
    a16[0, 0], a16[0, 1], a16[0, 2] = 65535, 32768, 0
    img16 = Image.fromarray(a16)
    assert img16.mode == "I;16"
    save(tmp_path / "3_gray16.png", img16)
    save(tmp_path / "4_cmyk.jpg", solid((255, 0, 0, 0), mode="CMYK"), quality=95)  # pure cyan
    la = solid((50, 255), mode="LA")
    la.putpixel((0, 0), (0, 0))
    save(tmp_path / "5_la.png", la)
    ptr = solid(0, mode="P")
    ptr.putpalette([9, 9, 9, 200, 100, 50] + [0] * 762)
    ptr.putpixel((1, 1), 1)
    save(tmp_path / "6_palette_transparency.png", ptr, transparency=0)

    ds = load(tmp_path)
    assert len(ds) == 7 and "skipped" not in ds.summary
    assert pixel(ds, 0) == (100, 100, 100)
    assert pixel(ds, 1) == (10, 20, 30)
    assert pixel(ds, 2, 0, 0) == WHITE  # transparent -> white background
    assert pixel(ds, 2, 0, 1) == RED
    assert pixel(ds, 2, 0, 2) == (127, 127, 127)  # 255 * (1 - 128/255)
    assert pixel(ds, 3, 0, 0) == (255, 255, 255)  # 65535 -> 255, not clipped garbage
    assert pixel(ds, 3, 0, 1) == (128, 128, 128)  # 32768 / 257 = 127.5 -> 128
    assert pixel(ds, 3, 0, 2) == (0, 0, 0)
    assert close(pixel(ds, 4, 4, 4), (0, 255, 255), 6)  # cyan
    assert pixel(ds, 5, 0, 0) == WHITE and pixel(ds, 5, 3, 3) == (50, 50, 50)
    assert pixel(ds, 6, 0, 0) == WHITE and pixel(ds, 6, 1, 1) == (200, 100, 50)


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
@pytest.mark.parametrize("size", [(32, 16), (256, 128)])  # small, and large enough for JPEG draft
def test_exif_rotated_jpeg(tmp_path, size, orientation, top, bottom):
    w, h = size
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(RED, (0, 0, w // 2, h))  # stored: left half red, right half blue
    exif = Image.Exif()
    # 6: display = rotate 90 degrees clockwise -> the left (red) half ends on top;
    # 8: rotate 90 degrees counter-clockwise -> the left half ends at the bottom.
    exif[0x0112] = orientation
    save(tmp_path / "rot.jpg", img, exif=exif.tobytes(), quality=95)
    ds = load(tmp_path, max_res=16)
    assert len(ds) == 1
    assert close(pixel(ds, 0, 2, 8), top, 40)  # top rows
    assert close(pixel(ds, 0, 13, 8), bottom, 40)  # bottom rows
    # Without the transpose, left/right would differ instead of top/bottom:
    assert close(pixel(ds, 0, 2, 2), pixel(ds, 0, 2, 13), 40)


# --------------------------------------------------------------------------- bad files


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    save(tmp_path / "good1.png", solid(RED))
    save(tmp_path / "good2.jpg", solid(GREEN), quality=95)
    (tmp_path / "empty.png").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    full = save(tmp_path / "full.png", noise).read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "text.png").write_text("this is not a PNG\n")
    save(tmp_path / "tiny.png", solid(BLUE, size=(4, 4)))
    save(tmp_path / "thin.png", solid(BLUE, size=(100, 6)))

    ds = load(tmp_path)
    assert len(ds) == 2
    assert ds.summary == f"loaded 2 images from {tmp_path} (skipped: 3 unreadable, 2 smaller than 8px)"
    assert close(pixel(ds, 0, 4, 4), RED, 0)  # good1.png sorts before good2.jpg
    assert close(pixel(ds, 1, 4, 4), GREEN, 6)


def test_decompression_bomb_is_skipped_and_counted_apart(tmp_path, monkeypatch):
    save(tmp_path / "a.png", solid(RED))
    save(tmp_path / "b_big.png", solid(GREEN, size=(64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000 -> DecompressionBombError
    ds = load(tmp_path)
    assert len(ds) == 1 and pixel(ds, 0) == RED
    assert ds.summary == f"loaded 1 image from {tmp_path} (skipped: 1 too large to decode safely)"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_png_whose_header_claims_huge_dimensions_is_skipped_without_decoding(tmp_path):
    import struct
    import zlib

    # A valid PNG stream whose IHDR says 100,000 x 100,000 RGB (30 GB decoded), with default limits.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    save(tmp_path / "ok.png", solid(BLUE))
    ds = load(tmp_path)
    assert len(ds) == 1 and pixel(ds, 0) == BLUE
    assert ds.summary.endswith("(skipped: 1 too large to decode safely)")
    # Alone, it is the reason nothing loads, and the error says so.
    (tmp_path / "ok.png").unlink()
    with pytest.raises(DataError, match="1 too large to decode safely .*bomb.png"):
        load(tmp_path)


def test_truncated_jpeg_is_skipped_and_counted(tmp_path):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))
    full = save(tmp_path / "full.jpg", noise, quality=90).read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    save(tmp_path / "good.png", solid(RED))
    ds = load(tmp_path)
    assert len(ds) == 1 and ds.summary.endswith("(skipped: 1 unreadable)")


def test_palette_with_partial_alpha_and_bilevel(tmp_path):
    pal = solid(0, mode="P")
    pal.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))  # left half index 1 (blue), right half index 0 (red)
    # tRNS with one alpha per palette entry: red fully opaque, blue half transparent.
    save(tmp_path / "0_palette_alpha.png", pal, transparency=bytes([255, 128]))
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((0, 0), 1)
    save(tmp_path / "1_bilevel.png", bilevel)
    ds = load(tmp_path)
    assert len(ds) == 2 and "skipped" not in ds.summary
    assert pixel(ds, 0, 0, 6) == (200, 0, 0)
    # blue 200 at alpha 128/255 over white: 255 * (1 - a) + c * a
    a = 128 / 255
    assert close(pixel(ds, 0, 0, 1), (round(255 * (1 - a)), round(255 * (1 - a)), round(200 * a + 255 * (1 - a))), 1)
    assert pixel(ds, 1, 0, 0) == WHITE and pixel(ds, 1, 4, 4) == (0, 0, 0)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_path_is_a_file(tmp_path):
    f = save(tmp_path / "x.png", solid(RED))
    with pytest.raises(DataError, match="not a directory"):
        load(f)


def test_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files") as e:
        load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_only_broken_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    with pytest.raises(DataError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "no readable image" in msg and "2 image files" in msg and "2 unreadable" in msg
    assert str(tmp_path) in msg and "\n" not in msg


def test_max_res_too_large_for_data(tmp_path):
    save(tmp_path / "a.png", solid(RED, size=(16, 16)))
    save(tmp_path / "b.png", solid(RED, size=(24, 20)))
    with pytest.raises(DataError) as e:
        load(tmp_path, max_res=32)
    msg = str(e.value)
    assert msg.startswith(f"--max-res 32 is too large for the data in {tmp_path}: the largest usable image is 24x20")
    assert "--max-res 16" in msg


@pytest.mark.parametrize("bad", [0, 2, 3, 48, 2048, 4096, -8, 16.0, "64", True])
def test_check_resolution_rejects(bad):
    with pytest.raises(DataError, match=repr(bad).replace(".", r"\.")):
        check_resolution(bad)


def test_check_resolution_accepts():
    for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024):
        check_resolution(r)
    assert data.MAX_SUPPORTED_RES == 1024


def test_load_image_folder_validates_resolution(tmp_path):
    save(tmp_path / "a.png", solid(RED, size=(64, 64)))
    with pytest.raises(DataError, match="48"):
        load(tmp_path, max_res=48)


# --------------------------------------------------------------------------- geometry / pyramid


def hand_pyramid(top: np.ndarray) -> dict:
    levels = {top.shape[-1]: top}
    x = top
    while x.shape[-1] > 4:
        f = x.astype(np.float32)
        avg = (f[..., 0::2, 0::2] + f[..., 0::2, 1::2] + f[..., 1::2, 0::2] + f[..., 1::2, 1::2]) * 0.25
        x = np.rint(avg).clip(0, 255).astype(np.uint8)
        levels[x.shape[-1]] = x
    return levels


def test_pyramid_matches_hand_computation(tmp_path):
    rng = np.random.default_rng(1)
    arrays = []
    for i in range(3):
        a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        arrays.append(a)
        save(tmp_path / f"{i}.png", Image.fromarray(a))
    ds = load(tmp_path, max_res=32)
    top = np.stack(arrays).transpose(0, 3, 1, 2)
    expected = hand_pyramid(top)
    assert sorted(ds.levels) == [4, 8, 16, 32]
    for r, exp in expected.items():
        got = ds.at(r)
        assert got.dtype == torch.uint8 and got.is_contiguous() and tuple(got.shape) == (3, 3, r, r)
        np.testing.assert_array_equal(got.numpy(), exp)


def test_pyramid_rounds_half_to_even(tmp_path):
    a = np.zeros((8, 8), np.uint8)
    a[0:2, 0:2] = [[0, 0], [1, 1]]  # mean 0.5 -> 0
    a[0:2, 2:4] = [[1, 1], [2, 2]]  # mean 1.5 -> 2
    a[2:4, 0:2] = [[1, 1], [1, 2]]  # mean 1.25 -> 1
    a[2:4, 2:4] = [[2, 2], [2, 3]]  # mean 2.25 -> 2
    a[4:6, 4:6] = [[255, 255], [255, 254]]  # 254.75 -> 255
    save(tmp_path / "a.png", Image.fromarray(a, "L"))
    ds = load(tmp_path, max_res=8)
    l4 = ds.at(4)[0, 0].numpy()
    assert l4[0, 0] == 0 and l4[0, 1] == 2 and l4[1, 0] == 1 and l4[1, 1] == 2 and l4[2, 2] == 255
    with pytest.raises(DataError, match="16"):
        ds.at(16)


def test_center_crop_keeps_middle(tmp_path):
    wide = Image.new("RGB", (24, 8), RED)
    wide.paste(GREEN, (8, 0, 16, 8))
    wide.paste(BLUE, (16, 0, 24, 8))
    save(tmp_path / "a_wide.png", wide)
    save(tmp_path / "b_tall.png", wide.transpose(Image.Transpose.ROTATE_90))
    ds = load(tmp_path, max_res=8)
    assert (ds.at(8)[0] == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()
    assert (ds.at(8)[1] == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()


def test_resize_to_max_res(tmp_path):
    img = Image.new("RGB", (64, 96), (30, 60, 90))
    img.paste(WHITE, (0, 16, 32, 80))  # left half of the central square is white
    save(tmp_path / "a.png", img)
    ds = load(tmp_path, max_res=16)
    t = ds.at(16)[0]
    assert tuple(t.shape) == (3, 16, 16)
    assert close(tuple(t[:, 8, 2]), WHITE, 2) and close(tuple(t[:, 8, 13]), (30, 60, 90), 2)


def test_resize_is_lanczos(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    checker = np.indices((64, 64)).sum(0) % 2 * 255
    save(tmp_path / "a.png", Image.fromarray(a))
    save(tmp_path / "b.png", Image.fromarray(checker.astype(np.uint8), "L"))
    ds = load(tmp_path, max_res=16)
    ref = np.asarray(Image.fromarray(a).resize((16, 16), Image.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(ds.at(16)[0].numpy(), ref)
    flat = ds.at(16)[1].float()  # antialiased, not aliased 0/255 samples
    assert float((flat - 127.5).abs().max()) < 10


# --------------------------------------------------------------------------- cache


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    save(folder / "a.png", solid(RED))
    save(folder / "b.bmp", solid(GREEN))  # uncompressed: same size whatever the colour
    (folder / "broken.png").write_bytes(b"")
    first = load(folder, cache_dir=cache)
    assert not first.from_cache
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and not list(cache.glob(".*.tmp-*"))

    real_decode = image_folder._decode_image

    def boom(*a, **k):
        raise AssertionError("decoder must not run when the cache is valid")

    monkeypatch.setattr(image_folder, "_decode_image", boom)
    second = load(folder, cache_dir=cache)
    assert second.from_cache and second.summary == first.summary and second.source == first.source
    assert sorted(second.levels) == sorted(first.levels)
    for r in first.levels:
        assert torch.equal(second.at(r), first.at(r)) and second.at(r).is_contiguous()
    assert second.fingerprint() == first.fingerprint()

    # A different max_res gets its own key.
    monkeypatch.setattr(image_folder, "_decode_image", real_decode)
    assert not load(folder, max_res=4, cache_dir=cache).from_cache

    # Changing a file (same name, same size, new mtime) invalidates the cache.
    size_before = os.stat(folder / "b.bmp").st_size
    save(folder / "b.bmp", solid(BLUE))
    st = os.stat(folder / "b.bmp")
    assert st.st_size == size_before
    os.utime(folder / "b.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls = []

    def counting(*a, **k):
        calls.append(a)
        return real_decode(*a, **k)

    monkeypatch.setattr(image_folder, "_decode_image", counting)
    third = load(folder, cache_dir=cache)
    assert not third.from_cache and len(calls) == 3
    assert pixel(third, 1) == BLUE
    assert third.fingerprint() != first.fingerprint()
    new_files = sorted(cache.glob("*_8px_*.pt"))
    assert len(new_files) == 1 and new_files[0] != files[0]  # stale file replaced

    # Adding a file invalidates too.
    save(folder / "c.png", solid(WHITE))
    assert len(load(folder, cache_dir=cache)) == 3


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    save(folder / "a.png", solid(RED))
    first = load(folder, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    cache_file.write_bytes(b"garbage, not a torch file")
    again = load(folder, cache_dir=cache)
    assert not again.from_cache and torch.equal(again.at(8), first.at(8))
    # ... and the rebuilt file is valid again.
    monkeypatch.setattr(image_folder, "_decode_image", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    assert load(folder, cache_dir=cache).from_cache
    # A well-formed torch file with the wrong content is ignored too.
    torch.save({"format": "something else"}, cache_file)
    monkeypatch.undo()
    assert not load(folder, cache_dir=cache).from_cache


# --------------------------------------------------------------------------- embedded set / misc


def test_embedded_dataset():
    ds = load_default_dataset(64)
    n = len(ds)
    assert n > 1000
    assert sorted(ds.levels) == [4, 8, 16, 32, 64]
    for r, t in ds.levels.items():
        assert t.dtype == torch.uint8 and tuple(t.shape) == (n, 3, r, r) and t.is_contiguous()
    top = ds.at(64)
    assert int(top.min()) < 20 and int(top.max()) == 255
    means = top.float().mean(dim=(1, 2, 3))
    assert float(means.min()) < 150 and float(means.max()) > 240  # varied content
    assert (top[:, :, 0, 0] == 255).float().mean() > 0.5  # white background in most corners
    assert "emoji" in ds.source.lower() and f"{n:,}" in ds.source
    np.testing.assert_array_equal(ds.at(4).numpy(), hand_pyramid(top.numpy())[4])
    assert len(ds.fingerprint()) == 40 and ds.fingerprint() == load_default_dataset(64).fingerprint()
    small = load_default_dataset(16)
    assert sorted(small.levels) == [4, 8, 16] and torch.equal(small.at(16), ds.at(16))


def test_embedded_dataset_too_large():
    with pytest.raises(DataError, match=r"128.*64x64.*--data"):
        load_default_dataset(128)
    with pytest.raises(DataError, match="48"):
        load_default_dataset(48)


def test_to_float():
    x = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert y[0] == -1.0 and y[3] == 1.0
    assert abs(float(y[1]) + 1 / 255) < 1e-6 and abs(float(y[2]) - 1 / 255) < 1e-6
    assert x.tolist() == [0, 127, 128, 255]  # input untouched
    with pytest.raises(TypeError):
        to_float(torch.zeros(3))
