"""What a run records as it trains, into its folder::

    log.jsonl            one JSON object per log window (loss means, img/s, alpha), per SWD measurement
                         and, with --backend auto, per batch of new backend choices ("auto")
    tensorboard/         the same scalars, and the sample grids, for TensorBoard
    samples/             EMA-generator grids on fixed latents (fakes-<images>.png, latest.png); reals.png shows the data
    profile/             --profile's Chrome trace and op summary

Only rank 0 writes: on the other ranks every method here does nothing. What the records mean is
decided by the trainer's loop; this module only formats and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import files, profiling
from .data import ImageDataset, to_float
from .images import save_grid
from .schedule import Phase
from .step import Window
from .swd import draw_labels, swd_for_generator

SAMPLE_GRID = 64  # images per sample grid (8x8)
SAMPLE_COLUMNS = 8

#: Steps of an invocation that ``--profile`` lets pass before it records: allocation, Triton
#: autotuning and CUDA graph capture happen there and are not what a profile should show.
PROFILE_SKIP_STEPS = 5


class RunLog:
    """``log.jsonl``, TensorBoard and the sample grids of the run in ``path``."""

    def __init__(self, path: Path, latent_size: int, seed: int, device: torch.device, *, main: bool,
                 tensorboard: bool, log: Callable[[str], None] = print, class_names: list[str] | None = None) -> None:
        self.path, self.main, self.tensorboard, self.log = Path(path), main, tensorboard, log
        # Fixed latents for sample grids, from their own generator so they never shift training's RNG.
        self.sample_latents = torch.randn(
            SAMPLE_GRID, latent_size, generator=torch.Generator().manual_seed(seed + 1)
        ).to(device)
        # Conditional: one row per class (row r shows class r mod C: the first 8 classes when there are more).
        self.sample_labels = None if not class_names else \
            (torch.arange(SAMPLE_GRID) // SAMPLE_COLUMNS % len(class_names)).to(device)
        self.writer = None  # the TensorBoard SummaryWriter while open
        self._file = None  # log.jsonl while open

    def open(self, dataset: ImageDataset, max_res: int) -> None:
        """Write ``samples/reals.png`` (once per run), open TensorBoard and ``log.jsonl`` (appending)."""
        if not self.main:
            return
        if not (self.path / "samples" / "reals.png").exists():
            reals = to_float(dataset.at(max_res)[:SAMPLE_GRID])
            save_grid(reals, self.path / "samples" / "reals.png")
        self.writer = self._open_tensorboard()
        # Unbuffered: a record is on disk when _write returns, and a failed write leaves nothing
        # queued in a buffer that a later flush or close would try (and fail) to write again.
        self._file = open(self.path / "log.jsonl", "ab", buffering=0)

    def _open_tensorboard(self):
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: scalars go to log.jsonl only")
            return None
        return SummaryWriter(str(self.path / "tensorboard"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def window(self, phase: Phase, alpha: float | None, stats: Window, steps: int, seconds: float,
               images: int) -> dict:
        """Record one log window (``steps`` steps in ``seconds``, ending at ``images`` shown); returns the record."""
        record = {
            "kimg": round(images / 1000, 3),
            "res": phase.res,
            "phase": phase.name,
            "alpha": 1.0 if alpha is None else round(alpha, 4),
            "img_per_s": round(steps * phase.batch / max(seconds, 1e-9), 1),
            **{k: round(v, 5) for k, v in stats.means.items()},
        }
        if stats.non_finite_steps:
            record["skipped_steps"] = stats.non_finite_steps
        if self._file is None:  # not rank 0
            return record
        self._write(record)
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "kimg":
                    self.writer.add_scalar(k, v, images)
        return record

    def auto_choices(self, phase: Phase, images: int, choices: list[dict]) -> None:
        """Record ``--backend auto``'s new choices (one dict per op signature: backend, source, timings)."""
        if self._file is not None:
            self._write({"kimg": round(images / 1000, 3), "res": phase.res, "phase": phase.name, "auto": choices})

    def step_check(self, phase: Phase, images: int, decision: dict) -> None:
        """Record a phase's step check (``--backend auto``, ``--channels-last auto``): the setup
        chosen and each setup's fastest step (:mod:`progan_fast.step_choice`)."""
        if self._file is not None:
            self._write({"kimg": round(images / 1000, 3), "res": phase.res, "phase": phase.name,
                         "step_check": decision})

    @torch.no_grad()
    def samples(self, G_ema: torch.nn.Module, res: int, alpha: float | None, images: int) -> Path | None:
        """The EMA generator's grid on the fixed latents: ``fakes-<images>.png`` and ``latest.png``."""
        if not self.main:
            return None
        latents = self.sample_latents.split(16)
        labels = [None] * len(latents) if self.sample_labels is None else self.sample_labels.split(16)
        fakes = torch.cat([G_ema(z, res, alpha, y) for z, y in zip(latents, labels)])
        path = save_grid(fakes, self.path / "samples" / f"fakes-{images:012d}.png", columns=SAMPLE_COLUMNS)
        save_grid(fakes, self.path / "samples" / "latest.png", columns=SAMPLE_COLUMNS)
        if self.writer is not None:
            self.writer.add_images("samples", ((fakes.clamp(-1, 1) + 1) / 2).cpu(), images)
        return path

    def swd(self, G_ema: torch.nn.Module, reals_uint8: torch.Tensor, phase: Phase, alpha: float | None, images: int,
            n: int, seed: int, real_labels: torch.Tensor | None = None) -> None:
        """SWD (the ProGAN paper's metric) of the EMA generator against the data at this resolution
        (conditional: fakes of classes drawn from ``real_labels``, the real distribution).
        It leaves torch's global RNG alone, so a run that logs it trains exactly like one that does not."""
        if self._file is None:  # not rank 0
            return
        fake_labels = None if self.sample_labels is None else draw_labels(real_labels, n, seed)
        figures = swd_for_generator(G_ema, reals_uint8, phase.res, alpha, n=n, seed=seed, fake_labels=fake_labels)
        self._write({"kimg": round(images / 1000, 3), "res": phase.res, "phase": phase.name, **figures})
        if self.writer is not None:
            for k, v in figures.items():
                self.writer.add_scalar(f"metrics/{k}", v, images)

    def _write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        end = self._file.seek(0, 2)
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError as e:  # a full disk: cut the half-written line off, so that every line stays a record
            try:
                self._file.truncate(end)
            except OSError:
                pass
            raise files.WriteError(self.path / "log.jsonl", e, "the run log") from None


class StepProfiler:
    """``--profile`` and ``--cuda-profiler-steps`` over the steps of this invocation (counted from 0).

    ``--profile N`` lets :data:`PROFILE_SKIP_STEPS` steps pass, records the next N with
    ``torch.profiler`` on rank 0, writes the Chrome trace and an op summary to ``profile/``, and
    then tells the loop to stop. ``--cuda-profiler-steps`` brackets its window of steps with
    ``cudaProfilerStart``/``Stop`` (:class:`progan_fast.profiling.CudaProfilerWindow`).
    """

    def __init__(self, profile_steps: int | None, cuda_window: tuple[int, int] | None, device: torch.device,
                 run_dir: Path, *, main: bool, log: Callable[[str], None] = print) -> None:
        self.profile_steps = profile_steps
        self.cuda_window = None
        if cuda_window is not None:
            self.cuda_window = profiling.CudaProfilerWindow(*cuda_window, enabled=device.type == "cuda")
        self.device, self.folder, self.main, self.log = device, Path(run_dir) / "profile", main, log
        self._prof = None

    def before_step(self, steps_done: int) -> None:
        if self.cuda_window is not None:
            self.cuda_window.before_step(steps_done)
        if self.profile_steps is not None and steps_done == PROFILE_SKIP_STEPS and self.main:
            self._prof = profiling.torch_profiler(self.device.type)
            self._prof.__enter__()

    def after_step(self, steps_done: int, images: int) -> bool:
        """Called once ``steps_done`` steps are done (``images`` shown in all); True when
        ``--profile`` has recorded its steps, so the loop stops."""
        if self.cuda_window is not None:
            self.cuda_window.after_step(steps_done - 1)
        finished = self.profile_steps is not None and steps_done == PROFILE_SKIP_STEPS + self.profile_steps
        if finished and self._prof is not None:
            self._write(images)
        return finished

    def close(self, images: int) -> None:
        if self._prof is not None:  # the schedule ended before --profile's steps were recorded
            self._write(images)
        if self.cuda_window is not None:
            self.cuda_window.close()

    def _write(self, images: int) -> None:
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        trace = profiling.export_trace(prof, self.folder / f"trace-{images:012d}.json")
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        (self.folder / f"summary-{images:012d}.txt").write_text(table + "\n")
        self.log(f"profiled {self.profile_steps} steps: {trace} (open it at https://ui.perfetto.dev); "
                 f"top ops in {self.folder}/summary-{images:012d}.txt")
