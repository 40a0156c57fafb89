"""The training loop: schedule, data, checkpoints, samples, logging.

A run lives in one folder (``--out``)::

    config.json          the settings that define the run (compared on resume)
    checkpoints/         ckpt-<images shown>.pt, written atomically, the newest few kept
    samples/             EMA-generator grids on fixed latents; reals.png shows the data
    log.jsonl            one JSON object per log interval
    tensorboard/         the same scalars (and sample grids) for TensorBoard

Under ``torchrun`` every rank runs this loop on its slice of each global batch (see
:mod:`progan_fast.distributed`); rank 0 alone writes into the run folder and prints. Every
decision that ends a phase, a log window or the run is taken by all ranks at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import data as datamod
from . import distributed, ops, profiling
from .checkpoint import (CheckpointError, atomic_torch_save, check_compatible, list_checkpoints, load_checkpoint,
                         remove_torn_writes, save_checkpoint)
from .images import save_grid
from .losses import LOSSES
from .networks import NetworkConfig, load_grown_state_dict
from .schedule import Phase, build_schedule, images_before
from .step import AMP_DTYPES, GANState, Iteration, Window

SAMPLE_GRID = 64  # images per sample grid (8x8)


class UsageError(Exception):
    """A problem with what the user asked for; ``str(e)`` is the one-line message (exit code 2)."""


class TrainingDiverged(Exception):
    """Losses became non-finite; nothing non-finite was checkpointed (exit code 1)."""


#: Settings of the two presets. ``laptop`` (the default) is sized so that the run with no flags
#: finishes in about ten minutes on two CPU cores; its phases are a few hundred steps, too short
#: for the paper's EMA beta of 0.999 to follow G, hence 0.99. ``paper`` is the ProGAN paper /
#: official code (``batch=None``: the one-GPU batch table).
PRESETS = {
    "laptop": dict(max_res=32, fmap_base=512, fmap_max=64, kimg_per_phase=16.0, batch=32, ema_beta=0.99),
    "paper": dict(max_res=256, fmap_base=8192, fmap_max=512, kimg_per_phase=600.0, batch=None, ema_beta=0.999),
}
_LAPTOP = PRESETS["laptop"]


@dataclass(frozen=True)
class TrainConfig:
    """The settings that define a run. A resumed run must match them all, except that ``max_res``
    may grow (the finished schedule is continued to larger resolutions)."""

    data: str | None = None
    max_res: int = _LAPTOP["max_res"]
    latent_size: int = 512
    fmap_base: int = _LAPTOP["fmap_base"]
    fmap_max: int = _LAPTOP["fmap_max"]
    mbstd_group_size: int = 4
    loss: str = "nonsat"
    kimg_per_phase: float = _LAPTOP["kimg_per_phase"]
    batch: int | None = _LAPTOP["batch"]
    lr: float = 1e-3
    ema_beta: float = _LAPTOP["ema_beta"]
    seed: int = 0

    def network_config(self) -> NetworkConfig:
        return NetworkConfig(self.max_res, self.latent_size, self.fmap_base, self.fmap_max, self.mbstd_group_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: TrainConfig) -> list[str]:
        """Human-readable ``name: saved -> requested`` for every differing setting but ``max_res``."""
        a, b = self.to_dict(), other.to_dict()
        return [f"--{k.replace('_', '-')}: {a[k]!r} in the run, {b[k]!r} now" for k in a if k != "max_res" and a[k] != b[k]]


@dataclass
class RunOptions:
    """How this invocation runs: free to change between a run and its resume."""

    out: Path
    resume: str | None = None  # None, "auto", or a checkpoint path
    device: str = "auto"
    backend: str = "reference"
    log_kimg: float = 1.0
    sample_kimg: float = 10.0
    checkpoint_kimg: float = 20.0
    keep_checkpoints: int = 3
    stop_after_kimg: float | None = None
    progress: bool = True
    tensorboard: bool = True
    amp: str | None = None  # None (float32), "bf16" or "fp16"
    cuda_graphs: bool = False
    nvtx: bool = False
    profile_steps: int | None = None  # record this many steps with torch.profiler, then stop
    cuda_profiler_window: tuple[int, int] | None = None  # (start, stop) steps of this invocation
    swd_kimg: float | None = None  # log SWD of the EMA generator against the data every this many kimg
    swd_images: int = 1024
    max_skipped_steps: int = 10  # stop after this many consecutive steps with non-finite losses
    resume_command: str | None = None  # what to type to continue this run (the CLI fills it in)


#: Steps of an invocation that ``--profile`` lets pass before it records: allocation, Triton
#: autotuning and CUDA graph capture happen there and are not what a profile should show.
PROFILE_SKIP_STEPS = 5


def resolve_device(name: str, world: distributed.World = distributed.SINGLE) -> torch.device:
    """``--device`` for this rank (``cuda:LOCAL_RANK`` under torchrun)."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    try:
        return distributed.device_for(world, name)
    except distributed.DistributedError as e:
        raise UsageError(str(e)) from None


def validate(config: TrainConfig) -> None:
    try:
        datamod.check_resolution(config.max_res)
    except datamod.DataError as e:
        raise UsageError(str(e)) from None
    if config.loss not in LOSSES:
        raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, not {config.loss!r}")
    if config.batch is not None and config.batch < 1:
        raise UsageError(f"--batch must be at least 1, not {config.batch}")
    if not config.kimg_per_phase > 0 or not math.isfinite(config.kimg_per_phase):
        raise UsageError(f"--kimg-per-phase must be a positive number, not {config.kimg_per_phase}")
    for name in ("latent_size", "fmap_base", "fmap_max", "mbstd_group_size"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    if not 0.0 < config.lr < 1.0:
        raise UsageError(f"--lr must be in (0, 1), not {config.lr}")


def load_data(config: TrainConfig, run_dir: Path, progress: bool) -> datamod.ImageDataset:
    if config.data is None:
        return datamod.load_default_dataset(config.max_res)
    return datamod.load_image_folder(config.data, config.max_res, cache_dir=run_dir / "cache", progress=progress)


class _StopRequest:
    """Turns the first Ctrl-C into a request honoured at the next step boundary (so a checkpoint is
    never taken between D's and G's update); a second Ctrl-C interrupts at once.

    Under torchrun a Ctrl-C reaches each rank twice (from the terminal, then forwarded by torchrun,
    which sends SIGKILL 30 s later), and torchrun forwards a SIGTERM it receives: there, every
    SIGINT and SIGTERM only requests the stop, and the ranks agree on the step to stop at.
    """

    def __init__(self, world: distributed.World = distributed.SINGLE) -> None:
        self.requested = False
        self.world = world
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        signals = (signal.SIGINT, signal.SIGTERM) if self.world.distributed else (signal.SIGINT,)
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and not self.world.distributed:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Trainer:
    def __init__(self, config: TrainConfig, options: RunOptions, log=print,
                 world: distributed.World = distributed.SINGLE) -> None:
        validate(config)
        self.config = config
        self.options = options
        self.world = world
        self.log = log if world.is_main else (lambda message: None)
        self.device = resolve_device(options.device, world)
        if options.amp is not None and options.amp not in AMP_DTYPES:
            raise UsageError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, not {options.amp!r}")
        self.use_graphs = options.cuda_graphs and self.device.type == "cuda"
        if options.profile_steps is not None and options.profile_steps < 1:
            raise UsageError(f"--profile must be at least 1 step, not {options.profile_steps}")
        if options.cuda_profiler_window is not None and self.device.type != "cuda":
            self.log("--cuda-profiler-steps needs a CUDA device; ignored")
        profiling.enable_nvtx(options.nvtx)
        if options.cuda_graphs and not self.use_graphs:
            self.log("--cuda-graphs needs a CUDA device; training on the CPU without CUDA graphs")
        if self.use_graphs and world.distributed:
            # PyTorch can capture DDP only under conditions this loop does not meet (DDP built on a
            # side stream, 11+ eager DDP steps before capture, NCCL's async error handling off, a
            # static graph), and that combination has not been run here: refuse rather than guess.
            raise UsageError(
                f"--cuda-graphs is not supported with several ranks ({world.size} under torchrun) in this "
                f"version; drop --cuda-graphs to train data-parallel, or run one process to use CUDA graphs")
        if options.max_skipped_steps < 1:
            raise UsageError(f"--max-skipped-steps must be at least 1, not {options.max_skipped_steps}")
        try:
            self.backend = ops.set_default_backend(options.backend, self.device.type)
        except ops.BackendUnavailableError as e:
            raise UsageError(str(e)) from None
        self.run_dir = Path(options.out)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"--out {self.run_dir} exists and is not a folder")
        self.ckpt_dir = self.run_dir / "checkpoints"
        checkpoint = self._checkpoint_to_resume()

        self.phases = build_schedule(config.max_res, config.kimg_per_phase, config.batch)
        self._check_batch_split()
        # Rank 0 decodes an image folder and writes the cache; the others then map that file.
        if not world.is_main:
            world.barrier()
        self.dataset = load_data(config, self.run_dir, options.progress and world.is_main)
        if world.is_main:
            world.barrier()
        largest_batch = max(p.batch for p in self.phases)
        if largest_batch > len(self.dataset):
            raise UsageError(
                f"batch {largest_batch} is larger than the dataset ({len(self.dataset)} images in "
                f"{self.dataset.source}); pass a smaller --batch"
            )

        torch.manual_seed(config.seed)  # the same on every rank: they draw the global batch alike
        self.state = GANState.create(
            config.network_config(), self.device, config.loss, config.lr, config.ema_beta,
            amp_dtype=None if options.amp is None else AMP_DTYPES[options.amp], capturable=self.use_graphs,
        )
        self.phase_index, self.step = 0, 0
        self.writer = None
        self.graphs = None  # the StageGraphs of a --cuda-graphs run, once it starts
        if checkpoint is not None:
            self._restore(checkpoint)
        self.state.world = world
        # Fixed latents for sample grids, from their own generator so they never shift training's RNG.
        self.sample_latents = torch.randn(
            SAMPLE_GRID, config.latent_size, generator=torch.Generator().manual_seed(config.seed + 1)
        ).to(self.device)

    def _check_batch_split(self) -> None:
        """Under torchrun every phase's global batch must split evenly across the ranks."""
        ranks = self.world.size
        if ranks == 1:
            return
        for p in self.phases:
            if p.batch % ranks:
                raise UsageError(
                    f"the batch at {p.res}px ({p.batch}) does not split evenly across {ranks} ranks; "
                    f"pass a --batch divisible by {ranks} or start {ranks} fewer/more processes")
        from .ops.minibatch_stddev import effective_group_size

        uneven = sorted({p.batch for p in self.phases
                         if (p.batch // ranks) % effective_group_size(p.batch, self.config.mbstd_group_size)})
        if uneven:
            self.log(f"note: with {ranks} ranks the per-rank batch of the global batch "
                     f"{', '.join(map(str, uneven))} is not a multiple of the minibatch-stddev group: D's groups are "
                     f"smaller than in one process (training works; it is just not the same statistic)")

    # ----- run directory and resume -------------------------------------------------------------

    def _saved_config(self) -> TrainConfig | None:
        path = self.run_dir / "config.json"
        if not path.is_file():
            return None
        try:
            return TrainConfig.from_dict(json.loads(path.read_text())["config"])
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} is not a progan_fast run config ({e})") from None

    def _check_same_run(self, saved: TrainConfig, where: str) -> None:
        diffs = saved.differences(self.config)
        if diffs:
            raise UsageError(f"{where} was made with other settings; refusing to mix them: " + "; ".join(diffs))
        if self.config.max_res < saved.max_res:
            raise UsageError(
                f"{where} trains up to --max-res {saved.max_res}; it can grow but not shrink to {self.config.max_res}"
            )

    def _checkpoint_to_resume(self) -> dict | None:
        saved = self._saved_config()
        existing = list_checkpoints(self.ckpt_dir)
        resume = self.options.resume
        if resume is None:
            if saved is not None or existing:
                diffs = saved.differences(self.config) if saved else []
                detail = f" with other settings ({'; '.join(diffs)})" if diffs else ""
                raise UsageError(
                    f"run directory {self.run_dir} already holds a run{detail}; pass --resume auto to "
                    f"continue it, or choose another --out"
                )
            return None
        if saved is not None:  # never let a resume rewrite another run's folder
            self._check_same_run(saved, f"the run in {self.run_dir}")
        if resume == "auto":
            if not existing:
                self.log(f"nothing to resume in {self.run_dir}: starting a new run there")
                return None
            path = existing[-1]
        else:
            path = Path(resume)
        state = load_checkpoint(path)
        try:
            ckpt_config = TrainConfig.from_dict(state["config"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} holds no valid run config ({e})") from None
        self._check_same_run(ckpt_config, f"checkpoint {path}")
        # Also refuses settings this version does not know (from_dict above drops them silently).
        check_compatible(state, self.config.to_dict(), ignore=("max_res",), path=path)
        self.log(f"resuming from {path}")
        state["_path"] = str(path)
        return state

    def _restore(self, ckpt: dict) -> None:
        path = ckpt["_path"]
        old_config = TrainConfig.from_dict(ckpt["config"])
        try:
            for name in ("G", "D", "G_ema"):
                missing = load_grown_state_dict(getattr(self.state, name), ckpt[name])
                if missing and old_config.max_res == self.config.max_res:
                    raise ValueError(f"{name} lacks {', '.join(missing[:3])}")
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this network: {str(e).splitlines()[0][:300]}") from None
        if old_config.max_res == self.config.max_res and ckpt.get("data_fingerprint") != self.dataset.fingerprint():
            # Not refused: adding images to a folder is a normal thing to do. But the user should
            # know that the continuation no longer repeats what an uninterrupted run would have done.
            self.log(f"note: the images in {self.dataset.source} changed since {path} was written; "
                     f"continuing with the current set")
        self.phase_index, self.step = int(ckpt["phase_index"]), int(ckpt["step"])
        if self.phase_index < len(self.phases) and self.step > 0:
            # Mid-phase: Adam's moments continue. At a phase start they are reset anyway.
            self.state.opt_G.load_state_dict(ckpt["opt_G"])
            self.state.opt_D.load_state_dict(ckpt["opt_D"])
        scales = ckpt.get("loss_scale") or {}
        for name in ("D", "G"):  # fp16 loss scale: kept across a resume when both runs use fp16
            scaler = getattr(self.state, f"scaler_{name}")
            if scaler is not None and name in scales:
                scaler.load_state_dict(scales[name])
        torch.set_rng_state(ckpt["rng_cpu"])
        rng_cuda = ckpt.get("rng_cuda")
        if isinstance(rng_cuda, list):  # older checkpoints hold one state per visible GPU; training used the first
            rng_cuda = rng_cuda[0] if rng_cuda else None
        if self.device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, self.device)
        if old_config.max_res < self.config.max_res:
            self.log(f"growing the run from {old_config.max_res}px to {self.config.max_res}px")

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"config": self.config.to_dict(), "dataset": self.dataset.source}, indent=2)
        tmp = self.run_dir / ".config.json.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(self.run_dir / "config.json")

    # ----- the loop -----------------------------------------------------------------------------

    def images_done(self) -> int:
        return images_before(self.phases, self.phase_index, self.step)

    def _non_finite_networks(self) -> list[str]:
        """Names of the networks holding a NaN or inf parameter (one device reduction, one sync)."""
        nets = {"G": self.state.G, "D": self.state.D, "G_ema": self.state.G_ema}
        finite = torch.stack([torch.stack([p.isfinite().all() for p in net.parameters()]).all()
                              for net in nets.values()]).tolist()
        return [name for name, ok in zip(nets, finite) if not ok]

    def checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank checks the weights, which are the same on all);
        refuses (TrainingDiverged) to write non-finite weights over good ones."""
        bad = self._non_finite_networks()
        if bad:
            raise TrainingDiverged(
                f"non-finite weights in {', '.join(bad)} at {self.images_done() / 1000:.1f} kimg; not checkpointed. "
                f"The last checkpoint in {self.ckpt_dir} is from before this. Try a lower --lr or --loss wgan-gp"
            )
        if not self.world.is_main:
            return None
        s = self.state
        payload = {
            "config": self.config.to_dict(),
            "phase_index": self.phase_index,
            "step": self.step,
            "images": self.images_done(),
            "G": s.G.state_dict(),
            "D": s.D.state_dict(),
            "G_ema": s.G_ema.state_dict(),
            "opt_G": s.opt_G.state_dict(),
            "opt_D": s.opt_D.state_dict(),
            # Every rank's generators are in the same state, so rank 0's resume any number of ranks.
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "data_fingerprint": self.dataset.fingerprint(),
            "loss_scale": {name: scaler.state_dict() for name, scaler in (("D", s.scaler_D), ("G", s.scaler_G))
                           if scaler is not None},
        }
        return save_checkpoint(self.ckpt_dir, self.images_done(), payload, keep=self.options.keep_checkpoints)

    @torch.no_grad()
    def save_samples(self, phase: Phase) -> Path:
        alpha = phase.alpha(self.step)
        fakes = torch.cat([self.state.G_ema(z, phase.res, alpha) for z in self.sample_latents.split(16)])
        path = save_grid(fakes, self.run_dir / "samples" / f"fakes-{self.images_done():012d}.png")
        save_grid(fakes, self.run_dir / "samples" / "latest.png")
        if self.writer is not None:
            self.writer.add_images("samples", ((fakes.clamp(-1, 1) + 1) / 2).cpu(), self.images_done())
        return path

    def run(self) -> Path:
        """Train until the schedule ends, ``--stop-after-kimg`` is reached or Ctrl-C; returns the run dir."""
        main = self.world.is_main
        self.world.barrier()  # every rank has checked the run folder before rank 0 writes into it
        if main:
            self._write_config()
            for torn in remove_torn_writes(self.ckpt_dir):
                self.log(f"removed {torn.name}, a checkpoint write that was killed before it finished")
        amp = "float32" if self.options.amp is None else f"amp {self.options.amp}"
        graphs = ", CUDA graphs" if self.use_graphs else ""
        ranks = f", {self.world.size} ranks (DDP)" if self.world.distributed else ""
        self.log(f"{self.dataset.summary}; device {self.device}, backend {self.backend}, {amp}{graphs}{ranks}")
        if main and not (self.run_dir / "samples" / "reals.png").exists():
            reals = datamod.to_float(self.dataset.at(self.config.max_res)[:SAMPLE_GRID])
            save_grid(reals, self.run_dir / "samples" / "reals.png")
        self.writer = self._open_tensorboard() if main else None
        total = images_before(self.phases, len(self.phases))
        stop_at = None if self.options.stop_after_kimg is None else int(self.options.stop_after_kimg * 1000)
        bar = tqdm(total=total, initial=self.images_done(), unit="img", unit_scale=True,
                   disable=not (self.options.progress and main), dynamic_ncols=True, smoothing=0.1)
        log_file = open(self.run_dir / "log.jsonl", "a") if main else None
        try:
            with _StopRequest(self.world) as stop:
                finished = self._loop(bar, log_file, stop, stop_at)
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
            if self.writer is not None:
                self.writer.close()
        if finished:
            self.log(f"done: {total / 1000:.1f} kimg; samples in {self.run_dir / 'samples'}")
        else:
            again = self.options.resume_command or f"the same command with --resume auto --out {self.run_dir}"
            self.log(f"stopped at {self.images_done() / 1000:.1f} kimg; continue with: {again}")
        return self.run_dir

    def _open_tensorboard(self):
        if not self.options.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: scalars go to log.jsonl only")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _device_images(self, res: int) -> torch.Tensor | None:
        """The dataset at ``res`` on the training device when it fits (a quarter of free GPU
        memory), else None: batches are then staged from host memory before each step."""
        images = self.dataset.at(res)
        if self.device.type != "cuda":
            return images.to(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        if images.numel() > free // 4:
            self.log(f"{res}px: the dataset ({images.numel() / 2**30:.1f} GiB) stays in host memory; "
                     f"batches are copied to the GPU each step")
            return None
        return images.to(self.device)

    def _loop(self, bar, log_file, stop: _StopRequest, stop_at: int | None) -> bool:
        opts = self.options
        next_log = _next_multiple(self.images_done(), opts.log_kimg)
        next_sample = _next_multiple(self.images_done(), opts.sample_kimg)
        next_ckpt = _next_multiple(self.images_done(), opts.checkpoint_kimg)
        next_swd = _next_multiple(self.images_done(), opts.swd_kimg) if opts.swd_kimg else None
        level_res, device_images = None, None
        iteration, iteration_phase = None, None
        graphs = None
        if self.use_graphs:
            from .graphs import StageGraphs  # imports torch.cuda graph machinery only when asked for

            graphs = self.graphs = StageGraphs()
        window = [0, time.perf_counter()]  # steps, start time of the current log window
        if stop_at is not None and self.images_done() >= stop_at:
            return False
        done_here = 0  # steps taken by this invocation
        cuda_window = None
        if opts.cuda_profiler_window is not None:
            cuda_window = profiling.CudaProfilerWindow(*opts.cuda_profiler_window, enabled=self.device.type == "cuda")
        prof = None
        while self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            if level_res != phase.res:
                level_res, device_images = phase.res, self._device_images(phase.res)
            if iteration_phase != self.phase_index:
                if self.step == 0:
                    self.state.reset_optimizers()
                self.state.wrap_data_parallel(self.world, self.device, phase.res, phase.fading)
                iteration = Iteration(self.state, phase.res, phase.batch, phase.fading, self.device, device_images)
                iteration_phase = self.phase_index
                bar.set_description(f"{phase.res}px {phase.name}")
            alpha = phase.alpha(self.step)
            iteration.set_alpha(alpha)
            if device_images is None:
                iteration.load_batch(self.dataset.at(phase.res))
            if cuda_window is not None:
                cuda_window.before_step(done_here)
            if opts.profile_steps is not None and done_here == PROFILE_SKIP_STEPS and self.world.is_main:
                prof = profiling.torch_profiler(self.device.type)
                prof.__enter__()
            with profiling.nvtx_range(f"step {phase.res}px {phase.name}"):
                if graphs is not None:
                    graphs.step(self.phase_index, iteration)
                else:
                    iteration()
            if cuda_window is not None:
                cuda_window.after_step(done_here)
            done_here += 1
            window[0] += 1
            self.step += 1
            bar.update(phase.batch)
            profiled = opts.profile_steps is not None and done_here == PROFILE_SKIP_STEPS + opts.profile_steps
            if prof is not None and profiled:
                self._write_profile(prof)
                prof = None

            end_of_phase = self.step >= phase.steps
            images = self.images_done()
            if images >= next_log or end_of_phase:
                self._log_window(phase, alpha, iteration.read_window(), window, bar, log_file)
                window = [0, time.perf_counter()]
                next_log = _next_multiple(images, opts.log_kimg)
            if images >= next_sample or end_of_phase:
                if self.world.is_main:
                    self.save_samples(phase)
                next_sample = _next_multiple(images, opts.sample_kimg)
            if next_swd is not None and (images >= next_swd or end_of_phase):
                if self.world.is_main:
                    self._log_swd(phase, alpha, log_file)
                next_swd = _next_multiple(images, opts.swd_kimg)
            if end_of_phase:
                self.phase_index, self.step = self.phase_index + 1, 0
            # A signal reaches the ranks at different steps: they stop together at the first step
            # after which any of them has seen it (a CPU message per step, only with several ranks).
            stopping = self.world.any(stop.requested) or (stop_at is not None and images >= stop_at) or profiled
            if images >= next_ckpt or end_of_phase or stopping:
                self.checkpoint()
                next_ckpt = _next_multiple(images, opts.checkpoint_kimg)
            if stopping:
                break
        if prof is not None:  # the schedule ended before --profile's steps were recorded
            self._write_profile(prof)
        if cuda_window is not None:
            cuda_window.close()
        return self.phase_index >= len(self.phases)

    def _log_swd(self, phase: Phase, alpha, log_file) -> None:
        """SWD (the ProGAN paper's metric) of the EMA generator against the data at this resolution.
        It leaves torch's global RNG alone, so a run that logs it trains exactly like one that does not."""
        from . import metrics  # numpy-heavy; only imported by runs that ask for it

        figures = metrics.swd_for_generator(self.state.G_ema, self.dataset.at(phase.res), phase.res, alpha,
                                            n=self.options.swd_images, seed=self.config.seed)
        record = {"kimg": round(self.images_done() / 1000, 3), "res": phase.res, "phase": phase.name, **figures}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if self.writer is not None:
            for k, v in figures.items():
                self.writer.add_scalar(f"metrics/{k}", v, self.images_done())

    def _write_profile(self, prof) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        folder = self.run_dir / "profile"
        trace = profiling.export_trace(prof, folder / f"trace-{self.images_done():012d}.json")
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        (folder / f"summary-{self.images_done():012d}.txt").write_text(table + "\n")
        self.log(f"profiled {self.options.profile_steps} steps: {trace} (open it at https://ui.perfetto.dev); "
                 f"top ops in {folder}/summary-{self.images_done():012d}.txt")

    def _log_window(self, phase: Phase, alpha, stats: Window, window, bar, log_file) -> None:
        """Log one window's means, and stop a run whose losses stay non-finite (on every rank: the
        counts are the same on all)."""
        steps, started = window
        seconds = max(time.perf_counter() - started, 1e-9)
        kimg = self.images_done() / 1000
        where = f"{round(kimg, 3):g} kimg ({phase.res}px {phase.name})"
        if stats.longest_non_finite_run >= self.options.max_skipped_steps:
            raise TrainingDiverged(
                f"{stats.longest_non_finite_run} consecutive steps with non-finite losses up to {where} "
                f"(--max-skipped-steps {self.options.max_skipped_steps}); their updates were skipped and no "
                f"non-finite weights were saved; the last checkpoint in {self.ckpt_dir} is from before this. "
                f"Try a lower --lr or --loss wgan-gp, or --resume auto to retry from it"
            )
        if stats.non_finite_steps:
            self.log(f"note: {stats.non_finite_steps} step(s) with non-finite losses up to {where} were skipped "
                     f"(weights and Adam state unchanged)")
        means = stats.means
        record = {
            "kimg": round(kimg, 3),
            "res": phase.res,
            "phase": phase.name,
            "alpha": 1.0 if alpha is None else round(alpha, 4),
            "img_per_s": round(steps * phase.batch / seconds, 1),
            **{k: round(v, 5) for k, v in means.items()},
        }
        if stats.non_finite_steps:
            record["skipped_steps"] = stats.non_finite_steps
        if log_file is None:  # not rank 0
            return
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "kimg":
                    self.writer.add_scalar(k, v, self.images_done())
        losses = f" D={means['D_loss']:.3f} G={means['G_loss']:.3f}" if means else " (no finite step)"
        bar.set_postfix_str(f"a={record['alpha']:.2f} kimg={record['kimg']:.1f}{losses}")


def _next_multiple(images: int, kimg: float) -> int:
    every = max(1, int(kimg * 1000))
    return (images // every + 1) * every
