"""Prepare a dataset once: ``python -m progan_fast.dataset SRC --out FILE --max-res R``.

Decodes every image of SRC (a folder, searched recursively, or a zip archive) exactly as training
does (made square by --fit, center crop by default; Lanczos resize to R; RGB, or gray with
--channels 1; the 2x2-average pyramid down to 4x4), and writes the
pyramid to FILE, with each image's class when asked (``--labels``, for ``--cond``). ``python -m progan_fast.train --data FILE`` then trains from it without decoding
again, memory-mapped, so host memory stays bounded for datasets larger than RAM; any
``--max-res`` up to R works (the lower levels are the pyramid's, as in the official tfrecords). The
file records its ``--fit`` and ``--channels``; training must name the same ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import files, image_folder, pyramid_file
from .data import DataError, check_resolution

PROG = "progan_fast.dataset"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m progan_fast.dataset",
        description="Decode a folder or zip archive of images once into a prepared dataset file for "
                    "`python -m progan_fast.train --data FILE`.",
        epilog="Example: %(prog)s ~/photos --out photos-256.pt --max-res 256")
    p.add_argument("src", metavar="SRC", help="a folder of images (recursive: png, jpg, webp, bmp) or a zip archive")
    p.add_argument("--out", metavar="FILE", type=Path, required=True, help="the prepared dataset to write")
    p.add_argument("--max-res", type=int, required=True,
                   help="resolution of the stored images, a power of two from 4 to 1024; training may use any "
                        "--max-res up to it")
    p.add_argument("--labels", action="store_true",
                   help="store each image's class (for --cond): from SRC's dataset.json "
                        '({"labels": [["relative/path.png", 3], ...]}), or else from the class subfolders of SRC '
                        "(sorted folder names)")
    p.add_argument("--fit", choices=image_folder.FITS, default="crop",
                   help="how non-square images become square: crop keeps the centred square, pad keeps the whole "
                        "image centred on a square of its border's mean colour, stretch resizes it to the square. "
                        "Training from the file must pass the same --fit")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="3 stores RGB; 1 stores one channel (a colour image's luma) for --channels 1 training")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists (otherwise refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out.expanduser()
    try:
        check_resolution(args.max_res)
        if out.exists() and not args.overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        if out.is_dir():
            raise DataError(f"--out {out} is a folder; name the file to write")
        if files.is_temporary(out):
            raise DataError(f"--out {out}: names of the form .NAME.tmp-N are this tool's temporary files; "
                            "choose another name")
        # Before the decoding, which can take hours: the file's folder must exist and take a new file.
        try:
            files.check_writable_folder(out.parent, "--out's folder")
        except files.WriteError as e:
            raise DataError(f"--out's folder {e.path}: {e.reason}; {out.name} cannot be written there") from None
        src = Path(args.src).expanduser()
        load = image_folder.load_image_zip if src.is_file() else image_folder.load_image_folder
        dataset = load(src, args.max_res, cache_dir=None, progress=not args.no_progress, labels=args.labels,
                       fit=args.fit, channels=args.channels)
        # Written to a temporary name and renamed at the end: Ctrl-C or a full disk leaves no file,
        # and SIGKILL at most a temporary one that training refuses (progan_fast.files).
        pyramid_file.prepare(dataset, out)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a WriteError (a full disk, ...), or reading the source failed midway
        print(f"{PROG}: error: {e}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: error: interrupted; nothing was written to {out}", file=sys.stderr)
        return 130  # the shell's status for a death by Ctrl-C
    print(f"{PROG}: {dataset.summary}; wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB, {args.max_res}x{args.max_res} "
          f"down to 4x4)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
