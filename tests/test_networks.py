"""Generator and discriminator: shapes, fade-in ends, equalized learning rate, growth."""

import math

import pytest
import torch

from progan_fast import ops
from progan_fast.networks import Discriminator, EqualizedConv2d, Generator, NetworkConfig, load_grown_state_dict

CFG = NetworkConfig(max_res=32, latent_size=24, fmap_base=128, fmap_max=16)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(1)
    return Generator(CFG), Discriminator(CFG)


def test_feature_maps_follow_fmap_base_and_max():
    cfg = NetworkConfig(max_res=1024, fmap_base=8192, fmap_max=512)
    assert [cfg.channels(r) for r in cfg.resolutions()] == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    assert [CFG.channels(r) for r in CFG.resolutions()] == [16, 16, 16, 8]


@pytest.mark.parametrize("res", [4, 8, 16, 32])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_shapes_at_every_resolution_and_phase(nets, res, alpha):
    G, D = nets
    z = torch.randn(3, CFG.latent_size)
    img = G(z, res, alpha)
    assert img.shape == (3, 3, res, res)
    assert D(img, res, alpha).shape == (3,)
    assert torch.isfinite(img).all()


@pytest.mark.parametrize("res", [8, 16, 32])
def test_generator_fade_ends_equal_old_and_new_paths(nets, res):
    G, _ = nets
    z = torch.randn(4, CFG.latent_size)
    old = ops.fade_in(G(z, res // 2), torch.zeros(4, 3, res, res), 0.0)  # up2x of the previous resolution
    assert torch.equal(G(z, res, 0.0), old)
    assert torch.equal(G(z, res, 1.0), G(z, res))
    mid = G(z, res, 0.5)
    assert not torch.equal(mid, old) and not torch.equal(mid, G(z, res))


@pytest.mark.parametrize("res", [8, 16, 32])
def test_discriminator_fade_ends_equal_old_and_new_paths(nets, res):
    _, D = nets
    img = torch.randn(4, 3, res, res)
    assert torch.equal(D(img, res, 0.0), D(ops.downsample2x(img), res // 2))
    assert torch.equal(D(img, res, 1.0), D(img, res))


def test_fade_accepts_a_tensor_alpha(nets):
    G, D = nets
    z = torch.randn(2, CFG.latent_size)
    torch.testing.assert_close(G(z, 16, torch.tensor(0.3)), G(z, 16, 0.3))
    img = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(D(img, 16, torch.tensor(0.3)), D(img, 16, 0.3))


def test_equalized_lr_effective_weight_std():
    torch.manual_seed(0)
    layer = EqualizedConv2d(256, 128, 3)
    fan_in = 256 * 9
    std = (layer.weight * layer.scale).std().item()
    assert abs(std / (math.sqrt(2) / math.sqrt(fan_in)) - 1) < 0.02
    assert layer.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert torch.count_nonzero(layer.bias) == 0


def test_gains_follow_the_official_code():
    G, D = Generator(CFG), Discriminator(CFG)
    assert G.input.scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(CFG.latent_size))
    assert G.to_rgb["8"].scale == pytest.approx(1 / math.sqrt(CFG.channels(8)))
    assert not G.to_rgb["8"].activation
    assert D.output.out.scale == pytest.approx(1 / math.sqrt(CFG.nf(0)))
    assert D.output.conv.weight.shape[1] == CFG.channels(4) + 1  # the stddev channel


def test_generator_features_are_pixel_normalized():
    torch.manual_seed(2)
    G = Generator(CFG)
    x4 = G.input(torch.randn(5, CFG.latent_size))
    assert x4.shape == (5, CFG.channels(4), 4, 4)
    for x in (x4, G.conv4(x4), G.blocks["8"](G.conv4(x4))):  # each pixel's C features, as the official code
        rms = x.square().mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


def test_input_layer_bias_is_per_channel():
    G = Generator(CFG)
    with torch.no_grad():
        G.input.bias.copy_(torch.arange(CFG.channels(4), dtype=torch.float32))
    assert G.input.bias.shape == (CFG.channels(4),)
    # A zero latent gives zero dense output, so the map is lrelu(bias) per channel, then pixel norm.
    x = G.input(torch.zeros(1, CFG.latent_size) + 1e-20)
    assert torch.allclose(x[0, :, 0, 0], x[0, :, 3, 2])
    assert x[0, 0].abs().max() < 1e-3 and x[0, 5].min() > 0


def test_a_larger_network_loads_a_smaller_ones_weights():
    torch.manual_seed(3)
    small = Generator(NetworkConfig(max_res=16, latent_size=24, fmap_base=128, fmap_max=16))
    big = Generator(CFG)
    missing = load_grown_state_dict(big, small.state_dict())
    assert missing and all(k.startswith(("blocks.32", "to_rgb.32")) for k in missing)
    z = torch.randn(2, CFG.latent_size)
    assert torch.equal(big(z, 16), small(z, 16))
    with pytest.raises(ValueError, match="unexpected"):
        load_grown_state_dict(small, big.state_dict())
