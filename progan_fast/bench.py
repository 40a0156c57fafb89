"""Training-step throughput per stage: ``python -m progan_fast.bench``.

For each resolution it times the whole training iteration (data, D step with the penalty, G step,
both Adam steps, EMA) in every configuration this machine can run, side by side in one process:

- ``reference``: plain eager PyTorch, the baseline every ratio is against;
- ``compile``: the reference networks under ``torch.compile`` (not for ``wgan-gp``: torch.compile
  cannot run the gradient penalty's double backward, and the row says so);
- each kernel backend (``triton`` on a GPU; ``cpu``/``cuda``, the native extension, when built);
- ``auto``: every op on the backend measured fastest for its shapes (:mod:`progan_fast.ops.autotune`),
  chosen in the warm-up steps (or read from the choice cache, as a training run would); its row
  notes how many op signatures went to which backend;
- each of those with ``+amp`` (bf16 autocast) and, on a GPU, ``+graphs`` and ``+amp+graphs``
  (one CUDA graph for the iteration);
- ``+cl``: the networks' activations in NHWC (train's ``--channels-last``), beside the float32,
  ``+amp`` and (GPU) ``+amp+graphs`` configurations of every backend (``--no-channels-last`` skips them).

Every configuration starts from the same seeded networks, trains a fade phase (alpha 0.5) on a
synthetic dataset held on the device, warms up (allocation, Triton autotuning, compilation, graph
capture), then times ``--steps`` iterations between two device synchronizations. The table prints
ms/step, img/s and the ratio to ``reference`` at the same resolution; ``--json`` keeps it all.
A configuration that fails (out of memory, a compiler missing) is reported as failed and the run
goes on; the exit code is then 1, so a smoke run (CI's ``--quick``) cannot pass with a broken one. Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import ops
from .losses import LOSSES
from .networks import NetworkConfig
from .schedule import PAPER_BATCH
from .gan_state import GANState
from .step import Iteration

PROG = "progan_fast.bench"

#: Network widths: the paper's on a GPU, the laptop preset's on the CPU.
WIDTHS = {"paper": dict(fmap_base=8192, fmap_max=512, latent_size=512),
          "laptop": dict(fmap_base=512, fmap_max=64, latent_size=512)}


@dataclass(frozen=True)
class Variant:
    backend: str
    amp: bool = False
    graphs: bool = False
    compile: bool = False
    channels_last: bool = False

    @property
    def name(self) -> str:
        if self.compile:
            return "compile"
        return (self.backend + ("+amp" if self.amp else "") + ("+graphs" if self.graphs else "")
                + ("+cl" if self.channels_last else ""))


@dataclass
class Result:
    res: int
    batch: int
    variant: str
    ms_per_step: float | None
    img_per_s: float | None
    vs_reference: float | None = None
    note: str = ""
    picks: str = ""  # auto: which backends its op signatures use


def kernel_backends(device_type: str) -> list[str]:
    """Backends every op provides on this device, reference first."""
    tables = ops.all_op_implementations().values()
    names = [b for b in ops.KNOWN_BACKENDS if all(b in t for t in tables)]
    if device_type == "cpu":
        names = [b for b in names if b not in ("triton", "cuda")]  # interpreter timings mean nothing
    else:
        names = [b for b in names if b != "cpu"]
    return ["reference"] + [b for b in names if b != "reference"]


def variants_for(device_type: str, with_compile: bool, with_channels_last: bool = True) -> list[Variant]:
    """Every backend, ``auto`` last, each plain, ``+amp`` and on a GPU ``+graphs``; with
    ``with_channels_last``, ``+cl`` (NHWC activations) beside the float32 and the fastest
    configurations (``+cl``, ``+amp+cl``, and on a GPU ``+amp+graphs+cl``), not every combination."""
    out = []
    for backend in kernel_backends(device_type) + ["auto"]:
        out.append(Variant(backend))
        if backend == "reference" and with_compile:
            out.append(Variant("reference", compile=True))
        out.append(Variant(backend, amp=True))
        if device_type == "cuda":
            out += [Variant(backend, graphs=True), Variant(backend, amp=True, graphs=True)]
        if with_channels_last:
            out += [Variant(backend, channels_last=True), Variant(backend, amp=True, channels_last=True)]
            if device_type == "cuda":
                out.append(Variant(backend, amp=True, graphs=True, channels_last=True))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(variant: Variant, res: int, batch: int, config: NetworkConfig, loss: str, device: torch.device,
                 steps: int, warmup: int) -> Result:
    ops.set_default_backend(variant.backend, device.type)
    if variant.backend == "auto":
        ops.autotune.TUNER.reset()  # so its choices afterwards are this configuration's
        warmup = max(warmup, 1)  # choosing (timing or reading the cache) happens in the first step, untimed
    torch.manual_seed(0)
    state = GANState.create(config, device, loss=loss, amp_dtype=torch.bfloat16 if variant.amp else None,
                            capturable=variant.graphs, channels_last=variant.channels_last)
    if variant.compile:
        state.G, state.D = torch.compile(state.G), torch.compile(state.D)
    images = torch.randint(0, 256, (max(4 * batch, 64), 3, res, res), dtype=torch.uint8, device=device)
    iteration = Iteration(state, res, batch, res > 4, device, images)
    iteration.set_alpha(0.5)
    run = iteration
    if variant.graphs:
        from .graphs import WARMUP_STEPS, StageGraphs

        graphs = StageGraphs()
        warmup = max(warmup, WARMUP_STEPS + 1)  # eager warm-up steps, then the capture

        def run() -> None:
            graphs.step("bench", iteration)

    for _ in range(warmup):
        run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    seconds = time.perf_counter() - start
    window = iteration.read_window()  # also proves the steps produced finite losses
    note = f"{window.non_finite_steps} steps with non-finite losses" if window.non_finite_steps else ""
    ms = 1000 * seconds / steps
    return Result(res, batch, variant.name, ms, batch * steps / seconds, note=note,
                  picks=auto_picks() if variant.backend == "auto" else "")


def auto_picks() -> str:
    """``auto``'s choices in the last configuration: op signatures per backend, how many were timed."""
    choices = list(ops.autotune.TUNER.choices.values())
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.backend] = counts.get(c.backend, 0) + 1
    timed = sum(c.source == "timed" for c in choices)
    return (", ".join(f"{b} {n}" for b, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            + f" of {len(choices)} op shapes ({timed} timed here)")


def run_benchmark(resolutions: list[int], batch_for, widths: dict, loss: str, device: torch.device, steps: int,
                  warmup: int, with_compile: bool, log=print, with_channels_last: bool = True,
                  on_result=None, only: list[str] | None = None) -> list[Result]:
    """Every configuration (or those named in ``only``) at every resolution; ``on_result(results)`` is
    called with the rows so far each time one is measured (main saves them then, so a run cut short
    keeps what it finished)."""
    results: list[Result] = []
    config = NetworkConfig(max_res=max(resolutions), **widths)
    variants = variants_for(device.type, with_compile, with_channels_last)
    if only is not None:
        variants = [v for v in variants if v.name in only]
    if loss == "wgan-gp":
        log(f"{PROG}: compile is not timed: torch.compile cannot run the gradient penalty's double backward "
            f"(use --loss nonsat to time it)")
    previous = ops.get_default_backend()
    try:
        for res in resolutions:
            batch = batch_for(res)
            baseline = None
            for variant in variants:
                log(f"{PROG}: {res}px batch {batch}: {variant.name} ...")
                try:
                    r = time_variant(variant, res, batch, config, loss, device, steps, warmup)
                except Exception as e:  # report and go on: one broken configuration must not hide the rest
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                    r = Result(res, batch, variant.name, None, None, note=f"failed: {type(e).__name__}: {first}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if variant.name == "reference":
                    baseline = r.img_per_s
                if r.img_per_s is not None and baseline:
                    r.vs_reference = r.img_per_s / baseline
                results.append(r)
                if on_result is not None:
                    on_result(results)
    finally:
        ops.set_default_backend(previous, device.type)
    return results


def format_table(results: list[Result]) -> str:
    lines = [f"{'res':>5} {'batch':>5}  {'configuration':<22} {'ms/step':>9} {'img/s':>10} {'vs reference':>13}  note"]
    last_res = None
    for r in results:
        if last_res is not None and r.res != last_res:
            lines.append("")
        last_res = r.res
        ms = f"{r.ms_per_step:9.2f}" if r.ms_per_step is not None else f"{'-':>9}"
        ips = f"{r.img_per_s:10.1f}" if r.img_per_s is not None else f"{'-':>10}"
        ratio = f"{r.vs_reference:12.2f}x" if r.vs_reference is not None else f"{'-':>13}"
        lines.append(f"{r.res:>5} {r.batch:>5}  {r.variant:<22} {ms} {ips} {ratio}  {r.note or r.picks}")
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_json(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically (a temporary file beside it, then a rename), so a reader,
    or a run killed mid-write, only ever sees a whole file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Time the whole ProGAN training step per resolution for every backend, with and without "
                    "--amp and --cuda-graphs, side by side, and print img/s with ratios to plain eager PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA when available")
    p.add_argument("--quick", action="store_true",
                   help="a smoke-sized run: 4px and 8px, small batch, 3 timed steps (CI runs it on the CPU)")
    p.add_argument("--res", default=None,
                   help="comma-separated resolutions (default: 4..128 on a GPU, 4,8,16 on the CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch at every resolution (default: the paper's table on a GPU, 32 on the CPU)")
    p.add_argument("--widths", choices=sorted(WIDTHS), default=None,
                   help="network widths: paper (fmap_base 8192, fmap_max 512) or laptop (512, 64); "
                        "default paper on a GPU, laptop on the CPU")
    p.add_argument("--loss", choices=LOSSES, default="wgan-gp",
                   help="wgan-gp (the paper's, with the double-backward penalty) or a logistic loss")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 5 GPU, 2 CPU; graphed runs also need 3 eager steps and a capture)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configuration (slow to compile)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="skip the +cl configurations (the networks' activations in NHWC, as train's --channels-last)")
    p.add_argument("--configs", default=None, metavar="NAME,...",
                   help="time only these configurations (names as in the table, e.g. reference,cpu+amp); "
                        "the first should be reference, which the ratios are against")
    p.add_argument("--json", type=Path, default=None,
                   help="where to save the results (default runs/bench/bench-<device>-<date-time>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda was asked for, but PyTorch sees no CUDA device")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if args.res is not None:
        try:
            resolutions = sorted({int(r) for r in args.res.split(",")})
        except ValueError:
            return fail(f"--res must be comma-separated integers, not {args.res!r}")
    else:
        resolutions = [4, 8] if args.quick else ([4, 8, 16, 32, 64, 128] if gpu else [4, 8, 16])
    if any(r < 4 or r & (r - 1) or r > 1024 for r in resolutions):
        return fail(f"--res values must be powers of two from 4 to 1024, not {args.res}")
    for name in ("batch", "steps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            return fail(f"--{name} must be at least {0 if name == 'warmup' else 1}, not {value}")
    if args.batch is not None:
        batch_for = lambda res: args.batch  # noqa: E731
    elif gpu and not args.quick:
        batch_for = PAPER_BATCH.__getitem__
    else:
        batch_for = lambda res: 16 if args.quick else 32  # noqa: E731
    if any(batch_for(r) < 2 for r in resolutions):
        return fail("the batch must be at least 2 (minibatch stddev needs a group)")
    widths = WIDTHS[args.widths or ("paper" if gpu and not args.quick else "laptop")]
    steps = args.steps or (3 if args.quick else (20 if gpu else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (5 if gpu else 2))
    with_compile = not args.no_compile and args.loss != "wgan-gp" and not args.quick
    only = None
    if args.configs is not None:
        only = [n.strip() for n in args.configs.split(",") if n.strip()]
        known = [v.name for v in variants_for(device.type, with_compile, not args.no_channels_last)]
        unknown = [n for n in only if n not in known]
        if unknown or not only:
            return fail(f"--configs: no configuration {', '.join(map(repr, unknown)) or '(none given)'} on "
                        f"{device.type} with these options; there are: {','.join(known)}")

    # The JSON is written before the first configuration (an unwritable path fails now, not after the
    # run) and again, whole, after each one: a run cut short (tools/gpu_verify.py's stage caps, a
    # kill) leaves every row it finished, with "complete": false.
    path = args.json or Path("runs") / "bench" / f"bench-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "device": device_description(device),
        "torch": torch.__version__,
        "loss": args.loss,
        "widths": widths,
        "steps": steps,
        "warmup": warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
        "results": [],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_json(path, record)
    except OSError as e:
        return fail(f"cannot write {path}: {e}")

    def save_rows(results: list[Result]) -> None:
        record["results"] = [asdict(r) for r in results]
        try:
            save_json(path, record)
        except OSError as e:  # the run goes on; the last save says whether the file is whole
            print(f"{PROG}: warning: cannot write {path}: {e}", file=sys.stderr)

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"{PROG}: {device_description(device)}; torch {torch.__version__}; loss {args.loss}; widths "
        f"{widths}; {steps} timed steps after {warmup} warm-up steps")
    results = run_benchmark(resolutions, batch_for, widths, args.loss, device, steps, warmup, with_compile, log,
                            with_channels_last=not args.no_channels_last, on_result=save_rows, only=only)
    table = format_table(results)
    print(f"Training-step throughput on {device_description(device)} (loss {args.loss}, "
          f"fmap_base {widths['fmap_base']}, fmap_max {widths['fmap_max']}); ratios against plain eager PyTorch")
    print(table)

    record["complete"] = True
    record["results"] = [asdict(r) for r in results]
    try:
        save_json(path, record)
    except OSError as e:
        return fail(f"cannot write {path}: {e}")
    print(f"saved {path}")
    failed = [r for r in results if r.note.startswith("failed")]
    if failed:  # the table above still shows every configuration; the exit code must not hide one
        print(f"{PROG}: {len(failed)} of {len(results)} configurations failed: "
              + ", ".join(f"{r.variant} at {r.res}px" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
