"""Command line: ``python -m progan_fast.generate CKPT --n 64 --out grid.png``.

Samples a run's EMA generator (latents are N(0, 1) draws from a generator seeded by ``--seed``,
so the same command gives the same picture) at the resolution and fade the checkpoint was
training. ``--truncation T`` draws them from the normal truncated at ``T`` instead (BigGAN's
truncation trick; see :func:`truncated_normal`). ``--interpolate STEPS`` writes a latent interpolation strip instead:
``--n`` rows, each going in STEPS images from one random latent to another along the great
circle (spherical interpolation, since G pixel-normalises its latent onto a sphere anyway).
A class-conditional run's generator takes ``--class K`` (a class number or name: every image of
that class) or ``--class all`` (the default for such runs: one row per class, ``--n`` images per
row, and with ``--interpolate`` row r shows class r mod C).
Every bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .images import save_grid
from .inference import load_generator
from .cli import UsageError, resolve_device

PROG = "progan_fast.generate"


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of ``a`` and ``b`` ([N, D]) at fractions ``t`` ([T]) -> [N, T, D].
    The norm is interpolated linearly, so the endpoints are exactly ``a`` and ``b``."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(dim=1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # [N, 1]
    t = t.view(1, -1, 1)
    so = torch.sin(omega).unsqueeze(1)
    direction = (torch.sin((1 - t) * omega.unsqueeze(1)) * ua.unsqueeze(1)
                 + torch.sin(t * omega.unsqueeze(1)) * ub.unsqueeze(1)) / so
    return direction * ((1 - t) * na.unsqueeze(1) + t * nb.unsqueeze(1))


@torch.no_grad()
def truncated_normal(shape: tuple[int, ...], generator: torch.Generator,
                     truncation: float | None = None) -> torch.Tensor:
    """N(0, 1) draws of ``shape``; with ``truncation`` T, from the normal truncated to [-T, T]
    (BigGAN's truncation trick: a value beyond T is redrawn).

    A value beyond T is redrawn directly from the truncated distribution by inverting its CDF (in
    float64), which is what redrawing it until it lands inside gives, without a loop whose length
    grows as 1/T. The plain draw comes first from the same generator, so values already inside T
    are kept: a T no value exceeds gives exactly the untruncated latents, and the seed fixes
    the result either way.
    """
    z = torch.randn(shape, generator=generator)
    if truncation is None:
        return z
    beyond = z.abs() > truncation
    count = int(beyond.sum())
    if count:
        t = torch.tensor(float(truncation), dtype=torch.float64)
        low = torch.special.ndtr(-t)  # P(x < -T)
        u = low + torch.rand(count, generator=generator, dtype=torch.float64) * (1 - 2 * low)
        z[beyond] = torch.special.ndtri(u).clamp(-t, t).to(z.dtype)
    return z


@torch.no_grad()
def sample_grid_latents(n: int, latent_size: int, seed: int, truncation: float | None = None) -> torch.Tensor:
    return truncated_normal((n, latent_size), torch.Generator().manual_seed(seed), truncation)


@torch.no_grad()
def interpolation_latents(rows: int, steps: int, latent_size: int, seed: int,
                          truncation: float | None = None) -> torch.Tensor:
    """``[rows * steps, latent]``: row ``i`` goes from latent ``2i`` to ``2i + 1`` of the seeded
    draw (the endpoints truncated at ``truncation``, if given)."""
    ends = truncated_normal((rows, 2, latent_size), torch.Generator().manual_seed(seed), truncation)
    return slerp(ends[:, 0], ends[:, 1], torch.linspace(0, 1, steps)).reshape(rows * steps, latent_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Sample a run's EMA generator into a PNG grid (or a latent interpolation strip), "
                    "at the resolution and fade of the checkpoint. Seeded: the same command gives the same picture.",
        epilog="Examples: '%(prog)s runs/demo --n 64 --out grid.png' | "
               "'%(prog)s runs/demo/checkpoints/ckpt-000000112000.pt --interpolate 10 --n 4 --out strip.png'",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR", type=Path,
                   help="a checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("--n", type=int, default=None,
                   help="images in the grid (default 64); with --interpolate, rows of the strip (default 4)")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents")
    p.add_argument("--interpolate", metavar="STEPS", type=int, default=None,
                   help="write an interpolation strip: each row goes from one random latent to another in STEPS images")
    p.add_argument("--truncation", metavar="T", type=float, default=None,
                   help="draw the latents from the normal truncated at T (a value beyond T is redrawn: BigGAN's "
                        "truncation trick); also --interpolate's endpoints. A T no value exceeds gives the plain "
                        "draw. Note: G pixel-normalizes its latent, so an unconditional run sees only the latent's "
                        "direction; its images approach the zero latent's image only for tiny T (far below pixel "
                        "norm's epsilon, e.g. 1e-10), while a conditional run's label weighs more as T shrinks. "
                        "Default: no truncation")
    p.add_argument("--columns", type=int, default=None, help="grid columns (default: square-ish; with --interpolate: STEPS)")
    p.add_argument("--class", dest="klass", metavar="K|all", default=None,
                   help="class-conditional runs: the class to generate (its number or name), or 'all' for one row per "
                        "class with --n images each (the default for such runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA when PyTorch sees a GPU")
    return p


def class_index(klass: str, class_names: list[str]) -> int:
    """The class ``klass`` names (a name, or a number from 0), or UsageError listing the choices."""
    if klass in class_names:
        return class_names.index(klass)
    if klass.isdigit() and int(klass) < len(class_names):
        return int(klass)
    shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
    raise UsageError(f"--class {klass!r} is not a class of this run; its {len(class_names)} classes are "
                     f"0 to {len(class_names) - 1}: {shown}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        n = args.n if args.n is not None else (4 if args.interpolate else 64)
        if n < 1:
            raise UsageError(f"--n must be at least 1, not {n}")
        if args.interpolate is not None and args.interpolate < 2:
            raise UsageError(f"--interpolate needs at least 2 steps, not {args.interpolate}")
        if args.truncation is not None and not args.truncation > 0:
            raise UsageError(f"--truncation must be a positive number, not {args.truncation}")
        if args.out.suffix.lower() != ".png":
            raise UsageError(f"--out {args.out} must end in .png")
        device = resolve_device(args.device)
        loaded = load_generator(args.checkpoint, device)
        latent, classes = loaded.config.latent_size, loaded.class_names
        if args.klass is not None and not classes:
            raise UsageError(f"--class: {loaded.path} is not from a class-conditional run (--cond)")
        per_class = classes and args.klass in (None, "all")
        rows = len(classes) if per_class and not args.interpolate else n
        per_row = args.interpolate or (n if per_class else 1)
        if args.interpolate:
            z = interpolation_latents(rows, args.interpolate, latent, args.seed, args.truncation)
            columns = args.columns or args.interpolate
        else:
            z = sample_grid_latents(rows * per_row if per_class else n, latent, args.seed, args.truncation)
            columns = args.columns or (n if per_class else None)
        labels = None
        if classes:  # row r: class r (mod C), or every image of the one class asked for
            row_class = torch.arange(rows) % len(classes) if per_class else \
                torch.full((rows,), class_index(args.klass, classes))
            labels = row_class.repeat_interleave(per_row)
        ys = [None] * len(z.split(64)) if labels is None else [y.to(device) for y in labels.split(64)]
        with torch.no_grad():
            images = torch.cat([loaded.G(zb.to(device), loaded.res, loaded.alpha, y).cpu()
                                for zb, y in zip(z.split(64), ys)])
        save_grid(images, args.out, columns=columns)
    except (UsageError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.out} ({len(images)} images, {loaded.describe()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
