"""Load a run's EMA generator from a checkpoint, for metrics and generation (read-only on the run).

The generator is evaluated where the checkpoint's training was: at the resolution and fade of its
position in the schedule. A checkpoint taken at a phase boundary points at step 0 of the next
phase (a new resolution whose layers have not trained yet), so it is read as the end of the phase
just finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as datamod
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .config import TrainConfig, load_data
from .networks import Generator

#: Config keys without which a checkpoint's generator cannot be rebuilt.
REQUIRED_CONFIG = ("max_res", "latent_size", "fmap_base", "fmap_max", "kimg_per_phase", "batch")


@dataclass
class LoadedGenerator:
    G: Generator
    config: TrainConfig
    res: int
    alpha: float | None
    images: int
    path: Path
    run_dir: Path | None
    class_names: list[str] | None = None  # a conditional run's classes

    def describe(self) -> str:
        fade = "stable" if self.alpha is None else f"fade alpha {self.alpha:.3f}"
        return f"{self.path} at {self.images / 1000:.1f} kimg, {self.res}px {fade} (EMA generator)"


def find_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """A checkpoint file, or a run folder's newest checkpoint -> (checkpoint, run folder or None)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = list_checkpoints(folder)
        if not found:
            raise CheckpointError(f"no checkpoint (ckpt-*.pt) in {folder}; is {path} a progan_fast run folder?")
        run_dir = path if folder != path else (path.parent if path.name == "checkpoints" else None)
        return found[-1], run_dir
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return path, run_dir


def position(config: TrainConfig, phase_index: int, step: int) -> tuple[int, float | None]:
    """(resolution, alpha) at which the networks were training at this schedule position."""
    phases = config.schedule()
    if phase_index >= len(phases) or (step == 0 and phase_index > 0):
        last = phases[min(phase_index, len(phases)) - 1]
        return last.res, (1.0 if last.fading else None)
    phase = phases[max(phase_index, 0)]
    return phase.res, phase.alpha(step)


def load_generator(path: Path, device: torch.device | str = "cpu") -> LoadedGenerator:
    ckpt_path, run_dir = find_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    cfg = state.get("config")
    if not isinstance(cfg, dict) or any(k not in cfg for k in REQUIRED_CONFIG):
        missing = [k for k in REQUIRED_CONFIG if not isinstance(cfg, dict) or k not in cfg]
        raise CheckpointError(f"checkpoint {ckpt_path} holds no usable run config (missing: {', '.join(missing)})")
    try:
        config = TrainConfig.from_dict(cfg)
        class_names = state.get("class_names")
        G = Generator(config.network_config(len(class_names or ())))
        G.load_state_dict(state["G_ema"])
        res, alpha = position(config, int(state["phase_index"]), int(state["step"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt_path} does not hold a usable generator ({first})") from None
    G.requires_grad_(False).eval().to(device)
    images = int(state.get("images", 0))
    return LoadedGenerator(G, config, res, alpha, images, ckpt_path, run_dir, class_names)


def load_run_data(loaded: LoadedGenerator) -> datamod.ImageDataset:
    """The run's dataset (the embedded set, or its folder through the run's cache)."""
    cache_root = loaded.run_dir if loaded.run_dir is not None else loaded.path.parent
    return load_data(loaded.config, cache_root, progress=False)
