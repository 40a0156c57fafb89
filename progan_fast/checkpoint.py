"""Checkpoint files: atomic writes, the last few kept, loading that executes no pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with
``torch.save`` to a temporary file in the same folder, flushed and fsynced, then renamed over its
final name, so a crash at any moment leaves either the old set of checkpoints or the new one,
never a torn file. Loading uses ``torch.load(weights_only=True)``, which refuses anything but
those plain types.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from . import files

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; ``str(e)`` names the file and the problem."""


def checkpoint_name(images: int) -> str:
    return f"ckpt-{images:012d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (by images shown, which the name holds)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def sha256_of_file(path: Path) -> str:
    """The file's SHA-256, hex (what a run started with --init-from records of its source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_torch_save(obj: object, path: Path, what: str = "checkpoint") -> None:
    """``torch.save(obj)`` to ``path``, all or nothing (:func:`progan_fast.files.atomic_write`);
    raises :class:`~progan_fast.files.WriteError` (an OSError) naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A file object, not a path: torch.save then raises the OSError of a failed write (a full disk)
    # instead of its zip writer's RuntimeError.
    files.write_bytes(path, lambda f: torch.save(obj, f), what)


def remove_torn_writes(folder: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that never finished (a process killed in
    the middle of :func:`atomic_torch_save`); returns them. Call it only while no other process
    writes to ``folder`` (one trainer owns a run folder)."""
    if not folder.is_dir():
        return []
    torn = [p for p in folder.iterdir() if p.name.startswith(".ckpt-") and files.is_temporary(p)]
    for p in torn:
        p.unlink(missing_ok=True)
    return torn


def save_checkpoint(folder: Path, images: int, payload: dict, keep: int = 3) -> Path:
    """Write ``payload`` as the checkpoint at ``images`` and delete all but the newest ``keep``."""
    path = folder / checkpoint_name(images)
    atomic_torch_save({"format_version": FORMAT_VERSION, **payload}, path)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


_MISSING = object()


def check_compatible(state: dict, expected_config: dict, ignore: tuple[str, ...] = (), path: Path | str | None = None) -> None:
    """Refuse a checkpoint made with another configuration.

    Compares ``state["config"]`` with ``expected_config`` key by key (keys in ``ignore`` are
    skipped, e.g. ``("max_res",)`` when a run may grow) and raises one :class:`CheckpointError`
    naming every differing key with both values, including keys that only one side has (a
    checkpoint from a newer progan_fast with a setting this one does not know is refused, not
    silently read with that setting dropped). A setting added after some checkpoints were written
    is filled in before this check, with the value that reproduces those checkpoints
    (``config.TrainConfig.normalize_dict``).
    """
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} holds no run configuration")
    diffs = []
    for key in sorted(set(saved) | set(expected_config), key=lambda k: (k not in expected_config, str(k))):
        if key in ignore:
            continue
        a, b = saved.get(key, _MISSING), expected_config.get(key, _MISSING)
        if a is _MISSING:
            diffs.append(f"{key}: not in the checkpoint, {b!r} expected")
        elif b is _MISSING:
            diffs.append(f"{key}: {a!r} in the checkpoint, unknown to this progan_fast")
        elif a != b:
            diffs.append(f"{key}: {a!r} in the checkpoint, {b!r} expected")
    if diffs:
        raise CheckpointError(f"{where} was made with a different configuration: " + "; ".join(diffs))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint; any problem becomes one :class:`CheckpointError` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else would get torch's weights_only advice
        what = "an empty file" if not magic else "not a torch.save archive"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a progan_fast checkpoint ({what})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for torn/foreign files; the message is what matters
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a progan_fast checkpoint ({first_line[:200]})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"checkpoint {path} is not a progan_fast checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format_version']}, newer than this progan_fast "
            f"reads ({FORMAT_VERSION}); upgrade progan_fast"
        )
    return state
