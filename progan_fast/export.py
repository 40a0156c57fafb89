"""Command line: ``python -m progan_fast.export RUN_OR_CKPT --out generator.pt2 [--onnx]``.

Writes a run's EMA generator, at the resolution and fade its checkpoint was training (as
``generate`` samples it), as a ``torch.export`` program: a graph of plain ATen ops with the
weights inside, which loads and runs where progan_fast is not installed::

    G = torch.export.load("generator.pt2").module()
    images = G(z)            # z: float32 [N, latent_size]; images: [N, 3, res, res], about [-1, 1]
    images = G(z, labels)    # a class-conditional run's generator: labels int64 [N]

The program is traced with the ``reference`` backend (plain PyTorch), whatever backend trained
the run, and refused if any progan_fast custom op (``torch.ops.progan_fast.*``) is left in it.
``--batch N`` fixes the batch dimension at N; by default it is free (any N >= 1). ``--onnx``
also writes the same graph as ONNX (needs the ``onnx`` and ``onnxscript`` packages). The file
holds ``progan_fast.json`` (resolution, fade, latent size, class names, source checkpoint), read
with ``torch.export.load(path, extra_files={"progan_fast.json": ""})``.
Every bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from . import ops
from .checkpoint import CheckpointError
from .cli import UsageError, resolve_device
from .inference import LoadedGenerator, load_generator

PROG = "progan_fast.export"
#: The packages ``torch.onnx.export`` needs, and how to get them.
ONNX_PACKAGES = ("onnx", "onnxscript")
ONNX_INSTALL = "pip install onnx onnxscript (onnxruntime runs the result)"
METADATA_FILE = "progan_fast.json"
#: The batch of the example inputs traced when the batch dimension is free (2, not 1: torch.export
#: specializes a dimension whose example size is 0 or 1).
_EXAMPLE_BATCH = 2


class FixedGenerator(nn.Module):
    """``G`` at one resolution and fade: ``forward(z)`` -> images (unconditional)."""

    def __init__(self, G: nn.Module, res: int, alpha: float | None) -> None:
        super().__init__()
        self.G, self.res, self.alpha = G, res, alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.G(z, self.res, self.alpha)


class FixedConditionalGenerator(FixedGenerator):
    """``forward(z, labels)`` -> images (class-conditional: ``labels`` int64 ``[N]``)."""

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.G(z, self.res, self.alpha, labels)


@contextlib.contextmanager
def reference_backend():
    """Trace with the plain PyTorch ops: the other backends are progan_fast custom ops, which the
    program could not run without progan_fast."""
    saved = ops.get_default_backend()
    ops.set_default_backend("reference")
    try:
        yield
    finally:
        ops.set_default_backend(saved, "cuda" if saved in ("cuda", "triton") else "cpu")


def example_inputs(loaded: LoadedGenerator, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    z = torch.randn(batch, loaded.config.latent_size, generator=torch.Generator().manual_seed(0)).to(device)
    if not loaded.class_names:
        return (z,)
    return z, (torch.arange(batch) % len(loaded.class_names)).to(device)


def custom_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """The progan_fast custom ops (``torch.ops.progan_fast.*``) ``program`` calls: what a machine
    without progan_fast could not run."""
    foreign = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "progan_fast":
            foreign.add(str(node.target))
    return sorted(foreign)


def export_generator(loaded: LoadedGenerator, batch: int | None = None) -> torch.export.ExportedProgram:
    """``loaded``'s generator at its resolution and fade as an exported program of plain ATen
    ops; ``batch`` fixes the batch dimension (None: any batch >= 1)."""
    G = loaded.G
    module = (FixedConditionalGenerator if loaded.class_names else FixedGenerator)(G, loaded.res, loaded.alpha).eval()
    device = next(G.parameters()).device
    args = example_inputs(loaded, batch or _EXAMPLE_BATCH, device)
    dynamic = None
    if batch is None:
        dim = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: dim} for _ in args)
    with reference_backend(), torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic)
        want = module(*args)
    foreign = custom_ops_in(program)
    if foreign:  # cannot happen with the reference backend; a program that needs progan_fast is no export
        raise RuntimeError(f"the exported program calls progan_fast ops ({', '.join(foreign)})")
    got = program.module()(*args)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the exported program differs from the generator by {(got - want).abs().max():.3g}")
    return program


def metadata(loaded: LoadedGenerator, batch: int | None) -> dict:
    return {
        "res": loaded.res,
        "alpha": loaded.alpha,
        "latent_size": loaded.config.latent_size,
        "class_names": loaded.class_names,
        "batch": batch,
        "images": loaded.images,
        "checkpoint": str(loaded.path),
        "inputs": ["z", "labels"] if loaded.class_names else ["z"],
    }


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a failed export never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def onnx_missing() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


class OnnxExportError(Exception):
    """torch.onnx could not translate the program (the .pt2 is written all the same)."""


def write_onnx(program: torch.export.ExportedProgram, path: Path, conditional: bool) -> None:
    names = ["z", "labels"] if conditional else ["z"]

    def write(tmp: Path) -> None:
        # One self-contained file (external_data=False): the generator is far below protobuf's 2 GB.
        torch.onnx.export(program, (), str(tmp), input_names=names, output_names=["images"], dynamo=True,
                          external_data=False, verbose=False)

    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # not its notes on torchvision ops that a generator never uses
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, nothing to act on
            _atomic_write(path, write)
    except OSError:
        raise
    except Exception as e:  # torch.onnx raises its own types, version to version
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise OnnxExportError(f"torch.onnx could not write {path}: {first}") from None
    finally:
        onnx_log.setLevel(level)


def parse_batch(text: str) -> int | None:
    if text == "any":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--batch must be a positive number or 'any', not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a run's EMA generator, at the resolution and fade of its checkpoint, as a torch.export "
                    "program (.pt2) of plain PyTorch ops that runs without progan_fast: "
                    "torch.export.load(FILE).module()(z), or (z, labels) for a class-conditional run.",
        epilog="Examples: '%(prog)s runs/demo --out generator.pt2' | "
               "'%(prog)s runs/demo/checkpoints/ckpt-000000112000.pt --out g.pt2 --batch 16 --onnx'",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR", type=Path,
                   help="a checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("--out", type=Path, default=Path("generator.pt2"), help="the .pt2 file to write")
    p.add_argument("--batch", metavar="N|any", default="any",
                   help="N fixes the batch dimension of the inputs at N (some runtimes need static shapes); "
                        "'any' leaves it free: one program takes any batch of 1 or more")
    p.add_argument("--onnx", metavar="FILE", nargs="?", const=True, default=None,
                   help="also write the program as ONNX, to FILE (default: --out with the suffix .onnx); "
                        f"needs the onnx and onnxscript packages: {ONNX_INSTALL}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the device the program's weights, and so its computation, are on")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    written = []
    try:
        batch = parse_batch(args.batch)
        if args.out.suffix != ".pt2":
            raise UsageError(f"--out {args.out} must end in .pt2 (a torch.export program)")
        onnx_path = None
        if args.onnx is not None:
            onnx_path = args.out.with_suffix(".onnx") if args.onnx is True else Path(args.onnx)
            if onnx_path.suffix != ".onnx":
                raise UsageError(f"--onnx {onnx_path} must end in .onnx")
            missing = onnx_missing()
            if missing:
                raise UsageError(f"--onnx needs the package(s) {', '.join(missing)}, which are not installed; "
                                 f"install them with: {ONNX_INSTALL}")
        loaded = load_generator(args.checkpoint, resolve_device(args.device))
        program = export_generator(loaded, batch)
        extra = {METADATA_FILE: json.dumps(metadata(loaded, batch), indent=2)}
        _atomic_write(args.out, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
        written.append(str(args.out))
        if onnx_path is not None:
            write_onnx(program, onnx_path, bool(loaded.class_names))
            written.append(str(onnx_path))
    except (UsageError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, OnnxExportError) as e:
        print(f"{PROG}: error: {e}" + (f" ({written[0]} was written)" if written else ""), file=sys.stderr)
        return 1
    inputs = "z [N, {0}], labels [N]" if loaded.class_names else "z [N, {0}]"
    shape = "any N" if batch is None else f"N = {batch}"
    print(f"{PROG}: wrote {' and '.join(written)}: {loaded.describe()}; inputs "
          f"{inputs.format(loaded.config.latent_size)} ({shape}) -> images [N, 3, {loaded.res}, {loaded.res}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
