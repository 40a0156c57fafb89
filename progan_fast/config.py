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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import augment as augmentmod
from . import data as datamod
from . import files, image_folder, pyramid_file
from .cli import UsageError
from .gan_state import AMP_DTYPES
from .losses import GP_RESOLUTIONS, LOSSES, PENALIZED
from .networks import NetworkConfig
from .schedule import OFFICIAL_TOTAL_KIMG, PAPER_BATCH, RESOLUTIONS, Phase, build_schedule, official_tables

#: Settings of the two presets. ``laptop`` (the default) is sized so that the run with no flags
#: finishes in about ten minutes on two CPU cores; its phases are a few hundred steps, too short
#: for the paper's EMA beta of 0.999 to follow G, hence 0.99. ``paper`` is the official code's v2
#: preset (README, "Recipe"): ``batch`` and ``lr`` "official" are the batch and learning-rate tables
#: of the official preset for the number of ranks that starts the run (:func:`schedule.official_tables`).
PRESETS = {
    "laptop": dict(max_res=32, fmap_base=512, fmap_max=64, kimg_per_phase=16.0, batch=32, lr=1e-3, ema_beta=0.99,
                   loss="nonsat", total_kimg=None),
    "paper": dict(max_res=256, fmap_base=8192, fmap_max=512, kimg_per_phase=600.0, batch="official", lr="official",
                  ema_beta=0.999, loss="wgan-gp", total_kimg=OFFICIAL_TOTAL_KIMG),
}
_LAPTOP = PRESETS["laptop"]

#: The command-line flag of each setting whose flag is not its name with dashes.
FLAGS = {"mbstd_group_size": "--mbstd-group"}
#: Settings whose values are per-resolution tables ``{res: value}`` (config.json: ``{"4": 128, ...}``).
TABLES = ("batch", "lr")
#: What a config written before a setting existed implies for it (so that such a run resumes unchanged):
#: the schedule ended one stabilize phase after the last fade, and the gradient penalty was on the
#: gradient at the phase's resolution; images were center-cropped RGB, seen by D without augmentation.
LEGACY = {"total_kimg": lambda d: None,
          "gp_resolution": lambda d: "phase" if d.get("loss") in PENALIZED else "max",
          "fit": lambda d: "crop", "channels": lambda d: 3, "augment": lambda d: None, "augment_p": lambda d: 1.0}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def resolution_table(value, what: str = "value") -> tuple[tuple[int, float], ...]:
    """A per-resolution setting as a sorted tuple of ``(res, value)`` pairs covering every resolution.

    ``value``: one number (every resolution), a ``{res: value}`` table (keys may be strings, as JSON
    has them), "official" (the official one-GPU preset's table), or for the batch None (the same
    table: what a run stored before tables).
    """
    if value is None and what == "batch":
        value = PAPER_BATCH
    if value == "official":  # the one-GPU preset's (the CLI picks the table for its number of ranks)
        value = official_tables(1)[0 if what == "batch" else 1]
    if isinstance(value, (tuple, list)):  # already pairs (dataclasses.replace passes them back in)
        value = dict(value)
    if isinstance(value, Mapping):
        try:
            items = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"a {what} table's keys must be resolutions, not {sorted(value)}") from None
        return tuple(sorted(items.items()))
    return tuple((r, value) for r in RESOLUTIONS)


def format_table(table: tuple[tuple[int, float], ...]) -> str:
    """``4:128,8:128,...``: what ``--batch``/``--lr`` accept (one number when every value is the same)."""
    values = {v for _, v in table}
    if len(values) == 1 and [r for r, _ in table] == list(RESOLUTIONS):
        return f"{next(iter(values)):g}"
    return ",".join(f"{r}:{v:g}" for r, v in table)


@dataclass(frozen=True)
class TrainConfig:
    """The settings that define a run. A resumed run must match them all, except that ``max_res``
    may grow (the finished schedule is continued to larger resolutions) and the batch of the
    resolutions not yet started may change (see :mod:`progan_fast.run_folder`).

    ``batch`` and ``lr`` are per resolution: given as one number or a ``{res: value}`` table, they
    are held as sorted ``(res, value)`` pairs over every resolution (:func:`resolution_table`)."""

    data: str | None = None
    max_res: int = _LAPTOP["max_res"]
    latent_size: int = 512
    fmap_base: int = _LAPTOP["fmap_base"]
    fmap_max: int = _LAPTOP["fmap_max"]
    mbstd_group_size: int = 4
    loss: str = _LAPTOP["loss"]
    kimg_per_phase: float = _LAPTOP["kimg_per_phase"]
    batch: tuple[tuple[int, int], ...] = _LAPTOP["batch"]  # global batch per resolution
    lr: tuple[tuple[int, float], ...] = _LAPTOP["lr"]  # Adam's learning rate (G's and D's) per resolution
    ema_beta: float = _LAPTOP["ema_beta"]
    seed: int = 0
    mirror: bool = False  # flip each real image left-right with probability 1/2 (x-flip augmentation)
    cond: bool = False  # class-conditional: labels from the data, one-hot into G, class logits out of D
    cond_weight: float = 1.0  # weight of D's auxiliary classification terms (the official cond_weight)
    fit: str = "crop"  # how non-square images are made square: crop, pad or stretch (image_folder.FITS)
    channels: int = 3  # image channels the networks make and judge: 3 (RGB) or 1 (grayscale)
    augment: str | None = None  # DiffAugment transforms D sees every image through, e.g. "color,translation,cutout"
    augment_p: float | str = 1.0  # the probability of each transform per image, or "ada" (adapted)
    total_kimg: float | None = _LAPTOP["total_kimg"]  # None: end one stabilize phase after the last fade
    gp_resolution: str = "max"  # "max": the penalty's gradient is w.r.t. D's input upscaled to max_res (official)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", resolution_table(self.batch, "batch"))
        object.__setattr__(self, "lr", resolution_table(self.lr, "learning rate"))

    def network_config(self, num_classes: int = 0) -> NetworkConfig:
        """The networks' shape; ``num_classes`` (from the data, for ``cond``) makes them conditional."""
        return NetworkConfig(self.max_res, self.latent_size, self.fmap_base, self.fmap_max, self.mbstd_group_size,
                             num_classes, image_channels=self.channels)

    def schedule(self) -> list[Phase]:
        """The run's phases (ValueError for a ``total_kimg`` that ends before the last fade)."""
        return build_schedule(self.max_res, self.kimg_per_phase, dict(self.batch), dict(self.lr), self.total_kimg)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in TABLES:
            d[name] = {str(r): v for r, v in getattr(self, name)}
        return d

    @classmethod
    def normalize_dict(cls, d: dict) -> dict:
        """A stored config as :meth:`to_dict` writes it today: the settings of :data:`LEGACY` that it
        lacks get the value that reproduces the version that wrote it, and tables their full form.
        Keys this version does not know, and other missing ones, are left so, for the caller to refuse."""
        d = dict(d)
        for name, legacy in LEGACY.items():
            if name not in d:
                d[name] = legacy(d)
        names = {f.name for f in dataclasses.fields(cls)}
        known = cls(**{k: v for k, v in d.items() if k in names}).to_dict()
        return {**d, **{k: v for k, v in known.items() if k in d}}  # other missing settings stay missing

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cls.normalize_dict(d).items() if k in names})

    def differences(self, other: TrainConfig, ignore: tuple[str, ...] = ("max_res",)) -> list[str]:
        """Human-readable ``--flag: saved in the run, requested now`` for every differing setting not in ``ignore``."""
        a, b = self.cli_values(), other.cli_values()
        return [f"{flag(k)}: {a[k]!r} in the run, {b[k]!r} now" for k in a if k not in ignore and a[k] != b[k]]

    def cli_values(self) -> dict:
        """Every setting as its flag would take it (tables as ``4:128,...``, no total kimg as ``none``)."""
        d = dataclasses.asdict(self)
        for name in TABLES:
            d[name] = format_table(getattr(self, name))
        if d["total_kimg"] is None:
            d["total_kimg"] = "none"
        return d

    def batch_at(self, res: int) -> int:
        return dict(self.batch)[res]

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
    channels_last: bool | str = False  # the networks' activations in NHWC (same math); "auto": timed per phase
    nvtx: bool = False
    profile_steps: int | None = None  # record this many steps with torch.profiler, then stop
    cuda_profiler_window: tuple[int, int] | None = None  # (start, stop) steps of this invocation
    swd_kimg: float | None = None  # log SWD of the EMA generator against the data every this many kimg
    swd_images: int = 1024
    max_skipped_steps: int = 10  # stop after this many consecutive steps with non-finite losses
    resume_command: str | None = None  # what to type to continue this run (the CLI fills it in)
    init_from: str | None = None  # a new run starts from this run folder's or checkpoint's weights
    # The TrainConfig fields a flag set (not a default or the preset): --mbstd-group lifts the check of
    # the per-rank batch against the group size; a resume keeps the run's batch and learning-rate
    # tables unless --batch or --lr is given; --init-from refuses an architecture flag that contradicts
    # its source.
    explicit: frozenset[str] = field(default_factory=frozenset)


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
    for name, what in (("batch", "batch"), ("lr", "learning rate")):
        table = dict(getattr(config, name))
        if sorted(table) != list(RESOLUTIONS):
            raise UsageError(f"--{name} needs a {what} for every resolution from 4 to 1024, not only for "
                             f"{', '.join(map(str, sorted(table)))}")
    for res, b in config.batch:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise UsageError(f"--batch must be at least 1, not {b}" + (f" (at {res}px)" if len(set(dict(config.batch).values())) > 1 else ""))
    for res, lr in config.lr:
        if not (isinstance(lr, (int, float)) and 0.0 < lr < 1.0):
            raise UsageError(f"--lr must be in (0, 1), not {lr}" + (f" (at {res}px)" if len(set(dict(config.lr).values())) > 1 else ""))
    if not config.kimg_per_phase > 0 or not math.isfinite(config.kimg_per_phase):
        raise UsageError(f"--kimg-per-phase must be a positive number, not {config.kimg_per_phase}")
    if config.total_kimg is not None and not (config.total_kimg > 0 and math.isfinite(config.total_kimg)):
        raise UsageError(f"--total-kimg must be a positive number or 'none', not {config.total_kimg}")
    if config.gp_resolution not in GP_RESOLUTIONS:
        raise UsageError(f"--gp-resolution must be one of {', '.join(GP_RESOLUTIONS)}, not {config.gp_resolution!r}")
    for name in ("latent_size", "fmap_base", "fmap_max", "mbstd_group_size"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    try:
        config.schedule()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (config.cond_weight >= 0.0 and math.isfinite(config.cond_weight)):
        raise UsageError(f"--cond-weight must be a non-negative number, not {config.cond_weight}")
    if config.fit not in image_folder.FITS:
        raise UsageError(f"--fit must be one of {', '.join(image_folder.FITS)}, not {config.fit!r}")
    if config.channels not in (1, 3):
        raise UsageError(f"--channels must be 1 or 3, not {config.channels!r}")
    try:
        if config.augment is not None:
            augmentmod.parse_policy(config.augment)
        augmentmod.parse_p(str(config.augment_p))
    except ValueError as e:
        raise UsageError(str(e)) from None

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
    if options.channels_last not in (True, False, "auto"):
        raise UsageError(f"--channels-last must be on, off or auto, not {options.channels_last!r}")
    if options.max_skipped_steps < 1:
        raise UsageError(f"--max-skipped-steps must be at least 1, not {options.max_skipped_steps}")


def load_data(config: TrainConfig, run_dir: Path, progress: bool) -> datamod.ImageDataset:
    """The run's dataset: the embedded set, or ``config.data``: a folder or a zip archive of images
    (decoded through the cache in ``run_dir``), or a prepared dataset (memory-mapped as it is)."""
    if config.data is None:
        if config.cond:
            raise datamod.DataError("--cond needs labelled data: the embedded emoji set has no classes; pass --data "
                                    "with class subfolders or a dataset.json")
        return datamod.load_default_dataset(config.max_res, config.channels)
    path = Path(config.data)
    cache = dict(cache_dir=run_dir / "cache", progress=progress, labels=config.cond, fit=config.fit,
                 channels=config.channels)
    if not path.is_file():  # a folder (or nothing there: the folder loader says so)
        return image_folder.load_image_folder(path, config.max_res, **cache)
    if files.is_temporary(path):  # complete or not, it was never renamed to its name: its writer was killed
        raise datamod.DataError(f"--data {path} is the temporary file of a write that never finished (its process "
                                "was killed); prepare the dataset again with python -m progan_fast.dataset")
    if path.suffix.lower() in image_folder.IMAGE_EXTENSIONS:
        raise datamod.DataError(f"--data {path} is an image file; pass the folder or zip archive that holds the "
                                "images, or a prepared dataset (python -m progan_fast.dataset)")
    if path.suffix.lower() == ".zip" or (zipfile.is_zipfile(path) and not pyramid_file.is_prepared(path)):
        return image_folder.load_image_zip(path, config.max_res, **cache)
    dataset = pyramid_file.load_prepared(path, config.max_res, config.fit, config.channels)
    if config.cond and dataset.labels is None:
        raise datamod.DataError(f"--cond needs labels, and the prepared dataset {path} has none; prepare it again "
                                "with python -m progan_fast.dataset ... --labels")
    return dataset
