"""The project's ``reference`` training step against a plain eager ProGAN loop, side by side.

    python benchmarks/step_overhead.py --threads 1 --res 4,8 --max-res 256      # about 2 minutes on one core
    python benchmarks/step_overhead.py --threads 1 --res 16 --max-res 256 --repeats 3 --steps 1 --warmup 1
    python benchmarks/step_overhead.py --widths tiny --steps 20                 # the per-step host work alone

The plain loop is written from the paper with nothing but ``torch``: equalized learning rate
(weights drawn N(0, 1), scaled by ``gain / sqrt(fan_in)`` at run time), pixel norm, minibatch
stddev, WGAN-GP with lambda 10 and drift 0.001, Adam (lr 0.001, betas (0, 0.99), eps 1e-8, torch's
default implementation), D frozen during the G step. Its networks hold only the layers of the
resolution being trained (plus the previous toRGB/fromRGB during a fade), the way a growing network
exists in the paper. ``plain`` has no EMA (issue 17's loop); ``plain+ema`` adds an EMA of G
(``torch._foreach_lerp_``, beta 0.999) over those layers. ``project`` is
:class:`progan_fast.step.Iteration` with the ``reference`` backend: networks built for
``--max-res`` (the layers above the trained resolution exist but are not run), fused Adam with the
non-finite guard, the EMA and the on-device loss bookkeeping, as the trainer runs it.

Before timing, each resolution checks that the two compute the same thing: the plain networks are
loaded with the project's weights, and D's and G's losses on the same reals, latents and penalty
mixing factors must agree to float32 rounding (``--check-only`` stops there).

Every variant starts from the same weights, trains a fade phase at alpha 0.5 (a stabilize phase at
4 px) on random uint8 images, warms up, then the variants take turns (A, B, C, A, B, C, ...)
``--repeats`` times, each turn timing ``--steps`` steps. The table gives the median ms/step of
each variant and its ratio to ``plain``'s (above 1: slower than the plain loop). On a shared
machine, pass ``--threads 1``: with more intra-op threads than free cores, OpenMP's waits make
every step several times slower (5.8 s instead of 0.9 s at 4 px, seen here) and the figures
meaningless.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
LAMBDA, DRIFT = 10.0, 0.001
BETAS, LR, EPS, EMA_BETA = (0.0, 0.99), 1e-3, 1e-8, 0.999


# ----- the plain networks (parameter names and shapes as the project's, so weights load across) -----

def _pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class Layer(nn.Module):
    """Equalized-LR conv (``k`` x ``k``) or, with ``dense``, a fully connected layer."""

    def __init__(self, cin: int, cout: int, k: int, gain: float = SQRT2, dense: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale, self.dense = gain / math.sqrt(cin * k * k), dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.scale
        if self.dense:
            return F.linear(x, w.flatten(1), self.bias)
        return F.conv2d(x, w, self.bias, padding=w.shape[-1] // 2)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class Input(nn.Module):
    def __init__(self, latent: int, c: int) -> None:
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.randn(c * 16, latent, 1, 1))
        self.bias = nn.Parameter(torch.zeros(c))
        self.scale = (SQRT2 / 4) / math.sqrt(latent)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.linear(_pixel_norm(z), self.weight.flatten(1) * self.scale)
        x = x.reshape(z.shape[0], self.c, 4, 4) + self.bias.reshape(1, -1, 1, 1)
        return _pixel_norm(F.leaky_relu(x, 0.2))


class PlainG(nn.Module):
    def __init__(self, nf, res: int, latent: int = 512) -> None:
        super().__init__()
        self.res = res
        self.input = Input(latent, nf(4))
        self.conv4 = Layer(nf(4), nf(4), 3)
        self.blocks = nn.ModuleDict({str(r): nn.Sequential(Layer(nf(r // 2), nf(r), 3), Layer(nf(r), nf(r), 3))
                                     for r in _above4(res)})
        self.to_rgb = nn.ModuleDict({str(r): Layer(nf(r), 3, 1, gain=1.0) for r in {res // 2, res} if r >= 4})

    def forward(self, z: torch.Tensor, alpha: float | None) -> torch.Tensor:
        x = _pixel_norm(F.leaky_relu(self.conv4(self.input(z)), 0.2))
        prev = x
        for r, block in self.blocks.items():
            prev = x
            x = _up(x)
            for layer in block:
                x = _pixel_norm(F.leaky_relu(layer(x), 0.2))
        rgb = self.to_rgb[str(self.res)](x)
        if alpha is not None and self.res > 4:
            rgb = torch.lerp(_up(self.to_rgb[str(self.res // 2)](prev)), rgb, alpha)
        return rgb


class Output(nn.Module):
    def __init__(self, c: int, nf0: int) -> None:
        super().__init__()
        self.conv = Layer(c + 1, c, 3)
        self.dense = Layer(c * 16, nf0, 1, dense=True)
        self.out = Layer(nf0, 1, 1, gain=1.0, dense=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(4, n)
        while n % g:
            g -= 1
        y = x.reshape(g, n // g, c, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        y = y.reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, h, w).reshape(n, 1, h, w)
        x = F.leaky_relu(self.conv(torch.cat([x, y], dim=1)), 0.2)
        x = F.leaky_relu(self.dense(x.flatten(1)), 0.2)
        return self.out(x).reshape(n)


class PlainD(nn.Module):
    def __init__(self, nf, res: int, nf0: int) -> None:
        super().__init__()
        self.res = res
        self.from_rgb = nn.ModuleDict({str(r): Layer(3, nf(r), 1) for r in {res // 2, res} if r >= 4})
        self.blocks = nn.ModuleDict({str(r): nn.Sequential(Layer(nf(r), nf(r), 3), Layer(nf(r), nf(r // 2), 3))
                                     for r in reversed(_above4(res))})
        self.output = Output(nf(4), nf0)

    def forward(self, img: torch.Tensor, alpha: float | None) -> torch.Tensor:
        x = F.leaky_relu(self.from_rgb[str(self.res)](img), 0.2)
        for i, (r, block) in enumerate(self.blocks.items()):
            for layer in block:
                x = F.leaky_relu(layer(x), 0.2)
            x = F.avg_pool2d(x, 2)
            if i == 0 and alpha is not None:
                old = F.leaky_relu(self.from_rgb[str(self.res // 2)](F.avg_pool2d(img, 2)), 0.2)
                x = torch.lerp(old, x, alpha)
        return self.output(x)


def _above4(res: int) -> list[int]:
    return [2**k for k in range(3, int(math.log2(res)) + 1)]


def reals_of(images: torch.Tensor, alpha: float | None) -> torch.Tensor:
    x = images.float() / 127.5 - 1.0
    return x if alpha is None else torch.lerp(_up(F.avg_pool2d(x, 2)), x, alpha)


def plain_losses(G, D, reals, z_d, mix, z_g, alpha):
    """D's WGAN-GP loss and G's loss, as the paper defines them (returned without stepping)."""
    with torch.no_grad():
        fakes = G(z_d, alpha)
    real_out, fake_out = D(reals, alpha), D(fakes, alpha)
    mixed = torch.lerp(reals, fakes, mix).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(mixed, alpha).sum(), mixed, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1.0).square().mean() * LAMBDA
    d_loss = fake_out.mean() - real_out.mean() + penalty + DRIFT * real_out.square().mean()
    g_loss = -D(G(z_g, alpha), alpha).mean()
    return d_loss, g_loss


class PlainLoop:
    """The plain eager loop: D step with the penalty, G step, Adam; optionally an EMA of G."""

    def __init__(self, G, D, images, batch: int, alpha: float | None, ema: bool) -> None:
        self.G, self.D, self.images, self.batch, self.alpha = G, D, images, batch, alpha
        self.latent = G.input.weight.shape[1]
        self.opt_G = torch.optim.Adam(G.parameters(), lr=LR, betas=BETAS, eps=EPS)
        self.opt_D = torch.optim.Adam(D.parameters(), lr=LR, betas=BETAS, eps=EPS)
        self.ema = [p.detach().clone() for p in G.parameters()] if ema else None

    def __call__(self) -> None:
        G, D, alpha, n = self.G, self.D, self.alpha, self.batch
        reals = reals_of(self.images[torch.randint(self.images.shape[0], (n,))], alpha)
        z = torch.randn(n, self.latent)
        with torch.no_grad():
            fakes = G(z, alpha)
        real_out, fake_out = D(reals, alpha), D(fakes, alpha)
        mixed = torch.lerp(reals, fakes, torch.rand(n, 1, 1, 1)).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(mixed, alpha).sum(), mixed, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1.0).square().mean() * LAMBDA
        d_loss = fake_out.mean() - real_out.mean() + penalty + DRIFT * real_out.square().mean()
        self.opt_D.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_D.step()

        D.requires_grad_(False)
        g_loss = -D(G(torch.randn(n, self.latent), alpha), alpha).mean()
        self.opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_G.step()
        D.requires_grad_(True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in G.parameters()], 1.0 - EMA_BETA)


# ----- the project -------------------------------------------------------------------------------

#: Network widths: the paper's, and the tests' tiny ones (whose step is almost all host work: what
#: a GPU run without CUDA graphs pays on top of its kernels).
WIDTHS = {"paper": dict(fmap_base=8192, fmap_max=512, latent_size=512),
          "tiny": dict(fmap_base=64, fmap_max=16, latent_size=16)}


def project_state(max_res: int, widths: str = "paper", seed: int = 0):
    from progan_fast.gan_state import GANState
    from progan_fast.networks import NetworkConfig

    torch.manual_seed(seed)
    config = NetworkConfig(max_res=max_res, **WIDTHS[widths])
    return GANState.create(config, torch.device("cpu"), loss="wgan-gp")


def plain_nets(state, res: int):
    """Plain G and D for ``res`` holding the project's weights for the layers they have."""
    config = state.config
    G, D = PlainG(config.channels, res, config.latent_size), PlainD(config.channels, res, config.nf(0))
    for plain, project in ((G, state.G), (D, state.D)):
        theirs = project.state_dict()
        plain.load_state_dict({k: theirs[k].clone() for k in plain.state_dict()})
    return G, D


def check(state, res: int, batch: int, alpha: float | None) -> tuple[float, float]:
    """Largest relative difference between the plain and the project's D and G losses on the same inputs."""
    from progan_fast import losses

    G, D = plain_nets(state, res)
    torch.manual_seed(1)
    reals = reals_of(torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8), alpha)
    latent = state.config.latent_size
    z_d, mix, z_g = torch.randn(batch, latent), torch.rand(batch, 1, 1, 1), torch.randn(batch, latent)
    d_plain, g_plain = plain_losses(G, D, reals, z_d, mix, z_g, alpha)
    critic = lambda x: state.D(x, res, alpha)  # noqa: E731
    with torch.no_grad():
        fakes = state.G(z_d, res, alpha)
    d_project, _ = losses.discriminator_loss("wgan-gp", critic, reals, fakes, mix=mix)
    g_project = losses.generator_loss("wgan-gp", critic(state.G(z_g, res, alpha)))
    rel = lambda a, b: abs(a.item() - b.item()) / max(abs(b.item()), 1e-6)  # noqa: E731
    return rel(d_plain, d_project), rel(g_plain, g_project)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--res", default="4,8,16", help="comma-separated resolutions")
    p.add_argument("--max-res", type=int, default=None,
                   help="the project's networks are built for this (default: the largest --res)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--widths", choices=sorted(WIDTHS), default="paper",
                   help="paper (fmap_base 8192, fmap_max 512, latent 512) or tiny (64, 16, 16: host work only)")
    p.add_argument("--steps", type=int, default=2, help="steps per turn")
    p.add_argument("--repeats", type=int, default=5, help="turns per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-ema-variant", action="store_true", help="time only project and plain")
    p.add_argument("--check-only", action="store_true", help="only check that both compute the same losses")
    args = p.parse_args(argv)
    resolutions = sorted({int(r) for r in args.res.split(",")})
    max_res = args.max_res or max(resolutions)
    if args.threads:
        torch.set_num_threads(args.threads)

    from progan_fast import ops
    from progan_fast.step import Iteration

    previous = ops.get_default_backend()
    ops.set_default_backend("reference", "cpu")
    try:
        return _compare(args, resolutions, max_res, Iteration)
    finally:
        ops.set_default_backend(previous, "cpu")


def _compare(args, resolutions: list[int], max_res: int, Iteration) -> int:
    import progan_fast

    print(f"# {progan_fast.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.widths} widths, "
          f"batch {args.batch}, wgan-gp, alpha 0.5 (4 px: stabilize); project networks for max_res {max_res}; "
          f"{args.repeats} turns x {args.steps} steps, medians", flush=True)
    if not args.check_only:
        print(f"{'res':>4} {'variant':<10} {'ms/step':>9} {'vs plain':>9}  turns (ms/step)")
    failed = False
    for res in resolutions:
        alpha = 0.5 if res > 4 else None
        state = project_state(max_res, args.widths)
        d_rel, g_rel = check(state, res, args.batch, alpha)
        if max(d_rel, g_rel) > 1e-4:
            print(f"{res:>4} the plain loop and the project disagree: D loss rel. diff {d_rel:.2e}, G {g_rel:.2e}")
            failed = True
            continue
        if args.check_only:
            print(f"{res:>4} same losses (D rel. diff {d_rel:.1e}, G {g_rel:.1e})")
            continue
        images = torch.randint(0, 256, (64, 3, res, res), dtype=torch.uint8)
        iteration = Iteration(state, res, args.batch, res > 4, torch.device("cpu"), images)
        iteration.set_alpha(0.5)
        runs = {"project": iteration}
        G, D = plain_nets(state, res)
        runs["plain"] = PlainLoop(G, D, images, args.batch, alpha, ema=False)
        if not args.no_ema_variant:
            G, D = plain_nets(state, res)
            runs["plain+ema"] = PlainLoop(G, D, images, args.batch, alpha, ema=True)
        for run in runs.values():
            for _ in range(args.warmup):
                run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    run()
                times[name].append(1000 * (time.perf_counter() - start) / args.steps)
        plain = statistics.median(times["plain"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            print(f"{res:>4} {name:<10} {ms:9.1f} {ms / plain:8.2f}x  {' '.join(f'{t:.0f}' for t in ts)}", flush=True)
        if iteration.read_window().non_finite_steps:
            print(f"{res:>4} the project's steps had non-finite losses")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
