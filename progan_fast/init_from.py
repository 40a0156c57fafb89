"""``--init-from RUN_OR_CKPT``: a new run that starts from another run's weights.

The new run has its own folder, data, schedule settings and a fresh optimizer; from the source it
takes G, D and G_ema, and the settings that shape them (:data:`ARCHITECTURE`). It starts at the
resolution the source had reached (as ``generate`` reads a checkpoint's position), in that
resolution's stabilize phase, and grows from there to its own ``--max-res``. Its image count
starts where that phase starts in its own schedule, as if it had trained the phases before it.

- A flag given on the command line that contradicts the source's architecture is refused, naming
  the setting; architecture flags not given take the source's values.
- Class-conditional: G's input is the latent then the one-hot label, D's last layer the score then
  the class logits. When the source and the new run have different numbers of classes (0 for an
  unconditional run), the latent's columns of G's input and D's score row come from the source,
  and the label columns and class rows keep the new run's fresh initialization.
- ``config.json`` records the source checkpoint's path and SHA-256; a resume of the new run reads
  its own checkpoints and never the source (:func:`settle` takes the architecture from the run's
  ``config.json`` then).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, sha256_of_file
from .cli import UsageError
from .config import TrainConfig
from .gan_state import GANState
from .inference import REQUIRED_CONFIG, find_checkpoint, position
from .networks import load_grown_state_dict
from .run_folder import RunFolder
from .schedule import Phase

#: The settings that shape the networks: a run started from another takes them from it.
ARCHITECTURE = ("latent_size", "fmap_base", "fmap_max", "mbstd_group_size", "channels")
#: The command-line flag of each.
FLAGS = {"latent_size": "--latent-size", "fmap_base": "--fmap-base", "fmap_max": "--fmap-max",
         "mbstd_group_size": "--mbstd-group", "channels": "--channels"}
_NETWORKS = ("G", "D", "G_ema")


@dataclass
class Source:
    """The checkpoint a run starts from."""

    path: Path
    sha256: str
    state: dict
    config: TrainConfig
    res: int  # the resolution it had reached: the new run starts in its stabilize phase
    class_names: list[str] | None

    def record(self) -> dict:
        """What ``config.json`` keeps of it."""
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "res": self.res,
                "images": int(self.state.get("images", 0))}


def read_source(path: Path) -> Source:
    """The checkpoint file, or a run folder's newest checkpoint; :class:`CheckpointError` if unusable."""
    try:
        ckpt, _ = find_checkpoint(Path(path))
        state = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"--init-from: {e}") from None
    cfg = state.get("config")
    missing = [k for k in REQUIRED_CONFIG if not isinstance(cfg, dict) or k not in cfg]
    missing += [name for name in (*_NETWORKS, "phase_index", "step") if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} holds no usable run to start from (missing: {', '.join(missing)})")
    try:
        config = TrainConfig.from_dict(cfg)
        res, _ = position(config, int(state["phase_index"]), int(state["step"]))
    except (TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"checkpoint {ckpt} holds no usable run config ({e})") from None
    names = state.get("class_names") if config.cond else None
    return Source(ckpt, sha256_of_file(ckpt), state, config, res, list(names) if names else None)


def with_architecture(config: TrainConfig, source: TrainConfig, given: frozenset[str], where: str) -> TrainConfig:
    """``config`` with ``source``'s architecture; a setting in ``given`` (set by a flag) must agree."""
    for name in ARCHITECTURE:
        mine, theirs = getattr(config, name), getattr(source, name)
        if name in given and mine != theirs:
            raise UsageError(f"{FLAGS[name]} {mine} contradicts {where}, whose {name} is {theirs}: a run started "
                             f"with --init-from takes its network shape from the source; drop {FLAGS[name]}")
    return dataclasses.replace(config, **{name: getattr(source, name) for name in ARCHITECTURE})


def resuming(folder: RunFolder, resume: str | None) -> bool:
    """Whether this invocation continues the run in ``folder`` (then its own checkpoint holds the weights)."""
    return resume is not None and (resume != "auto" or bool(list_checkpoints(folder.checkpoints)))


def settle(config: TrainConfig, init_from: str | None, given: frozenset[str], folder: RunFolder,
           resume: str | None) -> tuple[TrainConfig, Source | None]:
    """The run's settings, and the source to load (None when there is none, or on a resume).

    A resume of a run that was started from another takes the architecture from the run's own
    ``config.json``: the source is not read again (it may be gone)."""
    if resuming(folder, resume):
        record = folder.saved_init_from()
        saved = folder.saved_config()
        if record is not None and saved is not None:
            where = f"the run in {folder.path} (started from {record.get('path')})"
            config = with_architecture(config, saved, given, where)
        return config, None
    if init_from is None:
        return config, None
    source = read_source(Path(init_from))
    config = with_architecture(config, source.config, given, f"--init-from {source.path}")
    if config.max_res < source.res:
        raise UsageError(f"--max-res {config.max_res} is lower than the resolution --init-from {source.path} "
                         f"had reached ({source.res}px); a run started from it grows from there, it cannot shrink")
    return config, source


def start_phase(phases: list[Phase], res: int) -> int:
    """The index of the stabilize phase at ``res``."""
    return next(p.index for p in phases if p.res == res and not p.fading)


def _resolution_of(key: str) -> int:
    """The resolution a parameter belongs to (``blocks.16.0.weight`` -> 16; shared layers -> 4)."""
    parts = key.split(".")
    return int(parts[1]) if parts[0] in ("blocks", "to_rgb", "from_rgb") else 4


def load_weights(state: GANState, source: Source, class_names: list[str] | None, log: Callable[[str], None]) -> None:
    """Copy ``source``'s G, D and G_ema into ``state`` (freshly created for the new run, on its
    device; ``class_names``: the new run's classes, None if unconditional)."""
    num_classes = len(class_names or ())
    max_res = state.config.max_res
    source_classes = len(source.class_names or ())
    latent = state.config.latent_size
    try:
        for name in _NETWORKS:
            net = getattr(state, name)
            own = net.state_dict()
            weights = {k: v for k, v in source.state[name].items() if _resolution_of(k) <= max_res}
            if source_classes != num_classes:
                weights = {**weights, **_class_parts_kept_fresh(name, weights, own, latent)}
            missing = load_grown_state_dict(net, {k: v.to(own[k].device) if k in own else v
                                                  for k, v in weights.items()})
            not_grown = [k for k in missing if _resolution_of(k) <= source.config.max_res]
            if not_grown:
                raise ValueError(f"{name} lacks {', '.join(not_grown[:3])}")
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"--init-from {source.path} does not fit this network: {first}") from None
    if source_classes != num_classes:
        log(f"--init-from: the source has {source_classes or 'no'} classes, this run {num_classes or 'none'}: "
            f"G's label input and D's class outputs start afresh; every other weight is the source's")
    elif num_classes and source.class_names != class_names:
        log(f"note: --init-from: class k of this run ({', '.join(class_names[:5])}"
            f"{', ...' if num_classes > 5 else ''}) starts from the source's class k "
            f"({', '.join(source.class_names[:5])}{', ...' if num_classes > 5 else ''})")


def _class_parts_kept_fresh(name: str, weights: dict, own: dict, latent: int) -> dict:
    """The tensors whose class parts keep the new run's initialization, the rest from ``weights``."""
    if name in ("G", "G_ema"):
        mixed = own["input.weight"].clone()
        mixed[:, :latent] = weights["input.weight"][:, :latent]
        return {"input.weight": mixed}
    kept = {}
    for key in ("output.out.weight", "output.out.bias"):
        mixed = own[key].clone()
        mixed[:1] = weights[key][:1]  # row 0 is the real/fake score, the rest are class logits
        kept[key] = mixed
    return kept
