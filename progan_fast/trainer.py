"""The training loop: the schedule's phases, step after step, until the run ends or stops.

:class:`Trainer` reads as the procedure:

1. setup (``__init__``): check the settings (:func:`progan_fast.config.validate`), pick the device
   and the op backend, open the run folder and find the checkpoint to resume
   (:mod:`progan_fast.run_folder`), build the schedule, load the data, build G and D and restore
   them;
2. :meth:`Trainer.run`: write the run's config, open its log (:mod:`progan_fast.run_log`), loop,
   say how to continue;
3. the loop: per phase an :class:`~progan_fast.step.Iteration` on static buffers (replayed as a
   CUDA graph with ``--cuda-graphs``, :mod:`progan_fast.graphs`), first checked against the
   other setups with ``--backend auto`` or ``--channels-last auto`` (:mod:`progan_fast.step_choice`:
   extra timed steps, undone); after a step, each at its
   interval, a log window, a sample grid, SWD and a checkpoint. It stops at the end of the
   schedule, at ``--stop-after-kimg``, after ``--profile``'s steps or on Ctrl-C, with a checkpoint.

Under ``torchrun`` every rank runs this loop on its slice of each global batch (see
:mod:`progan_fast.distributed`); rank 0 alone writes into the run folder and prints. Every
decision that ends a phase, a log window or the run is taken by all ranks at the same step.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import augment as augmentmod
from . import distributed, init_from, ops, profiling, step_choice
from .checkpoint import list_checkpoints
from .cli import DEVICE_OUT_OF_MEMORY, StepOutOfMemory, TrainingDiverged, UsageError, resolve_device
from .config import RunOptions, TrainConfig, load_data, validate
from .data import ImageDataset
from .gan_state import AMP_DTYPES, GANState
from .graphs import StageGraphs
from .run_folder import RunFolder, restore
from .run_log import RunLog, StepProfiler
from .schedule import Phase, describe, images_before
from .step import Iteration, Window


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
    """One invocation of a run: ``Trainer(config, options).run()`` trains until the run ends or stops."""

    def __init__(self, config: TrainConfig, options: RunOptions, log=print,
                 world: distributed.World = distributed.SINGLE) -> None:
        validate(config, options)
        self.config = config
        self.options = options
        self.world = world
        self.log = log if world.is_main else (lambda message: None)
        self.log(f"run folder {options.out}")
        self.device = resolve_device(options.device, world)
        self.use_graphs = options.cuda_graphs and self.device.type == "cuda"
        if options.cuda_profiler_window is not None and self.device.type != "cuda":
            self.log("--cuda-profiler-steps needs a CUDA device; ignored")
        try:
            profiling.enable_nvtx(options.nvtx)
        except profiling.NvtxUnavailable as e:
            raise UsageError(str(e)) from None
        if options.cuda_graphs and not self.use_graphs:
            self.log("--cuda-graphs needs a CUDA device; training on the CPU without CUDA graphs")
        if self.use_graphs and world.distributed:
            # PyTorch can capture DDP only under conditions this loop does not meet (DDP built on a
            # side stream, 11+ eager DDP steps before capture, NCCL's async error handling off, a
            # static graph), and that combination has not been run here: refuse rather than guess.
            raise UsageError(
                f"--cuda-graphs is not supported with several ranks ({world.size} under torchrun) in this "
                f"version; drop --cuda-graphs to train data-parallel, or run one process to use CUDA graphs")
        try:
            self.backend = ops.set_default_backend(options.backend, self.device.type)
        except ops.BackendUnavailableError as e:
            raise UsageError(str(e)) from None
        if self.backend == "auto":  # this run's choices: from its checkpoint, the disk cache, or timed here
            ops.autotune.TUNER.reset()
            self.log(f"backend auto: each op times its backends on first use of a shape; "
                     f"{ops.autotune.cache_description(self.device)}")
        self.folder = RunFolder(options.out, self.log)
        self._lock_folder()
        try:
            self._set_up(config, options, world)
        except BaseException:
            self.folder.release_lock()
            raise

    def _lock_folder(self) -> None:
        """One live run per folder: rank 0 takes the folder's lock before anything reads or changes
        the folder (resume's removal of torn checkpoint writes included); every rank stops alike
        if another process holds it."""
        error = None
        if self.world.is_main:
            try:
                self.folder.acquire_lock()
            except (UsageError, OSError) as e:
                error = e
        message = self.world.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:  # rank 0's refusal, raised on every rank (rank 0 alone prints it)
            raise UsageError(message)

    def _set_up(self, config: TrainConfig, options: RunOptions, world: distributed.World) -> None:
        # --init-from: the source's architecture (or, on a resume, the run's own); its weights below
        config, source = init_from.settle(config, options.init_from, options.explicit, self.folder, options.resume)
        # A resume may keep the run's batch and learning-rate tables, or change batches not yet used.
        config, checkpoint = self.folder.checkpoint_to_resume(config, options.resume, options.explicit)
        self.config = config
        self.init_record = source.record() if source is not None else self.folder.saved_init_from()

        self.phases = config.schedule()
        self._check_batch_split()
        self.dataset = self._load_data()
        if config.channels == 3 and self.dataset.single_channel_source:
            self.log(f"note: every image in {self.dataset.source} is grayscale; it is trained as RGB (three equal "
                     f"channels). To train single-channel networks, start a new run with --channels 1")

        self.class_names = self.dataset.class_names if config.cond else None
        # Conditional: every image's class on the device, for the reals' labels and the fakes' draws.
        self.labels = self.dataset.labels.to(self.device) if config.cond else None
        torch.manual_seed(config.seed)  # the same on every rank: they draw the global batch alike
        self.state = GANState.create(
            config.network_config(len(self.class_names or ())), self.device, config.loss, self.phases[0].lr,
            config.ema_beta, amp_dtype=None if options.amp is None else AMP_DTYPES[options.amp],
            capturable=self.use_graphs, cond_weight=config.cond_weight, channels_last=options.channels_last is True,
            gp_resolution=config.gp_resolution,
        )
        # --backend auto and --channels-last auto: the setups each phase's step check compares
        # (one: no check), and the decisions by phase index (a checkpoint's, then this run's).
        self.setups = step_choice.candidates(self.backend, options.channels_last)
        self.step_choices: dict[str, dict] = {}
        self.phase_index, self.step = 0, 0
        self.graphs = None  # the StageGraphs of a --cuda-graphs run, once it starts
        self.augment = None if config.augment is None else augmentmod.Augment(
            augmentmod.parse_policy(config.augment), config.augment_p, self.device)
        if source is not None:
            init_from.load_weights(self.state, source, self.class_names, self.log)
            self.phase_index = init_from.start_phase(self.phases, source.res)
            self.log(f"starting from {source.path} ({source.res}px): at {source.res}px stable, "
                     f"{self.images_done() / 1000:g} kimg into this run's schedule")
        if checkpoint is not None:
            self.phase_index, self.step = restore(checkpoint, self.state, config, self.dataset, self.phases,
                                                  self.device, self.log)
            if self.augment is not None and checkpoint.get("augment") is not None:
                self.augment.load_state_dict(checkpoint["augment"])
            if self.backend == "auto" and checkpoint.get("auto_choices"):
                ops.autotune.TUNER.adopt(checkpoint["auto_choices"])
                self.log(f"backend auto: reusing the checkpoint's {len(checkpoint['auto_choices'])} choices")
            self.step_choices = dict(checkpoint.get("step_choices") or {})
        self.state.world = world
        self.run_log = RunLog(self.folder.path, config.latent_size, config.seed, self.device, main=world.is_main,
                              tensorboard=options.tensorboard, log=self.log, class_names=self.class_names)

    def _check_batch_split(self) -> None:
        """Under torchrun every phase's global batch must split evenly across the ranks, and (unless
        --mbstd-group was given) no rank's batch may be smaller than the minibatch-stddev group:
        D's statistic would then come from fewer images than it was built for (one: no signal)."""
        ranks = self.world.size
        group = self.config.mbstd_group_size
        for p in self.phases:
            if p.batch % ranks:
                raise UsageError(
                    f"the batch at {p.res}px ({p.batch}) does not split evenly across {ranks} ranks; "
                    f"pass a --batch divisible by {ranks} or start {ranks} fewer/more processes")
        if "mbstd_group_size" not in self.options.explicit:
            for p in self.phases:
                if p.batch // ranks < group:
                    per = f" ({p.batch} over {ranks} ranks)" if ranks > 1 else ""
                    raise UsageError(
                        f"the batch at {p.res}px is {p.batch // ranks} per rank{per}, below the minibatch-stddev "
                        f"group size {group}; pass a larger --batch (e.g. --batch {p.res}:{group * ranks}), or "
                        f"--mbstd-group to train with smaller groups")
        if ranks == 1:
            return
        uneven = sorted({p.batch for p in self.phases
                         if (p.batch // ranks) % ops.effective_group_size(p.batch, group)})
        if uneven:
            self.log(f"note: with {ranks} ranks the per-rank batch of the global batch "
                     f"{', '.join(map(str, uneven))} is not a multiple of the minibatch-stddev group: D's groups are "
                     f"smaller than in one process (training works; it is just not the same statistic)")

    def _load_data(self) -> ImageDataset:
        # Rank 0 decodes an image folder and writes the cache; the others then map that file.
        world = self.world
        if not world.is_main:
            world.barrier()
        dataset = load_data(self.config, self.folder.path, self.options.progress and world.is_main)
        if world.is_main:
            world.barrier()
        largest_batch = max(p.batch for p in self.phases)
        if largest_batch > len(dataset):
            raise UsageError(
                f"batch {largest_batch} is larger than the dataset ({len(dataset)} images in "
                f"{dataset.source}); pass a smaller --batch"
            )
        return dataset

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

    # ----- the run ------------------------------------------------------------------------------

    def images_done(self) -> int:
        return images_before(self.phases, self.phase_index, self.step)

    def _out_of_memory(self, phase: Phase) -> StepOutOfMemory:
        """The one-line stop for a step that ran out of device memory. The step's partial updates are
        not saved (they are no step boundary); the checkpoints written so far are, and the message
        says which one a resume starts from and which ``--batch`` halves this resolution's batch."""
        kept = list_checkpoints(self.folder.checkpoints)
        where = f"the newest checkpoint, {kept[-1].name}, is intact" if kept else "no checkpoint was written yet"
        per_rank = f", {phase.batch // self.world.size} per rank" if self.world.distributed else ""
        smaller = f"{phase.res}:{max(1, phase.batch // 2)}"
        again = self.options.resume_command or f"the same command with --resume auto --out {self.folder.path}"
        if "batch" in self.options.explicit:
            hint = f"continue with {smaller} added to --batch in: {again}"
        else:
            hint = f"continue with a smaller batch there: {again} --batch {smaller}"
        return StepOutOfMemory(f"out of device memory in a training step at {phase.res}px {phase.name} (batch "
                               f"{phase.batch}{per_rank}); {where}; {hint}")

    def checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank checks the weights, which are the same on all);
        refuses (TrainingDiverged) to write non-finite weights over good ones."""
        bad = self.state.non_finite_networks()
        if bad:
            raise TrainingDiverged(
                f"non-finite weights in {', '.join(bad)} at {self.images_done() / 1000:.1f} kimg; not checkpointed. "
                f"The last checkpoint in {self.folder.checkpoints} is from before this. Try a lower --lr or --loss wgan-gp"
            )
        if not self.world.is_main:
            return None
        auto = ops.autotune.TUNER.saved_choices() if self.backend == "auto" else None
        return self.folder.write_checkpoint(self.state, self.config, self.phase_index, self.step, self.images_done(),
                                            self.dataset.fingerprint(), self.device, keep=self.options.keep_checkpoints,
                                            auto_choices=auto, class_names=self.class_names,
                                            step_choices=self.step_choices or None,
                                            augment_state=None if self.augment is None else self.augment.state_dict())

    def run(self) -> Path:
        """Train until the schedule ends, ``--stop-after-kimg`` is reached or Ctrl-C; returns the run dir."""
        main = self.world.is_main
        self.world.barrier()  # every rank has checked the run folder before rank 0 writes into it
        if main:
            self.folder.write_config(self.config, self.dataset.source, init_from=self.init_record)
            self.folder.remove_torn_writes()
        amp = "float32" if self.options.amp is None else f"amp {self.options.amp}"
        graphs = ", CUDA graphs" if self.use_graphs else ""
        graphs += {True: ", channels-last", "auto": ", channels-last auto"}.get(self.options.channels_last, "")
        ranks = f", {self.world.size} ranks (DDP)" if self.world.distributed else ""
        self.log(f"{self.dataset.summary}; device {self.device}, backend {self.backend}, {amp}{graphs}{ranks}")
        for line in describe(self.phases).splitlines():
            self.log(f"schedule {line}")
        self.run_log.open(self.dataset, self.config.max_res)
        total = images_before(self.phases, len(self.phases))
        stop_at = None if self.options.stop_after_kimg is None else int(self.options.stop_after_kimg * 1000)
        bar = tqdm(total=total, initial=self.images_done(), unit="img", unit_scale=True,
                   disable=not (self.options.progress and main), dynamic_ncols=True, smoothing=0.1)
        try:
            with _StopRequest(self.world) as stop:
                finished = self._loop(bar, stop, stop_at)
        finally:
            bar.close()
            self.run_log.close()
            self.folder.release_lock()
        if finished:
            self.log(f"done: {total / 1000:.1f} kimg; samples in {self.folder.path / 'samples'}")
        else:
            again = self.options.resume_command or f"the same command with --resume auto --out {self.folder.path}"
            self.log(f"stopped at {self.images_done() / 1000:.1f} kimg; continue with: {again}")
        return self.folder.path

    # ----- the loop -----------------------------------------------------------------------------

    def _loop(self, bar, stop: _StopRequest, stop_at: int | None) -> bool:
        """Step through the schedule from the current position; True when it reached the end."""
        opts = self.options
        next_log = _next_multiple(self.images_done(), opts.log_kimg)
        next_sample = _next_multiple(self.images_done(), opts.sample_kimg)
        next_ckpt = _next_multiple(self.images_done(), opts.checkpoint_kimg)
        next_swd = _next_multiple(self.images_done(), opts.swd_kimg) if opts.swd_kimg else None
        level_res, device_images = None, None
        iteration, iteration_phase = None, None
        graphs = None
        if self.use_graphs:
            graphs = self.graphs = StageGraphs()
        window_steps, window_start = 0, time.perf_counter()  # the current log window
        if stop_at is not None and self.images_done() >= stop_at:
            return False
        done_here = 0  # steps taken by this invocation
        profiler = StepProfiler(opts.profile_steps, opts.cuda_profiler_window, self.device, self.folder.path,
                                main=self.world.is_main, log=self.log)
        while self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            if level_res != phase.res:
                level_res, device_images = phase.res, self._device_images(phase.res)
            if iteration_phase != self.phase_index:
                if graphs is not None:  # the old phase's graph and its pool go before the step check runs
                    graphs.release()
                if self.step == 0:
                    self.state.reset_optimizers(phase.lr)
                self.state.wrap_data_parallel(self.world, self.device, phase.res, phase.fading)
                iteration = Iteration(self.state, phase.res, phase.batch, phase.fading, self.device, device_images,
                                      mirror=self.config.mirror, labels=self.labels, augment=self.augment)
                iteration_phase = self.phase_index
                bar.set_description(f"{phase.res}px {phase.name}")
                if len(self.setups) > 1:
                    self._check_step_setup(phase, device_images)
            alpha = phase.alpha(self.step)
            iteration.set_alpha(alpha)
            if device_images is None:
                iteration.load_batch(self.dataset.at(phase.res))
            profiler.before_step(done_here)
            with profiling.nvtx_range(f"step {phase.res}px {phase.name}"):
                try:
                    if graphs is not None:
                        graphs.step(self.phase_index, iteration)
                    else:
                        iteration()
                except DEVICE_OUT_OF_MEMORY as e:
                    raise self._out_of_memory(phase) from e
            done_here += 1
            window_steps += 1
            self.step += 1
            bar.update(phase.batch)
            profiled = profiler.after_step(done_here, self.images_done())
            self._report_auto_choices(phase)

            end_of_phase = self.step >= phase.steps
            images = self.images_done()
            if images >= next_log or end_of_phase:
                self._log_window(phase, alpha, iteration.read_window(), window_steps, window_start, bar)
                window_steps, window_start = 0, time.perf_counter()
                next_log = _next_multiple(images, opts.log_kimg)
            if images >= next_sample or end_of_phase:
                self.run_log.samples(self.state.G_ema, phase.res, phase.alpha(self.step), images)
                next_sample = _next_multiple(images, opts.sample_kimg)
            if next_swd is not None and (images >= next_swd or end_of_phase):
                self.run_log.swd(self.state.G_ema, self.dataset.at(phase.res), phase, alpha, images,
                                 n=opts.swd_images, seed=self.config.seed, real_labels=self.dataset.labels)
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
        profiler.close(self.images_done())
        self._report_auto_choices(self.phases[min(self.phase_index, len(self.phases) - 1)])  # the last samples' choices
        return self.phase_index >= len(self.phases)

    def _check_step_setup(self, phase: Phase, device_images: torch.Tensor | None) -> None:
        """Before a phase's first step here: its setup (backend ``auto`` or ``reference``, NCHW
        or NHWC) from the checkpoint when it decided this phase, else from timed steps that are
        undone (:mod:`progan_fast.step_choice`); logged as one line and a log.jsonl record."""
        where = f"{phase.res}px {phase.name}"
        saved = step_choice.Setup.from_record(self.step_choices.get(str(self.phase_index)))
        if saved in self.setups:
            step_choice.apply(saved, self.state, self.device.type)
            self.log(f"{where}: training with {step_choice.names(self.setups)[saved]}, as the checkpoint decided")
            return
        # A copy of the augmentation: the check's steps are undone, and so must be their ADA updates.
        checked = Iteration(self.state, phase.res, phase.batch, phase.fading, self.device, device_images,
                            mirror=self.config.mirror, labels=self.labels,
                            augment=None if self.augment is None else self.augment.copy())
        checked.set_alpha(phase.alpha(self.step))

        def one_step() -> None:
            if device_images is None:
                checked.load_batch(self.dataset.at(phase.res))
            checked()

        decision = step_choice.check(self.setups, one_step, self.state, self.device, self.world)
        self.step_choices[str(self.phase_index)] = decision.setup.record()
        self.log(f"{where}: {decision.line()}")
        self.run_log.step_check(phase, self.images_done(), decision.record())

    def _report_auto_choices(self, phase: Phase) -> None:
        """With ``--backend auto``: one line per op family for the choices made since the last
        report (the first step of a phase makes them; sample grids add their no-grad shapes), and
        a log.jsonl record."""
        new = ops.autotune.TUNER.take_unreported() if self.backend == "auto" else None
        if new:
            for line in ops.autotune.format_report(new):
                self.log(line)
            self.run_log.auto_choices(phase, self.images_done(), [c.record() for c in new])

    def _log_window(self, phase: Phase, alpha: float | None, stats: Window, steps: int, started: float,
                    bar) -> None:
        """Stop a run whose losses stay non-finite (on every rank: the counts are the same on all),
        note skipped steps, and record the window's means."""
        seconds = time.perf_counter() - started
        images = self.images_done()
        where = f"{round(images / 1000, 3):g} kimg ({phase.res}px {phase.name})"
        if stats.longest_non_finite_run >= self.options.max_skipped_steps:
            raise TrainingDiverged(
                f"{stats.longest_non_finite_run} consecutive steps with non-finite losses up to {where} "
                f"(--max-skipped-steps {self.options.max_skipped_steps}); their updates were skipped and no "
                f"non-finite weights were saved; the last checkpoint in {self.folder.checkpoints} is from before "
                f"this. Try a lower --lr or --loss wgan-gp, or --resume auto to retry from it"
            )
        if stats.non_finite_steps:
            self.log(f"note: {stats.non_finite_steps} step(s) with non-finite losses up to {where} were skipped "
                     f"(weights and Adam state unchanged)")
        record = self.run_log.window(phase, alpha, stats, steps, seconds, images)
        if self.world.is_main:
            means = stats.means
            losses = f" D={means['D_loss']:.3f} G={means['G_loss']:.3f}" if means else " (no finite step)"
            bar.set_postfix_str(f"a={record['alpha']:.2f} kimg={record['kimg']:.1f}{losses}")


def _next_multiple(images: int, kimg: float) -> int:
    every = max(1, int(kimg * 1000))
    return (images // every + 1) * every
