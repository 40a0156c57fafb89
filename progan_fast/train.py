"""Command line: ``python -m progan_fast.train [options]``.

Every bad input ends in one line ``progan_fast.train: error: ...`` and exit code 2; nothing a run
already saved is overwritten.

Under ``torchrun --nproc_per_node=N -m progan_fast.train ...`` the same command trains
data-parallel on N ranks (:mod:`progan_fast.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

from . import augment, distributed, ops
from .checkpoint import CheckpointError
from .cli import StepOutOfMemory, TrainingDiverged, UsageError, resolve_device
from .config import PRESETS, RunOptions, TrainConfig
from .data import DataError
from .image_folder import FITS
from .losses import GP_RESOLUTIONS, LOSSES
from .profiling import parse_window
from .run_log import PROFILE_SKIP_STEPS
from .schedule import OFFICIAL_V2, RESOLUTIONS, official_gpus, official_tables
from .trainer import Trainer

PROG = "progan_fast.train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a Progressive Growing GAN (Karras et al. 2017). Without --data it trains on the "
            "embedded Noto emoji set; with no flags at all it is a CPU-sized demo (32x32, narrow "
            "networks) that finishes in about ten minutes on two cores."
        ),
        epilog=(
            "Run folder: config.json, checkpoints/, samples/ (latest.png is the newest EMA-generator "
            "grid, reals.png the data), log.jsonl and tensorboard/ (tensorboard --logdir RUN/tensorboard). "
            "Examples: '%(prog)s' | '%(prog)s --data ~/faces --preset paper --max-res 128' | "
            "'%(prog)s --resume auto --out runs/demo'. "
            "Several GPUs (or CPU processes): 'torchrun --standalone --nproc_per_node=N -m progan_fast.train ...' "
            "trains data-parallel (DDP: NCCL on GPUs, gloo on the CPU); --batch is the global batch, split "
            "evenly across the ranks, and a run resumes with any number of ranks."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and run folder")
    g.add_argument("--data", metavar="DIR|ZIP|FILE", default=None,
                   help="a folder of images (searched recursively: png, jpg, webp, bmp) or a zip archive of them, "
                        "read in place; they are made square (--fit), resized to --max-res once and cached in the run "
                        "folder. Or a prepared dataset (python -m progan_fast.dataset), used as it is, memory-mapped. "
                        "Default: the embedded emoji set (64x64)")
    g.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="run folder. Default: runs/<date-time> (with --resume auto: the newest run in runs/)")
    g.add_argument("--resume", metavar="auto|CKPT", default=None,
                   help="'auto' continues from the newest checkpoint in --out (or starts there if it has none); "
                        "a path resumes from that checkpoint. All settings must match the run's, except that a "
                        "larger --max-res grows a finished run further")
    g.add_argument("--init-from", metavar="RUN|CKPT", default=None,
                   help="start a new run from another run's G, D and G_ema (a run folder: its newest checkpoint). "
                        "It begins in the stabilize phase of the resolution the source had reached and grows to "
                        "--max-res (not lower than that); the networks' shape (--latent-size, --fmap-base, "
                        "--fmap-max, --mbstd-group, --channels) comes from the source, and a flag that contradicts "
                        "it is refused. Data, schedule, loss, lr and seed are this run's; the optimizer starts afresh. "
                        "With another number of classes (--cond), G's label input and D's class outputs start "
                        "afresh. config.json records the source's path and SHA-256; a resume never reads it again")

    m = p.add_argument_group("model and schedule (a preset fills these; a flag overrides it)")
    m.add_argument("--preset", choices=sorted(PRESETS), default="laptop",
                   help="laptop: " + ", ".join(f"{k}={v}" for k, v in PRESETS["laptop"].items())
                        + "; paper: the official code's v2 preset (README, 'Recipe'): "
                        + ", ".join(f"{k}={v}" for k, v in PRESETS["paper"].items())
                        + " (official: the batch and learning-rate tables of the official preset for as many GPUs "
                          "as ranks start the run: 1, 2, 4 or 8; another count takes the next lower one's, each "
                          "batch rounded down to a multiple of the ranks, as the official code does)")
    m.add_argument("--max-res", type=int, default=None, help="final resolution, a power of two from 4 to 1024")
    m.add_argument("--kimg-per-phase", type=float, default=None,
                   help="thousands of images shown in each fade and each stabilize phase (paper: 600)")
    m.add_argument("--total-kimg", metavar="KIMG|none", default=None,
                   help="thousands of images in the whole run: the final phase (stabilize at --max-res) gets "
                        "every image past the last fade, as the official total_kimg (paper: 12000); 'none' ends "
                        "one stabilize phase after the last fade (laptop)")
    m.add_argument("--batch", metavar="N|RES:N,...", default=None,
                   help="global batch: one number for every resolution, or RES:N pairs (e.g. 128:16,256:8) for "
                        "those resolutions, the others keeping the preset's (paper, one GPU: 128 up to 16px, 64 at "
                        "32px, halving to 4 at 512px and up). A resume keeps the run's batches unless this is "
                        "given, and may change only those of resolutions it has not started yet")
    m.add_argument("--fmap-base", type=int, default=None, help="feature maps: min(fmap_base / 2**stage, fmap_max) (paper 8192)")
    m.add_argument("--fmap-max", type=int, default=None, help="most feature maps in any layer (paper 512)")
    m.add_argument("--latent-size", type=int, default=512, help="size of the latent vector z")
    m.add_argument("--mbstd-group", type=int, default=None,
                   help="minibatch-stddev group size (default 4; shrinks to the largest size that divides the "
                        "batch). A per-rank batch below it is refused unless this flag is given")
    m.add_argument("--loss", choices=LOSSES, default=None,
                   help="nonsat: logistic D loss, non-saturating G loss (the seeds' procedure; laptop); minimax: "
                        "the original saturating G loss; wgan-gp: WGAN-GP with drift (paper: lambda 10, target 1, "
                        "drift 0.001). Default: the preset's")
    m.add_argument("--gp-resolution", choices=GP_RESOLUTIONS, default="max",
                   help="wgan-gp's penalty constrains the gradient with respect to D's input at: max, --max-res "
                        "(the official code: lower resolutions are upscaled to it, so the gradient's norm is "
                        "divided by max_res/res); phase, the phase's resolution (progan_fast before this option)")
    m.add_argument("--lr", metavar="X|RES:X,...", default=None,
                   help="Adam learning rate of G and D (betas 0, 0.99; eps 1e-8): one number for every resolution, "
                        "or RES:X pairs for those resolutions, the others keeping the preset's (laptop 0.001; "
                        "paper, one GPU: 0.001, 0.0015 at 1024px). A resume keeps the run's unless this is given")
    m.add_argument("--ema-beta", type=float, default=None,
                   help="per-step decay of the generator EMA used for samples (paper 0.999; the laptop preset's "
                        "phases are only a few hundred steps long, too short for 0.999 to follow G)")
    m.add_argument("--seed", type=int, default=0, help="seed for initialization, latents and batches")
    m.add_argument("--cond", action="store_true",
                   help="class-conditional training (AC-GAN, as the official code trains CIFAR-10): labels from the "
                        "class subfolders of --data (sorted names) or its dataset.json; G gets the one-hot label with "
                        "the latent, D also classifies, and both losses get a classification term. Needs --data")
    m.add_argument("--cond-weight", type=float, default=1.0,
                   help="weight of the classification terms with --cond (the official cond_weight)")
    m.add_argument("--mirror", action="store_true",
                   help="x-flip augmentation: flip each real image left-right with probability 1/2, drawn on the "
                        "device every step (the official code's mirror_augment, used for CelebA-HQ and LSUN; for "
                        "data whose subjects have no preferred side)")

    add_image_arguments(p)
    add_augment_arguments(p)

    r = p.add_argument_group("execution")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks CUDA when PyTorch sees a GPU")
    r.add_argument("--backend", choices=("auto",) + ops.KNOWN_BACKENDS, default="reference",
                   help="kernel backend for every op: reference is plain PyTorch; triton runs our Triton kernels "
                        "(on a GPU; on the CPU only under TRITON_INTERPRET=1, which is for tests); cuda and cpu are the "
                        "native extension (progan_fast._C: C++ CPU twins, CUDA kernels where built); auto times, on the first "
                        "use of each op with each input shape, every backend that can run it here (cpu and reference on the "
                        "CPU; triton, cuda and reference on a GPU), forward and backward, and keeps the fastest: one line per "
                        "op says which won; the choices go to log.jsonl and the checkpoints (a resume keeps them) and are "
                        "cached in ~/.cache/progan_fast (PROGAN_FAST_AUTO_CACHE=PATH moves the cache, =off disables it). "
                        "Then, at every phase start, a few extra steps with those choices and with reference "
                        "(undone afterwards) confirm them on the whole step: the phase trains with auto's choices only "
                        "when they are more than 3%% faster than reference")
    r.add_argument("--amp", action="store_true",
                   help="mixed precision: forward passes under autocast (see --amp-dtype), activations stored in "
                        "that dtype with float32 accumulation; losses, the gradient penalty's norm, weights and "
                        "Adam state stay float32. Works on the CPU too (bf16)")
    r.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="autocast dtype for --amp; fp16 adds dynamic loss scaling done on the device (an "
                        "overflowing step is skipped and the scale halves)")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="capture each (resolution, phase)'s whole iteration as one CUDA graph and replay it "
                        "(the first 3 steps of a phase run eagerly to warm up); needs a CUDA device, "
                        "otherwise training continues without graphs")
    r.add_argument("--channels-last", nargs="?", const="on", default="off", choices=("on", "off", "auto"),
                   metavar="on|off|auto",
                   help="run the networks' activations in NHWC memory order (torch.channels_last): every op "
                        "reads and writes that layout directly, and the convolutions use their NHWC kernels "
                        "(cuDNN's and oneDNN's, and the Triton conv's variant that loads contiguous input "
                        "channels). Same math; sums may round in another order. Free to change on resume. "
                        "'--channels-last' alone is 'on'; 'auto' times a few extra steps in NCHW and in NHWC at "
                        "the start of every phase (undone afterwards, so training is as if the winner had been "
                        "chosen up front) and trains the phase in the faster one, NCHW unless NHWC is more than "
                        "3%% faster; one line per phase says which")
    pr = p.add_argument_group("profiling (see docs/profiling.md)")
    pr.add_argument("--nvtx", action="store_true",
                    help="mark each phase of a step (data, D forward, penalty, D backward, D optimizer, G forward, "
                         "G backward, G optimizer, EMA) and every op call with NVTX ranges for Nsight Systems")
    pr.add_argument("--profile", metavar="N", type=int, default=None,
                    help=f"after {PROFILE_SKIP_STEPS} warm-up steps, record N steps with torch.profiler, write a "
                         "Chrome trace and an op summary to RUN/profile/, then stop with a checkpoint")
    pr.add_argument("--cuda-profiler-steps", metavar="START:STOP", default=None,
                    help="call cudaProfilerStart before step START and cudaProfilerStop after step STOP-1 (steps of "
                         "this invocation, from 0), for 'nsys profile --capture-range=cudaProfilerApi'")
    r.add_argument("--swd-kimg", type=float, default=None,
                   help="log the sliced Wasserstein distance (the ProGAN paper's metric) of the EMA generator "
                        "against the data every this many kimg and at each phase end (off by default: about "
                        "10 s a time on a CPU at 32px); 'python -m progan_fast.metrics RUN' scores a run afterwards")
    r.add_argument("--swd-images", type=int, default=1024, help="images a side for --swd-kimg (the paper: 8192)")
    r.add_argument("--max-skipped-steps", type=int, default=10,
                   help="a step whose D or G loss (or a gradient) is NaN or inf is skipped on the device, leaving "
                        "weights and Adam state unchanged; stop the run (without saving) once this many consecutive "
                        "steps were skipped for non-finite losses (checked at each log interval)")
    r.add_argument("--log-kimg", type=float, default=1.0, help="log losses and img/s every this many kimg")
    r.add_argument("--sample-kimg", type=float, default=10.0, help="write a sample grid every this many kimg (and at each phase end)")
    r.add_argument("--checkpoint-kimg", type=float, default=20.0, help="checkpoint every this many kimg (and at each phase end)")
    r.add_argument("--keep-checkpoints", type=int, default=3, help="how many of the newest checkpoints to keep")
    r.add_argument("--stop-after-kimg", type=float, default=None,
                   help="stop this invocation (with a checkpoint) once this many kimg in total have been shown; "
                        "continue later with --resume auto")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    r.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard event files")
    return p


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say how the data's images are turned into training images (docs/data.md)."""
    d = p.add_argument_group("images (see docs/data.md; part of the run's settings, a resume must repeat them)")
    d.add_argument("--fit", choices=FITS, default="crop",
                   help="how a non-square image becomes square: crop keeps its centred square (the shorter side); "
                        "pad keeps the whole image, centred on a square of its border's mean colour (images whose "
                        "longer side reaches --max-res are used); stretch resizes it to the square, changing its "
                        "aspect ratio. Part of the data cache's identity; a prepared dataset must have been made "
                        "with the same --fit")
    d.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="3 trains RGB networks; 1 trains single-channel (grayscale) ones: G makes and D reads one "
                        "channel, color images are converted to their luma, samples are grayscale PNGs")


def add_augment_arguments(p: argparse.ArgumentParser) -> None:
    """DiffAugment's flags (docs/data.md)."""
    a = p.add_argument_group("small datasets: differentiable augmentation (see docs/data.md)")
    a.add_argument("--augment", metavar="POLICY", default=None,
                   help="DiffAugment (Zhao et al. 2020): D sees every real and fake image through random "
                        "differentiable transforms, drawn per image on the device, in every D and G step and inside "
                        "the gradient penalty; POLICY is a comma-separated list of translation (shift by up to 1/8), "
                        "cutout (zero a square of half the side), color (brightness, saturation, contrast). For "
                        "datasets of a few hundred to a few thousand images, which D otherwise memorises: "
                        "translation,cutout,color. Default: off")
    a.add_argument("--augment-p", metavar="P|ada", default="1",
                   help="with --augment: the probability that each transform is applied to an image (1: DiffAugment); "
                        "'ada' adapts it as StyleGAN2-ADA does, from 0, every 4 steps, toward E[sign(D(real))] = 0.6, "
                        "logged as augment_p")


def _augment_settings(args: argparse.Namespace) -> tuple[str | None, float | str]:
    try:
        policy = None if args.augment is None else ",".join(augment.parse_policy(args.augment))
        p = augment.parse_p(args.augment_p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if policy is None and args.augment_p != "1":
        raise UsageError("--augment-p needs --augment POLICY (e.g. --augment translation,cutout,color)")
    return policy, p


def parse_table(text: str, name: str, kind: type) -> tuple[dict[int, float], float | None]:
    """``--batch``/``--lr`` text -> ``({res: value}, value for every resolution or None)``."""
    table, every = {}, None
    for item in text.split(","):
        item = item.strip()
        try:
            if ":" in item:
                res_text, value_text = item.split(":", 1)
                res = int(res_text)
                if res not in RESOLUTIONS:
                    raise UsageError(f"{name}: {res} in {item!r} is not a resolution (4, 8, ..., 1024)")
                table[res] = kind(value_text)
            else:
                every = kind(item)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise UsageError(f"{name}: {item!r} is neither {what} nor RES:{'N' if kind is int else 'X'} "
                             f"(e.g. {name} {'128:16,256:8' if kind is int else '1024:0.0015'})") from None
    return table, every


def config_from_args(args: argparse.Namespace, ranks: int = 1) -> TrainConfig:
    """The run's settings from the flags and the preset (whose paper tables depend on ``ranks``)."""
    preset = PRESETS[args.preset]
    official_batch, official_lr = official_tables(ranks)

    def pick(name: str):
        value = getattr(args, name)
        return preset[name] if value is None else value

    def table(name: str, kind: type) -> dict:
        base = preset[name]
        if base == "official":
            base = official_batch if name == "batch" else official_lr
        merged = dict(base) if isinstance(base, dict) else {r: base for r in RESOLUTIONS}
        if getattr(args, name) is not None:
            given, every = parse_table(getattr(args, name), f"--{name}", kind)
            if every is not None:
                merged = {r: every for r in RESOLUTIONS}
            merged.update(given)
        return merged

    total = args.total_kimg
    if total is not None:
        if total.strip().lower() == "none":
            total = None
        else:
            try:
                total = float(total)
            except ValueError:
                raise UsageError(f"--total-kimg must be a number of kimg or 'none', not {args.total_kimg!r}") from None
    else:
        total = preset["total_kimg"]
    return TrainConfig(
        data=None if args.data is None else str(Path(args.data).expanduser().resolve()),
        max_res=pick("max_res"),
        latent_size=args.latent_size,
        fmap_base=pick("fmap_base"),
        fmap_max=pick("fmap_max"),
        mbstd_group_size=4 if args.mbstd_group is None else args.mbstd_group,
        loss=pick("loss"),
        kimg_per_phase=pick("kimg_per_phase"),
        batch=table("batch", int),
        lr=table("lr", float),
        ema_beta=pick("ema_beta"),
        seed=args.seed,
        mirror=args.mirror,
        cond=args.cond,
        cond_weight=args.cond_weight,
        fit=args.fit,
        channels=args.channels,
        augment=_augment_settings(args)[0],
        augment_p=_augment_settings(args)[1],
        total_kimg=total,
        gp_resolution=args.gp_resolution,
    )


#: The TrainConfig field each argparse destination sets, for the settings --init-from takes from its source.
#: The flags (argparse dests) that set a TrainConfig field, and the field each sets, where
#: :attr:`RunOptions.explicit` needs to know whether the command line gave it.
_SETTING_DESTS = {"latent_size": "latent_size", "fmap_base": "fmap_base", "fmap_max": "fmap_max",
                  "mbstd_group": "mbstd_group_size", "channels": "channels", "batch": "batch", "lr": "lr",
                  "loss": "loss", "total_kimg": "total_kimg"}
_NOT_GIVEN = object()


def given_settings(argv: list[str]) -> frozenset[str]:
    """The settings of :data:`_SETTING_DESTS` set by a flag in ``argv`` (not by a default or the preset)."""
    probe = build_parser()
    probe.set_defaults(**{dest: _NOT_GIVEN for dest in _SETTING_DESTS})
    args = probe.parse_args(argv)
    return frozenset(field for dest, field in _SETTING_DESTS.items() if getattr(args, dest) is not _NOT_GIVEN)


def cuda_window(text: str) -> tuple[int, int]:
    try:
        return parse_window(text)
    except ValueError as e:
        raise UsageError(f"--cuda-profiler-steps: {e}") from None


def default_out(resume: str | None) -> Path:
    runs = Path("runs")
    if resume == "auto":
        candidates = sorted(p for p in runs.glob("*") if (p / "config.json").is_file()) if runs.is_dir() else []
        if not candidates:
            raise UsageError("--resume auto without --out: there is no run in ./runs to resume; pass --out DIR")
        return candidates[-1]
    return runs / time.strftime("%Y%m%d-%H%M%S")


def resume_command(argv: list[str], out: Path, world: distributed.World) -> str:
    """The command that continues this run: the same flags (a resume must repeat them), with
    ``--resume auto --out OUT`` in place of any given. Under torchrun it names this run's number of
    processes so that it runs as printed (any other number resumes the run too)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume", "--out"):
            skip = True
        elif not arg.startswith(("--resume=", "--out=")):
            kept.append(arg)
    launcher = f"torchrun --standalone --nproc_per_node={world.size}" if world.distributed else "python"
    return f"{launcher} -m {__package__}.train " + shlex.join([*kept, "--resume", "auto", "--out", str(out)])


def _default_out_or_error(resume: str | None) -> Path | str:
    try:
        return default_out(resume)
    except UsageError as e:
        return str(e)


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status. Under torchrun a rank does not return: it ends its process
    with that status once it has left the process group (see :func:`distributed.end_process`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    world = distributed.SINGLE
    try:
        world = distributed.from_environment()
        code = _train(args, world, sys.argv[1:] if argv is None else list(argv))
    except (UsageError, DataError, CheckpointError, distributed.DistributedError) as e:
        _error(world, e)
        code = 2
    except (TrainingDiverged, StepOutOfMemory) as e:
        _error(world, e)
        code = 1
    except OSError as e:  # e.g. an unwritable --out or a full disk: say which file, no traceback
        _error(world, e)
        code = 1
    except BaseException as e:
        if not world.distributed:
            raise
        traceback.print_exc()  # what Python would print, before the rank ends without finalizing
        code = 130 if isinstance(e, KeyboardInterrupt) else 1  # the shell's status for a Ctrl-C death
    finally:
        distributed.shutdown(world)
    if world.distributed:
        distributed.end_process(code)
    return code


def _error(world: distributed.World, e: Exception) -> None:
    """Print one error line. The ranks check the same inputs and fail alike, so rank 0 speaks for them."""
    if world.is_main:
        print(f"{PROG}: error: {e}", file=sys.stderr)


def _train(args: argparse.Namespace, world: distributed.World, argv: list[str]) -> int:
    if world.distributed:
        # Join the process group first: the run folder's default name (a time stamp) is rank 0's.
        distributed.init(world, resolve_device(args.device, world))
    out = args.out
    if out is None:
        out = world.broadcast_object(_default_out_or_error(args.resume) if world.is_main else None)
        if isinstance(out, str):  # rank 0's error, raised on every rank
            raise UsageError(out)
    config = config_from_args(args, world.size)
    if args.preset == "paper" and world.size not in OFFICIAL_V2 and world.is_main:
        print(f"{PROG}: note: the official code has presets for 1, 2, 4 and 8 GPUs; with {world.size} ranks "
              f"--preset paper takes the {official_gpus(world.size)}-GPU tables, each batch rounded down to a multiple "
              f"of {world.size}", file=sys.stderr)
    options = RunOptions(
        out=out,
        resume=args.resume,
        device=args.device,
        backend=args.backend,
        log_kimg=args.log_kimg,
        sample_kimg=args.sample_kimg,
        checkpoint_kimg=args.checkpoint_kimg,
        keep_checkpoints=args.keep_checkpoints,
        stop_after_kimg=args.stop_after_kimg,
        progress=not args.no_progress,
        tensorboard=not args.no_tensorboard,
        amp=args.amp_dtype if args.amp else None,
        channels_last={"on": True, "off": False, "auto": "auto"}[args.channels_last],
        cuda_graphs=args.cuda_graphs,
        nvtx=args.nvtx,
        swd_kimg=args.swd_kimg,
        swd_images=args.swd_images,
        profile_steps=args.profile,
        cuda_profiler_window=None if args.cuda_profiler_steps is None else cuda_window(args.cuda_profiler_steps),
        max_skipped_steps=args.max_skipped_steps,
        resume_command=resume_command(argv, out, world),
        init_from=args.init_from,
        explicit=given_settings(argv),
    )
    Trainer(config, options, log=lambda msg: print(f"{PROG}: {msg}", file=sys.stderr), world=world).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
