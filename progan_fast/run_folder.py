"""A run's folder (``--out``): its config file, its checkpoints, and what a resume reads back.

::

    config.json          the settings that define the run (compared on resume)
    checkpoints/         ckpt-<images shown>.pt, written atomically, the newest few kept

(What the run records as it trains -- ``log.jsonl``, ``tensorboard/``, ``samples/``,
``profile/`` -- is :mod:`progan_fast.run_log`'s.)

The resume policy, which never lets one run write into another's folder:

- without ``--resume``, a folder that already holds a run (a config file or a checkpoint) is
  refused, with the settings that differ named;
- ``--resume auto`` continues from the newest checkpoint, or starts a new run there if there is none;
- ``--resume CKPT`` continues from that checkpoint.

A resumed run must have the same settings as the folder's config and the checkpoint's, except that
``--max-res`` may grow: a finished run then continues its schedule to larger resolutions, with the
new layers freshly initialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, check_compatible, list_checkpoints, load_checkpoint, remove_torn_writes,
                         save_checkpoint)
from .cli import UsageError
from .config import TrainConfig
from .data import ImageDataset
from .gan_state import GANState
from .networks import load_grown_state_dict
from .schedule import Phase


class RunFolder:
    """The folder ``path`` of one run, read and written by one trainer (rank 0 writes)."""

    def __init__(self, path: Path, log: Callable[[str], None] = print) -> None:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} exists and is not a folder")
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.log = log

    # ----- config.json ---------------------------------------------------------------------------

    def saved_config(self) -> TrainConfig | None:
        path = self.path / "config.json"
        if not path.is_file():
            return None
        try:
            return TrainConfig.from_dict(json.loads(path.read_text())["config"])
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} is not a progan_fast run config ({e})") from None

    def saved_init_from(self) -> dict | None:
        """What ``config.json`` records of the checkpoint the run started from (``--init-from``), or None."""
        path = self.path / "config.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text()).get("init_from")
        except (ValueError, AttributeError) as e:
            raise UsageError(f"{path} is not a progan_fast run config ({e})") from None
        return record if isinstance(record, dict) else None

    def write_config(self, config: TrainConfig, dataset_source: str, init_from: dict | None = None) -> None:
        """``init_from``: the source checkpoint's record, for a run started with ``--init-from``."""
        self.path.mkdir(parents=True, exist_ok=True)
        document = {"config": config.to_dict(), "dataset": dataset_source}
        if init_from is not None:
            document["init_from"] = init_from
        text = json.dumps(document, indent=2)
        tmp = self.path / ".config.json.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(self.path / "config.json")

    # ----- resume policy -------------------------------------------------------------------------

    def checkpoint_to_resume(self, config: TrainConfig, resume: str | None) -> dict | None:
        """The checkpoint this invocation continues from (``resume``: None, "auto" or a path), or
        None for a new run; refuses what the resume policy above forbids."""
        saved = self.saved_config()
        existing = list_checkpoints(self.checkpoints)
        if resume is None:
            if saved is not None or existing:
                diffs = saved.differences(config) if saved else []
                detail = f" with other settings ({'; '.join(diffs)})" if diffs else ""
                raise UsageError(
                    f"run directory {self.path} already holds a run{detail}; pass --resume auto to "
                    f"continue it, or choose another --out"
                )
            return None
        if saved is not None:  # never let a resume rewrite another run's folder
            _check_same_run(saved, config, f"the run in {self.path}")
        if resume == "auto":
            if not existing:
                self.log(f"nothing to resume in {self.path}: starting a new run there")
                return None
            path = existing[-1]
        else:
            path = Path(resume)
        state = load_checkpoint(path)
        try:
            ckpt_config = TrainConfig.from_dict(state["config"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} holds no valid run config ({e})") from None
        _check_same_run(ckpt_config, config, f"checkpoint {path}")
        # Also refuses settings this version does not know (from_dict above drops them silently).
        check_compatible(state, config.to_dict(), ignore=("max_res",), path=path)
        self.log(f"resuming from {path}")
        state["_path"] = str(path)
        return state

    # ----- checkpoints ---------------------------------------------------------------------------

    def remove_torn_writes(self) -> None:
        for torn in remove_torn_writes(self.checkpoints):
            self.log(f"removed {torn.name}, a checkpoint write that was killed before it finished")

    def write_checkpoint(self, state: GANState, config: TrainConfig, phase_index: int, step: int, images: int,
                         data_fingerprint: str, device: torch.device, keep: int,
                         auto_choices: dict[str, str] | None = None, class_names: list[str] | None = None) -> Path:
        """Write the checkpoint at ``images`` shown (schedule position ``phase_index``, ``step``)
        and delete all but the newest ``keep``. ``auto_choices`` (``--backend auto``'s
        ``{op signature: backend}``) are kept so that a resume computes every op as before."""
        payload = {
            "config": config.to_dict(),
            "phase_index": phase_index,
            "step": step,
            "images": images,
            "G": state.G.state_dict(),
            "D": state.D.state_dict(),
            "G_ema": state.G_ema.state_dict(),
            "opt_G": state.opt_G.state_dict(),
            "opt_D": state.opt_D.state_dict(),
            # Every rank's generators are in the same state, so rank 0's resume any number of ranks.
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "data_fingerprint": data_fingerprint,
            "class_names": class_names,  # a conditional run's classes (generate and metrics name them)
            "loss_scale": {name: scaler.state_dict() for name, scaler in (("D", state.scaler_D), ("G", state.scaler_G))
                           if scaler is not None},
        }
        if auto_choices is not None:
            payload["auto_choices"] = dict(auto_choices)
        return save_checkpoint(self.checkpoints, images, payload, keep=keep)


def _check_same_run(saved: TrainConfig, config: TrainConfig, where: str) -> None:
    diffs = saved.differences(config)
    if diffs:
        raise UsageError(f"{where} was made with other settings; refusing to mix them: " + "; ".join(diffs))
    if config.max_res < saved.max_res:
        raise UsageError(
            f"{where} trains up to --max-res {saved.max_res}; it can grow but not shrink to {config.max_res}"
        )


def restore(ckpt: dict, state: GANState, config: TrainConfig, dataset: ImageDataset, phases: list[Phase],
            device: torch.device, log: Callable[[str], None] = print) -> tuple[int, int]:
    """Load a checkpoint from :meth:`RunFolder.checkpoint_to_resume` into ``state`` and torch's
    random generators; returns the schedule position ``(phase_index, step)`` to continue from."""
    path = ckpt["_path"]
    old_config = TrainConfig.from_dict(ckpt["config"])
    if config.cond and ckpt.get("class_names") != dataset.class_names:
        raise CheckpointError(f"checkpoint {path} was trained on the classes {ckpt.get('class_names')}; the data now "
                              f"has {dataset.class_names}: a conditional run cannot change its classes")
    try:
        for name in ("G", "D", "G_ema"):
            missing = load_grown_state_dict(getattr(state, name), ckpt[name])
            if missing and old_config.max_res == config.max_res:
                raise ValueError(f"{name} lacks {', '.join(missing[:3])}")
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this network: {str(e).splitlines()[0][:300]}") from None
    if old_config.max_res == config.max_res and ckpt.get("data_fingerprint") != dataset.fingerprint():
        # Not refused: adding images to a folder is a normal thing to do. But the user should
        # know that the continuation no longer repeats what an uninterrupted run would have done.
        log(f"note: the images in {dataset.source} changed since {path} was written; "
            f"continuing with the current set")
    phase_index, step = int(ckpt["phase_index"]), int(ckpt["step"])
    if phase_index < len(phases) and step > 0:
        # Mid-phase: Adam's moments continue. At a phase start they are reset anyway.
        state.opt_G.load_state_dict(ckpt["opt_G"])
        state.opt_D.load_state_dict(ckpt["opt_D"])
    scales = ckpt.get("loss_scale") or {}
    for name in ("D", "G"):  # fp16 loss scale: kept across a resume when both runs use fp16
        scaler = getattr(state, f"scaler_{name}")
        if scaler is not None and name in scales:
            scaler.load_state_dict(scales[name])
    torch.set_rng_state(ckpt["rng_cpu"])
    rng_cuda = ckpt.get("rng_cuda")
    if isinstance(rng_cuda, list):  # older checkpoints hold one state per visible GPU; training used the first
        rng_cuda = rng_cuda[0] if rng_cuda else None
    if device.type == "cuda" and rng_cuda is not None:
        torch.cuda.set_rng_state(rng_cuda, device)
    if old_config.max_res < config.max_res:
        log(f"growing the run from {old_config.max_res}px to {config.max_res}px")
    return phase_index, step
