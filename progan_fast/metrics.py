"""Command line: ``python -m progan_fast.metrics RUN_DIR`` scores a run.

It scores the newest checkpoint of a run (its EMA generator, at the resolution and fade the
checkpoint was training) against the run's data at that resolution: SWD always
(:mod:`progan_fast.swd`), FID and KID with ``--fid`` (:mod:`progan_fast.fid`). It prints the
figures and appends them to ``RUN_DIR/metrics.jsonl``. Every bad input is one ``error:`` line and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import fid, swd
from .checkpoint import CheckpointError
from .cli import UsageError, resolve_device
from .data import DataError
from .inference import load_generator, load_run_data

PROG = "progan_fast.metrics"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Score a run: SWD (the ProGAN paper's sliced Wasserstein distance on Laplacian-pyramid patches, x1e3 per "
            "level and the average) between the EMA generator and the run's data, at the resolution and fade of the "
            "checkpoint; optionally FID and KID. Prints the figures and appends them to RUN_DIR/metrics.jsonl."
        ),
        epilog=f"FID/KID need the Inception weights: {fid.FID_INSTALL}. Nothing is downloaded at run time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR_OR_CKPT", type=Path,
                   help="a run folder (its newest checkpoint is scored) or one checkpoint file")
    p.add_argument("--n", type=int, default=swd.DEFAULT_SWD_IMAGES,
                   help="images per side for SWD (official ProGAN: 8192, 16384 for final figures)")
    p.add_argument("--seed", type=int, default=0, help="seed for latents, the choice of reals, patches and directions")
    p.add_argument("--fid", action="store_true", help="also compute FID and KID (slow on a CPU: about 0.3 s an image)")
    p.add_argument("--fid-n", type=int, default=1000, help="images per side for FID/KID (the usual figure is 50000)")
    p.add_argument("--per-class", action="store_true",
                   help="class-conditional runs: also SWD per class (that class's reals against fakes of that class)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA when PyTorch sees a GPU")
    p.add_argument("--no-save", action="store_true", help="only print; do not append to RUN_DIR/metrics.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.n < 2 or args.fid_n < 2:
            raise UsageError("--n and --fid-n must be at least 2")
        device = resolve_device(args.device)
        if args.fid:
            fid.inception_weights_path()  # fail before the slow part
        started = time.perf_counter()
        loaded = load_generator(args.run, device)
        if args.per_class and not loaded.class_names:
            raise UsageError(f"--per-class: {loaded.path} is not from a class-conditional run (--cond)")
        dataset = load_run_data(loaded)
        reals_all = dataset.at(loaded.res)
        # Conditional: the fakes' classes follow the data's (seeded draws from its labels).
        fake_labels = swd.draw_labels(dataset.labels, args.n, args.seed) if loaded.class_names else None
        print(f"{PROG}: {loaded.describe()}; data: {dataset.summary}", file=sys.stderr)
        record: dict = {"checkpoint": str(loaded.path), "kimg": round(loaded.images / 1000, 3), "res": loaded.res,
                        "alpha": 1.0 if loaded.alpha is None else round(loaded.alpha, 4), "n": args.n, "seed": args.seed}
        record.update(swd.swd_for_generator(loaded.G, reals_all, loaded.res, loaded.alpha, n=args.n, seed=args.seed,
                                            fake_labels=fake_labels))
        if args.per_class:
            for k, name in enumerate(loaded.class_names):
                mine = reals_all[dataset.labels == k]
                if len(mine) < 2:
                    continue  # a class with fewer than two images has no distribution to compare
                figures = swd.swd_for_generator(loaded.G, mine, loaded.res, loaded.alpha, n=args.n, seed=args.seed,
                                                fake_labels=torch.full((args.n,), k))
                record[f"SWDx1e3_avg[{name}]"] = figures["SWDx1e3_avg"]
        if args.fid:
            fakes = swd.generate_uint8(loaded.G, args.fid_n, loaded.res, loaded.alpha, seed=args.seed + 20,
                                       labels=None if fake_labels is None else
                                       swd.draw_labels(dataset.labels, args.fid_n, args.seed + 1))
            reals = swd.pick_reals(reals_all, args.fid_n, args.seed + 21)
            record.update(fid.fid_kid(reals, fakes, device))
            record["fid_n"] = args.fid_n
        record["seconds"] = round(time.perf_counter() - started, 1)
    except (UsageError, CheckpointError, DataError, fid.FIDUnavailable) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for k, v in record.items():
        print(f"{k:14s} {v:.4f}" if isinstance(v, float) and k.startswith(("SWD", "FID", "KID")) else f"{k:14s} {v}")
    if not args.no_save and loaded.run_dir is not None:
        try:
            with open(loaded.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
