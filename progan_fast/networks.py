"""ProGAN generator and discriminator (Karras et al. 2017, table 2 and the official code).

Both networks are built once for ``max_res`` and run at any resolution ``res <= max_res``;
layers above ``res`` simply are not used yet. Parameters are keyed by resolution
(``blocks.16.conv0.weight``), so a network built for a larger ``max_res`` loads a smaller one's
state dict and grows a finished run further (:meth:`load_grown_state_dict`).

Details the paper leaves open follow the official implementation (tkarras/progressive_growing_of_gans):

- feature maps at resolution ``2**r`` are ``nf(r - 1)`` with ``nf(s) = min(fmap_base / 2**s, fmap_max)``;
- G's first layer is a dense layer from the (pixel-normalized) latent to ``4x4xC`` with gain
  ``sqrt(2)/4`` and one bias per channel, then leaky-ReLU and pixel norm;
- every conv uses gain ``sqrt(2)``, toRGB gain 1 and no activation (the image is linear, no tanh);
- D's last block: minibatch stddev, conv3x3 to ``nf(1)``, dense ``4x4 -> nf(0)``, dense to one
  logit with gain 1 and no activation;
- D's blocks are conv3x3 ``nf(r-1)``, conv3x3 ``nf(r-2)``, then 2x average pool;
- class-conditional (``num_classes > 0``, the official ``label_size``): G's input is the latent
  concatenated with the one-hot label, pixel-normalized together as the official ``combo_in``; D's
  last dense layer has ``1 + num_classes`` outputs, the score and the class logits (AC-GAN).

Memory format (:meth:`Generator.use_channels_last`, :meth:`Discriminator.use_channels_last`, the
``--channels-last`` flag): the networks can run their activations in NHWC (``torch.channels_last``).
Every op keeps its input's layout, so the networks convert only where activations enter: G's 4x4
map after its dense input layer, D's input images. The parameters keep their usual layout (ATen's
conv and our kernels take any weight strides), so checkpoints and the EMA do not depend on it. The
two dense layers that flatten or unflatten a 4x4 map (G's input, D's ``4x4 -> nf(0)``) order
their features channel-major as the official code does; in NHWC D's flatten is therefore a copy of
that small ``[N, C, 4, 4]`` map (as is G's conversion), cheaper than reordering the dense weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops.common import Alpha

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of both networks. ``max_res`` may grow on resume; the rest may not."""

    max_res: int = 32
    latent_size: int = 512
    fmap_base: int = 8192
    fmap_max: int = 512
    mbstd_group_size: int = 4
    num_classes: int = 0  # 0: unconditional
    image_channels: int = 3  # of the images G makes (toRGB's outputs) and D reads (fromRGB's inputs): 3 or 1

    def __post_init__(self) -> None:
        if self.max_res < 4 or self.max_res & (self.max_res - 1):
            raise ValueError(f"max_res must be a power of two >= 4, got {self.max_res}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.image_channels < 1:
            raise ValueError(f"image_channels must be >= 1, got {self.image_channels}")

    def nf(self, stage: int) -> int:
        return max(1, min(int(self.fmap_base / 2.0**stage), self.fmap_max))

    def channels(self, res: int) -> int:
        """Feature maps of the layers working at resolution ``res``."""
        return self.nf(int(math.log2(res)) - 1)

    def resolutions(self) -> list[int]:
        return [2**r for r in range(2, int(math.log2(self.max_res)) + 1)]

    def to_dict(self) -> dict:
        return asdict(self)


class EqualizedConv2d(nn.Module):
    """Conv (or, with ``kernel=1`` on ``[N, C, 1, 1]``, dense) layer with equalized learning rate.

    The weight is drawn N(0, 1) and multiplied at run time by ``gain / sqrt(fan_in)``; the bias
    starts at zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        gain: float = SQRT2,
        activation: bool = True,
        pixel_norm: bool = False,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel * kernel)
        self.activation = activation
        self.pixel_norm = pixel_norm
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d_bias_lrelu(
            x, self.weight, self.bias, self.scale,
            activation=self.activation, upsample=self.upsample, pixel_norm=self.pixel_norm,
        )

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}->{o}, kernel={k}, scale={self.scale:.4g}, act={self.activation}, pn={self.pixel_norm}, up={self.upsample}"


class GeneratorInput(nn.Module):
    """Latent -> pixel norm -> dense to 4x4xC (gain sqrt(2)/4, one bias per channel) -> lReLU -> pixel norm."""

    def __init__(self, latent_size: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.randn(channels * 16, latent_size, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.scale = (SQRT2 / 4) / math.sqrt(latent_size)

    def forward(self, z: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """The 4x4 map, in ``memory_format``."""
        n = z.shape[0]
        x = ops.pixel_norm(z.reshape(n, -1, 1, 1))
        # Output feature k of the dense layer is channel k // 16 of the 4x4 map, so repeating each
        # channel's bias 16 times is exactly the official "dense, reshape, add per-channel bias".
        x = ops.conv2d_bias_lrelu(x, self.weight, self.bias.repeat_interleave(16), self.scale, activation=True)
        x = x.reshape(n, self.channels, 4, 4)
        if memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=memory_format)
        # Pixel norm after the reshape: over the C channels of each of the 16 pixels, not over all 16C.
        return ops.pixel_norm(x)


class Generator(nn.Module):
    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.memory_format = torch.contiguous_format  # of the activations: use_channels_last
        c4 = config.channels(4)
        self.input = GeneratorInput(config.latent_size + config.num_classes, c4)
        self.conv4 = EqualizedConv2d(c4, c4, 3, pixel_norm=True)
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict({"4": EqualizedConv2d(c4, config.image_channels, 1, gain=1.0, activation=False)})
        for res in config.resolutions()[1:]:
            self._add_resolution(res)

    def _add_resolution(self, res: int) -> None:
        cin, cout = self.config.channels(res // 2), self.config.channels(res)
        self.blocks[str(res)] = nn.Sequential(
            EqualizedConv2d(cin, cout, 3, pixel_norm=True, upsample=True),
            EqualizedConv2d(cout, cout, 3, pixel_norm=True),
        )
        self.to_rgb[str(res)] = EqualizedConv2d(cout, self.config.image_channels, 1, gain=1.0, activation=False)

    def forward(self, z: torch.Tensor, res: int, alpha: Alpha | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[N, C, res, res]`` (C = ``config.image_channels``) from latents ``[N, latent_size]`` (and, conditional, class
        ``labels`` ``[N]``).

        ``alpha`` is None in a stabilize phase (new path only) and the fade weight in a fade phase.
        """
        x = self.conv4(self.input(with_labels(z, labels, self.config.num_classes), self.memory_format))
        prev = x
        r = 8
        while r <= res:
            prev = x
            x = self.blocks[str(r)](x)
            r *= 2
        rgb = self.to_rgb[str(res)](x)
        if alpha is not None and res > 4:
            rgb = ops.fade_in(self.to_rgb[str(res // 2)](prev), rgb, alpha)
        return rgb

    def use_channels_last(self, channels_last: bool = True) -> Generator:
        """Run the activations in NHWC (or, with False, NCHW again); the images come out in it."""
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return self

    def parameters_used(self, res: int, fading: bool) -> set[str]:
        """Names of the parameters :meth:`forward` uses at ``res`` (with ``alpha`` if ``fading``)."""
        layers = ["input", "conv4", f"to_rgb.{res}"] + [f"blocks.{r}" for r in _grown(res)]
        if fading and res > 4:
            layers.append(f"to_rgb.{res // 2}")
        return _parameters_of(self, layers)

    def parameters_grown(self, res: int) -> set[str]:
        """Names of the parameters of every layer at resolutions up to ``res``: the network a run
        has grown by the time it trains at ``res`` (a superset of :meth:`parameters_used` at ``res``
        and every resolution below). The layers above ``res`` have not been trained yet."""
        layers = ["input", "conv4", "to_rgb.4"] + [f"{kind}.{r}" for r in _grown(res) for kind in ("blocks", "to_rgb")]
        return _parameters_of(self, layers)


def with_labels(z: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """G's input: the latents, with the one-hot labels appended when conditional."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError("this generator is unconditional: it takes no labels")
        return z
    if labels is None:
        raise ValueError(f"this generator is conditional ({num_classes} classes): give a class label per latent")
    return torch.cat([z, F.one_hot(labels, num_classes).to(z.dtype)], dim=1)


class DiscriminatorOutput(nn.Module):
    """Minibatch stddev -> conv3x3 -> dense 4x4 -> nf(0) -> dense -> 1 logit (+ num_classes class logits)."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        c4 = config.channels(4)
        self.group_size = config.mbstd_group_size
        self.conv = EqualizedConv2d(c4 + 1, c4, 3)
        self.dense = EqualizedConv2d(c4 * 16, config.nf(0), 1)
        self.num_classes = config.num_classes
        self.out = EqualizedConv2d(config.nf(0), 1 + config.num_classes, 1, gain=1.0, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv(ops.minibatch_stddev(x, self.group_size))
        x = self.dense(x.reshape(n, -1, 1, 1))
        x = self.out(x)
        return x.reshape(n) if self.num_classes == 0 else x.reshape(n, 1 + self.num_classes)


class Discriminator(nn.Module):
    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.memory_format = torch.contiguous_format  # of the activations: use_channels_last
        self.from_rgb = nn.ModuleDict({"4": EqualizedConv2d(config.image_channels, config.channels(4), 1)})
        self.blocks = nn.ModuleDict()
        for res in config.resolutions()[1:]:
            self._add_resolution(res)
        self.output = DiscriminatorOutput(config)

    def _add_resolution(self, res: int) -> None:
        c, c_next = self.config.channels(res), self.config.channels(res // 2)
        self.from_rgb[str(res)] = EqualizedConv2d(self.config.image_channels, c, 1)
        self.blocks[str(res)] = nn.Sequential(EqualizedConv2d(c, c, 3), EqualizedConv2d(c, c_next, 3))

    def _block(self, res: int, x: torch.Tensor) -> torch.Tensor:
        return ops.downsample2x(self.blocks[str(res)](x))

    def forward(self, img: torch.Tensor, res: int, alpha: Alpha | None = None) -> torch.Tensor:
        """Logits ``[N]`` for images ``[N, C, res, res]`` (conditional: ``[N, 1 + num_classes]``, the
        score then the class logits); ``alpha`` as in :meth:`Generator.forward`."""
        if self.memory_format != torch.contiguous_format:
            img = img.contiguous(memory_format=self.memory_format)  # a no-op for G's channels-last fakes
        x = self.from_rgb[str(res)](img)
        if res > 4:
            x = self._block(res, x)
            if alpha is not None:
                old = self.from_rgb[str(res // 2)](ops.downsample2x(img))
                x = ops.blend(old, x, alpha)
            r = res // 2
            while r > 4:
                x = self._block(r, x)
                r //= 2
        return self.output(x)

    def use_channels_last(self, channels_last: bool = True) -> Discriminator:
        """Run the activations in NHWC (or, with False, NCHW again): the images are converted on entry."""
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return self

    def parameters_used(self, res: int, fading: bool) -> set[str]:
        """Names of the parameters :meth:`forward` uses at ``res`` (with ``alpha`` if ``fading``)."""
        layers = ["output", f"from_rgb.{res}"] + [f"blocks.{r}" for r in _grown(res)]
        if fading and res > 4:
            layers.append(f"from_rgb.{res // 2}")
        return _parameters_of(self, layers)


def _grown(res: int) -> list[int]:
    """The resolutions above 4 up to ``res``: the blocks a network at ``res`` runs."""
    return [1 << k for k in range(3, res.bit_length()) if 1 << k <= res]


def _parameters_of(module: nn.Module, layers: list[str]) -> set[str]:
    return {name for name, _ in module.named_parameters() if any(name.startswith(layer + ".") for layer in layers)}


def load_grown_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` (from a network built for a smaller ``max_res``) into ``module``.

    Every key of ``state`` must exist with the same shape; keys missing from ``state`` must all
    belong to resolutions above the old ``max_res`` (the new layers keep their fresh init).
    Returns the missing keys.
    """
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected parameters: {', '.join(result.unexpected_keys[:5])}")
    return list(result.missing_keys)
