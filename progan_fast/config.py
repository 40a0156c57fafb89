"""The settings of a training run, their one check, and the data they name.

- :class:`TrainConfig`: what defines the run (networks, loss, schedule, data, seed). It is saved in
  ``config.json`` and in every checkpoint, and a resume must repeat it.
- :class:`RunOptions`: how this invocation runs it (device, backend, logging, profiling, ...),
  free to change between a run and its resume.
- :data:`PRESETS`: the values ``--preset`` fills in.
- :func:`validate`: every check of the settings' own values, in one place, raising
  :class:`~progan_fast.cli.UsageError` with the message the CLI prints.
- :func:`load_data`: the dataset a config names.
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import data as datamod
from . import image_folder, pyramid_file
from .cli import UsageError
from .gan_state import AMP_DTYPES
from .losses import LOSSES
from .networks import NetworkConfig

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
    mirror: bool = False  # flip each real image left-right with probability 1/2 (x-flip augmentation)
    cond: bool = False  # class-conditional: labels from the data, one-hot into G, class logits out of D
    cond_weight: float = 1.0  # weight of D's auxiliary classification terms (the official cond_weight)

    def network_config(self, num_classes: int = 0) -> NetworkConfig:
        """The networks' shape; ``num_classes`` (from the data, for ``cond``) makes them conditional."""
        return NetworkConfig(self.max_res, self.latent_size, self.fmap_base, self.fmap_max, self.mbstd_group_size,
                             num_classes)

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
    channels_last: bool = False  # the networks' activations in NHWC (same math, other memory order)
    nvtx: bool = False
    profile_steps: int | None = None  # record this many steps with torch.profiler, then stop
    cuda_profiler_window: tuple[int, int] | None = None  # (start, stop) steps of this invocation
    swd_kimg: float | None = None  # log SWD of the EMA generator against the data every this many kimg
    swd_images: int = 1024
    max_skipped_steps: int = 10  # stop after this many consecutive steps with non-finite losses
    resume_command: str | None = None  # what to type to continue this run (the CLI fills it in)
    init_from: str | None = None  # a new run starts from this run folder's or checkpoint's weights
    given_settings: frozenset[str] = frozenset()  # TrainConfig fields set by a flag (not a default or preset)


def validate(config: TrainConfig, options: RunOptions) -> None:
    """Raise :class:`UsageError` for the first setting whose value is not allowed.

    These are the checks a setting fails on its own. What depends on the machine or the run folder
    (the device, the backend, the number of ranks, the dataset's size, a run to resume) is checked
    where the trainer finds it out.
    """
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
    if not (config.cond_weight >= 0.0 and math.isfinite(config.cond_weight)):
        raise UsageError(f"--cond-weight must be a non-negative number, not {config.cond_weight}")

    for name in ("log_kimg", "sample_kimg", "checkpoint_kimg"):
        if not getattr(options, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if options.swd_kimg is not None and not options.swd_kimg > 0:
        raise UsageError("--swd-kimg must be positive")
    if options.swd_images < 2:
        raise UsageError(f"--swd-images must be at least 2, not {options.swd_images}")
    if options.keep_checkpoints < 1:
        raise UsageError("--keep-checkpoints must be at least 1")
    if options.amp is not None and options.amp not in AMP_DTYPES:
        raise UsageError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, not {options.amp!r}")
    if options.profile_steps is not None and options.profile_steps < 1:
        raise UsageError(f"--profile must be at least 1 step, not {options.profile_steps}")
    if options.max_skipped_steps < 1:
        raise UsageError(f"--max-skipped-steps must be at least 1, not {options.max_skipped_steps}")


def load_data(config: TrainConfig, run_dir: Path, progress: bool) -> datamod.ImageDataset:
    """The run's dataset: the embedded set, or ``config.data``: a folder or a zip archive of images
    (decoded through the cache in ``run_dir``), or a prepared dataset (memory-mapped as it is)."""
    if config.data is None:
        if config.cond:
            raise datamod.DataError("--cond needs labelled data: the embedded emoji set has no classes; pass --data "
                                    "with class subfolders or a dataset.json")
        return datamod.load_default_dataset(config.max_res)
    path = Path(config.data)
    cache = dict(cache_dir=run_dir / "cache", progress=progress, labels=config.cond)
    if not path.is_file():  # a folder (or nothing there: the folder loader says so)
        return image_folder.load_image_folder(path, config.max_res, **cache)
    if path.suffix.lower() in image_folder.IMAGE_EXTENSIONS:
        raise datamod.DataError(f"--data {path} is an image file; pass the folder or zip archive that holds the "
                                "images, or a prepared dataset (python -m progan_fast.dataset)")
    if path.suffix.lower() == ".zip" or (zipfile.is_zipfile(path) and not pyramid_file.is_prepared(path)):
        return image_folder.load_image_zip(path, config.max_res, **cache)
    dataset = pyramid_file.load_prepared(path, config.max_res)
    if config.cond and dataset.labels is None:
        raise datamod.DataError(f"--cond needs labels, and the prepared dataset {path} has none; prepare it again "
                                "with python -m progan_fast.dataset ... --labels")
    return dataset
