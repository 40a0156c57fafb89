"""Issue 27, items 1 and 2: ``--fit crop|pad|stretch`` for non-square images and ``--channels 1`` for
grayscale data, from the file on disk to the networks, samples, metrics and a resume.

Every expected image is computed here from the pixels written (numpy formulas), not by the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan_fast import dataset as dataset_cli
from progan_fast import fid, image_folder, images, pyramid_file, swd, train
from progan_fast.checkpoint import CheckpointError, check_compatible, list_checkpoints, load_checkpoint
from progan_fast.cli import UsageError
from progan_fast.config import TrainConfig
from progan_fast.data import DataError
from progan_fast.networks import Discriminator, Generator, NetworkConfig
from progan_fast.run_folder import RunFolder
from test_training import TINY


def pixels(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def save(a: np.ndarray, path: Path, **kw) -> np.ndarray:
    """Write ``a`` and return the pixels the file decodes to (a JPEG's differ from ``a``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, **kw)
    with Image.open(path) as im:
        return np.asarray(im)


def expected_pad(a: np.ndarray) -> np.ndarray:
    """The whole image centred (extra pixel after it) on a square of the mean of its edge pixels."""
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, _ = a.shape
    s = max(h, w)
    edge = [a[y, x] for y in range(h) for x in range(w) if y in (0, h - 1) or x in (0, w - 1)]
    fill = np.rint(np.mean(np.array(edge, dtype=np.float64), axis=0)).astype(np.uint8)
    out = np.tile(fill, (s, s, 1))
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = a
    return out.transpose(2, 0, 1)


def top_level(folder: Path, res: int, **kw) -> np.ndarray:
    return image_folder.load_image_folder(folder, res, progress=False, **kw).at(res).numpy()


# ----- item 2: --fit ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(32, 16), (32, 13), (16, 32), (13, 32)], ids=["wide", "wide_odd", "tall", "tall_odd"])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_pad_keeps_the_whole_image_on_its_border_mean(tmp_path, size, fmt):
    w, h = size
    decoded = save(pixels(h, w, seed=w * h), tmp_path / f"a.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
    got = top_level(tmp_path, 32, fit="pad")  # the square is 32 already: no resize
    assert got.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(got[0], expected_pad(decoded))


@pytest.mark.parametrize("size", [(64, 32), (32, 64)], ids=["wide", "tall"])
def test_crop_keeps_the_centred_square(tmp_path, size):
    w, h = size
    a = save(pixels(h, w, seed=1), tmp_path / "a.png")
    top, left = (h - 32) // 2, (w - 32) // 2
    np.testing.assert_array_equal(top_level(tmp_path, 32)[0], a[top:top + 32, left:left + 32].transpose(2, 0, 1))
    np.testing.assert_array_equal(top_level(tmp_path, 32, fit="crop")[0], top_level(tmp_path, 32)[0])


def three_bands(w: int, h: int) -> np.ndarray:
    """Red, green, blue columns: a quarter, a half and a quarter of the width."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 4, 0] = 255
    a[:, w // 4: 3 * w // 4, 1] = 255
    a[:, 3 * w // 4:, 2] = 255
    return a


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_stretch_squeezes_the_whole_width_and_crop_does_not(tmp_path, fmt):
    save(three_bands(64, 32), tmp_path / f"wide.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    tol = 3 if fmt == "png" else 12
    got = top_level(tmp_path, 32, fit="stretch")[0].astype(int)  # 64x32 -> 32x32: columns halve, rows stay
    # Away from the band edges (Lanczos' reach at 2x is 3 output pixels): each band's colour.
    for cols, colour in ((slice(1, 5), (255, 0, 0)), (slice(11, 21), (0, 255, 0)), (slice(28, 31), (0, 0, 255))):
        assert np.abs(got[:, :, cols] - np.array(colour)[:, None, None]).max() <= tol, cols
    crop = top_level(tmp_path, 32)[0].astype(int)  # the middle half: green (a JPEG's bleeds at its edges)
    assert np.abs(crop[:, :, 3:29] - np.array((0, 255, 0))[:, None, None]).max() <= tol


def test_pad_resized_keeps_the_bands_between_pad_rows(tmp_path):
    a = save(three_bands(64, 32), tmp_path / "wide.png")
    got = top_level(tmp_path, 32, fit="pad")[0].astype(int)  # 64x64 square, image in rows 16..47 -> 8..23
    pad = np.rint(expected_pad(a)[:, 0, 0]).astype(int)
    assert np.abs(got[:, :5, :] - pad[:, None, None]).max() <= 3 and np.abs(got[:, 27:, :] - pad[:, None, None]).max() <= 3
    assert np.abs(got[:, 12:20, 12:20] - np.array((0, 255, 0))[:, None, None]).max() <= 3


def test_small_images_are_judged_by_the_side_the_fit_scales(tmp_path):
    save(pixels(16, 32, seed=2), tmp_path / "wide.png")  # 32 wide, 16 high
    with pytest.raises(DataError, match="--max-res 16"):
        top_level(tmp_path, 32)  # crop needs the short side
    assert top_level(tmp_path, 32, fit="pad").shape == (1, 3, 32, 32)  # pad the long side
    with pytest.raises(DataError, match="--max-res 16"):
        top_level(tmp_path, 32, fit="stretch")


def test_a_cache_built_one_way_is_never_read_the_other_way(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    save(pixels(16, 32, seed=3), data / "wide.png")
    save(pixels(32, 32, seed=4), data / "square.png")
    load = lambda **kw: image_folder.load_image_folder(data, 16, cache_dir=cache, progress=False, **kw)  # noqa: E731
    crop = load()
    assert not crop.from_cache and load().from_cache
    (crop_file,) = cache.glob("*.pt")
    pad = load(fit="pad")
    assert not pad.from_cache and not torch.equal(pad.at(16), crop.at(16))
    # A crop file placed where the pad cache is looked for (as if the keys collided) is not used either.
    (pad_file,) = cache.glob("*.pt")
    assert pad_file != crop_file
    pyramid_file.write(pad_file, crop, image_folder._CACHE_FORMAT, "a planted cache")
    again = load(fit="pad")
    assert not again.from_cache and torch.equal(again.at(16), pad.at(16))
    gray = load(fit="pad", channels=1)
    assert not gray.from_cache and gray.channels == 1
    assert load(fit="pad", channels=1).from_cache


def test_the_default_cache_key_is_unchanged(tmp_path):
    """Caches written before --fit existed (crop, RGB) stay valid: their key has no new part."""
    assert image_folder._cache_identity("crop", 3) == ""
    assert image_folder._cache_identity("pad", 3) != image_folder._cache_identity("stretch", 3) != ""


def test_a_prepared_file_records_its_fit_and_training_must_repeat_it(tmp_path, capsys):
    save(pixels(16, 32, seed=5), tmp_path / "src" / "a.png")
    out = tmp_path / "pad.pt"
    assert dataset_cli.main([str(tmp_path / "src"), "--out", str(out), "--max-res", "16", "--fit", "pad",
                             "--no-progress"]) == 0
    ds = pyramid_file.load_prepared(out, 16, fit="pad")
    assert ds.fit == "pad" and torch.equal(ds.at(16), torch.from_numpy(top_level(tmp_path / "src", 16, fit="pad")))
    with pytest.raises(DataError, match="--fit pad, not --fit crop"):
        pyramid_file.load_prepared(out, 16)
    with pytest.raises(DataError, match="3 channels, not --channels 1"):
        pyramid_file.load_prepared(out, 16, fit="pad", channels=1)
    code = train.main(TINY + ["--data", str(out), "--out", str(tmp_path / "run")])
    assert code == 2 and "--fit pad, not --fit crop" in capsys.readouterr().err


def test_help_shows_the_choices():
    text = train.build_parser().format_help()
    assert "--fit {crop,pad,stretch}" in text and "--channels {1,3}" in text
    text = dataset_cli.build_parser().format_help()
    assert "--fit {crop,pad,stretch}" in text and "--channels {1,3}" in text


# ----- item 1: --channels ---------------------------------------------------------------------------

def test_single_channel_decoding(tmp_path):
    gray = save(pixels(8, 8, seed=6, channels=1), tmp_path / "a_gray.png")
    rgb = save(pixels(8, 8, seed=7), tmp_path / "b_rgb.png")
    wide16 = (pixels(8, 8, seed=8, channels=1).astype(np.uint16) * 257 + 100)
    Image.fromarray(wide16).save(tmp_path / "c_16bit.png")  # mode I;16
    got = top_level(tmp_path, 8, channels=1)
    assert got.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(got[0, 0], gray)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's convert("L")
    assert np.abs(got[1, 0].astype(int) - luma).max() <= 1
    np.testing.assert_array_equal(got[2, 0], np.rint(wide16 / 257.0).astype(np.uint8))
    rgb_of_gray = top_level(tmp_path, 8)[0]
    assert (rgb_of_gray == gray[None]).all()  # as RGB: three copies


def test_a_folder_of_only_grayscale_images_is_noticed(tmp_path):
    for i in range(2):
        save(pixels(8, 8, seed=i, channels=1), tmp_path / "gray" / f"{i}.png")
    Image.fromarray(pixels(8, 8, seed=9, channels=1)).convert("1").save(tmp_path / "gray" / "bits.png")
    assert image_folder.load_image_folder(tmp_path / "gray", 8, progress=False).single_channel_source
    save(pixels(8, 8, seed=3), tmp_path / "gray" / "colour.png")
    assert not image_folder.load_image_folder(tmp_path / "gray", 8, progress=False).single_channel_source


GRAY_NETS = NetworkConfig(max_res=8, latent_size=8, fmap_base=16, fmap_max=8, image_channels=1)
cfg_channels = GRAY_NETS.channels


def _gray_networks_pass(channels_last: bool):
    cfg = GRAY_NETS
    torch.manual_seed(0)
    G, D = Generator(cfg).use_channels_last(channels_last), Discriminator(cfg).use_channels_last(channels_last)
    img = G(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), 8, torch.tensor(0.5))
    score = D(img, 8, torch.tensor(0.5))
    score.sum().backward()
    return img.detach(), score.detach(), G.to_rgb["8"].weight.grad, D.from_rgb["8"].weight.grad


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.slow)])
def test_single_channel_networks(backend, channels_last):
    """G's toRGB to one channel and D's fromRGB from one, forward and backward, on every CPU backend
    and in both memory formats, against the plain-PyTorch reference."""
    from progan_fast import ops

    want = _gray_networks_pass(False)
    assert want[0].shape == (4, 1, 8, 8) and want[1].shape == (4,)
    assert want[2].shape[:2] == (1, cfg_channels(8)) and want[3].shape[:2] == (cfg_channels(8), 1) and want[3].abs().sum() > 0
    try:
        ops.set_default_backend(backend, "cpu")
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    try:
        got = _gray_networks_pass(channels_last)
    finally:
        ops.set_default_backend("reference", "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_gray_grid_is_a_gray_png(tmp_path):
    x = torch.linspace(-1, 1, 2 * 4 * 4).reshape(2, 1, 4, 4)
    path = images.save_grid(x, tmp_path / "g.png", columns=2)
    with Image.open(path) as im:
        assert im.mode == "L"
        a = np.asarray(im)
    zoom = 64 // 4
    want = np.rint((x.numpy()[1, 0] + 1) * 127.5)
    np.testing.assert_array_equal(a[::zoom, 4 * zoom::zoom], want)


def test_swd_on_one_channel():
    g = torch.Generator().manual_seed(0)
    reals = torch.randint(0, 256, (64, 1, 16, 16), generator=g, dtype=torch.uint8)
    alike = torch.randint(0, 256, (64, 1, 16, 16), generator=g, dtype=torch.uint8)  # the same distribution
    stripes = reals[:, :, :, :1].expand(-1, -1, -1, 16).contiguous()  # each row one value: other patches
    same, other = swd.swd(reals, alike)["SWDx1e3_avg"], swd.swd(reals, stripes)["SWDx1e3_avg"]
    assert other > 5 * same
    with pytest.raises(ValueError, match=r"\[64, 1, 16, 16\]"):
        swd.SWD(reals).distance(reals.expand(-1, 3, -1, -1).contiguous())


def test_fid_gives_inception_three_equal_channels():
    seen = []
    net = fid.InceptionFeatures.__new__(fid.InceptionFeatures)
    net.device = torch.device("cpu")
    net.model = lambda x: (seen.append(x), torch.zeros(x.shape[0], 2048))[1]
    gray = torch.randint(0, 256, (2, 1, 299, 299), dtype=torch.uint8)
    net(gray)
    (x,) = seen
    assert x.shape == (2, 3, 299, 299)
    want = (gray.float() - 128.0) / 128.0
    assert all(torch.equal(x[:, c:c + 1], want) for c in range(3))


def test_a_checkpoint_without_the_new_settings_resumes_only_with_their_old_values():
    saved = TrainConfig().to_dict()
    for key in ("fit", "channels", "augment", "augment_p"):
        del saved[key]
    stored = {"config": TrainConfig.normalize_dict(saved)}
    check_compatible(stored, TrainConfig().to_dict())
    for changed, message in ((dict(channels=1), "channels: 3 in the checkpoint, 1 expected"),
                             (dict(fit="pad"), "fit: 'crop' in the checkpoint, 'pad' expected")):
        with pytest.raises(CheckpointError, match=message):
            check_compatible(stored, TrainConfig(**changed).to_dict())


def test_a_resume_must_repeat_fit_and_channels(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_config(TrainConfig(channels=1, fit="pad"), "somewhere")
    assert json.loads((tmp_path / "config.json").read_text())["config"]["channels"] == 1
    for other, flag in ((TrainConfig(channels=3, fit="pad"), "--channels: 1"),
                        (TrainConfig(channels=1, fit="stretch"), "--fit: 'pad'")):
        with pytest.raises(UsageError, match=flag):
            folder.checkpoint_to_resume(other, "auto")


def test_grayscale_training_end_to_end(tmp_path, capsys):
    """A folder of gray PNGs: said once when trained as RGB; with --channels 1 the run trains, writes
    gray samples, its checkpoint generates gray images, and a resume as RGB is refused."""
    data = tmp_path / "gray"
    for i in range(8):
        save(pixels(8, 8, seed=i, channels=1), data / f"{i}.png")
    short = TINY + ["--data", str(data), "--kimg-per-phase", "0.016", "--stop-after-kimg", "0.016"]
    assert train.main(short + ["--out", str(tmp_path / "rgb")]) == 0
    err = capsys.readouterr().err
    assert err.count("is grayscale; it is trained as RGB") == 1 and "--channels 1" in err
    out = tmp_path / "run"
    assert train.main(short + ["--out", str(out), "--channels", "1"]) == 0
    assert "trained as RGB" not in capsys.readouterr().err
    with Image.open(out / "samples" / "latest.png") as im:
        assert im.mode == "L"
    with Image.open(out / "samples" / "reals.png") as im:
        assert im.mode == "L"
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert load_checkpoint(ckpt)["G"]["to_rgb.4.weight"].shape[0] == 1
    from progan_fast import generate

    assert generate.main([str(ckpt), "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L"
    assert train.main(short + ["--out", str(out), "--resume", "auto"]) == 2
    assert "--channels: 1 in the run, 3 now" in capsys.readouterr().err
