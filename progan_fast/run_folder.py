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
``--max-res`` may grow (without ``--total-kimg``): a finished run then continues its schedule to larger
resolutions, with the new layers freshly initialised; and ``--batch`` may change the batch of the
resolutions the run has not started yet (one that ran out of memory at 256px resumes with a smaller
batch there). Without ``--batch`` or ``--lr``, a resume keeps the run's tables. A run written by an
earlier version lacks the newer settings; they take the values that reproduce it
(:data:`progan_fast.config.LEGACY`), and a refusal names the flags that continue it as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import files
from .checkpoint import (CheckpointError, check_compatible, list_checkpoints, load_checkpoint, remove_torn_writes,
                         save_checkpoint)
from .cli import UsageError
from .config import TABLES, TrainConfig, flag
from .data import ImageDataset
from .gan_state import GANState
from .networks import load_grown_state_dict
from .schedule import RESOLUTIONS, Phase


class RunFolder:
    """The folder ``path`` of one run, read and written by one trainer (rank 0 writes)."""

    def __init__(self, path: Path, log: Callable[[str], None] = print) -> None:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} exists and is not a folder")
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.log = log
        self.lock: RunLock | None = None  # held from acquire_lock() to release_lock()

    # ----- one run per folder --------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """Take the folder's lock for this process (see :class:`RunLock`), creating the folder if
        needed; UsageError naming the other process if a live one holds it."""
        if self.lock is None:
            self.lock = RunLock.acquire(self.path, self.log)

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
        files.write_bytes(self.path / "config.json", lambda f: f.write((text + "\n").encode()), "the run's config")

    # ----- resume policy -------------------------------------------------------------------------

    def checkpoint_to_resume(self, config: TrainConfig, resume: str | None,
                             explicit: frozenset[str] = frozenset()) -> tuple[TrainConfig, dict | None]:
        """``(config, checkpoint)``: the settings this invocation trains with and the checkpoint it
        continues from (``resume``: None, "auto" or a path), or None for a new run; refuses what the
        resume policy above forbids. ``explicit``: the settings given on the command line; a resume
        keeps the run's batch and learning-rate tables unless ``--batch``/``--lr`` is given (the
        preset's tables depend on the number of ranks, and a run may resume with any number)."""
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
            return config, None
        if saved is not None:  # never let a resume rewrite another run's folder
            config = _keep_tables(saved, config, explicit)
            _check_same_run(saved, config, f"the run in {self.path}")
        if resume == "auto":
            if not existing:
                self.log(f"nothing to resume in {self.path}: starting a new run there")
                return config, None
            path = existing[-1]
        else:
            path = Path(resume)
        state = load_checkpoint(path)
        try:
            ckpt_config = TrainConfig.from_dict(state["config"])
            stored = {**state, "config": TrainConfig.normalize_dict(state["config"])}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} holds no valid run config ({e})") from None
        config = _keep_tables(ckpt_config, config, explicit)
        _check_same_run(ckpt_config, config, f"checkpoint {path}")
        # Also refuses settings this version does not know (from_dict above drops them silently).
        check_compatible(stored, config.to_dict(), ignore=("max_res", "batch"), path=path)
        _check_batch_change(ckpt_config, config, int(state["phase_index"]), int(state["step"]), f"checkpoint {path}",
                            self.log)
        self.log(f"resuming from {path}")
        state["_path"] = str(path)
        return config, state

    # ----- checkpoints ---------------------------------------------------------------------------

    def remove_torn_writes(self) -> None:
        """Delete the temporary files of checkpoint writes that were killed; only while this process
        holds the folder's lock (they could be a live run's write in progress otherwise)."""
        if self.lock is None:
            raise RuntimeError("remove_torn_writes needs the run folder's lock (RunFolder.acquire_lock)")
        for torn in remove_torn_writes(self.checkpoints):
            self.log(f"removed {torn.name}, a checkpoint write that was killed before it finished")

    def write_checkpoint(self, state: GANState, config: TrainConfig, phase_index: int, step: int, images: int,
                         data_fingerprint: str, device: torch.device, keep: int,
                         auto_choices: dict[str, str] | None = None, class_names: list[str] | None = None,
                         step_choices: dict[str, dict] | None = None,
                         augment_state: dict | None = None) -> Path:
        """Write the checkpoint at ``images`` shown (schedule position ``phase_index``, ``step``)
        and delete all but the newest ``keep``. ``auto_choices`` (``--backend auto``'s
        ``{op signature: backend}``) are kept so that a resume computes every op as before, and
        ``step_choices`` (the step check's setup by phase index, :mod:`progan_fast.step_choice`)
        so that a resume inside a phase trains it with the same setup."""
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
        if augment_state is not None:  # --augment's probability (ADA moves it) and ADA's running statistic
            payload["augment"] = augment_state
        if step_choices is not None:
            payload["step_choices"] = {k: dict(v) for k, v in step_choices.items()}
        try:
            return save_checkpoint(self.checkpoints, images, payload, keep=keep)
        except files.WriteError as e:  # nothing of this one was left; the earlier ones were not touched
            kept = list_checkpoints(self.checkpoints)
            e.note = (f"the checkpoints already in {self.checkpoints} are intact (newest: {kept[-1].name}); "
                      f"free some space, then continue with --resume auto") if kept else \
                "no checkpoint of this run was written yet"
            raise


class RunLock:
    """One live process per run folder: an ``fcntl.flock`` on ``RUN/.lock``, which also holds a
    record of the holder (pid, host, start time) for the message a second process gets.

    The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run
    (its file still there, its record naming a dead pid) is simply taken again; the record then
    says whose it was. A clean release deletes the file while still holding the lock; a process
    that opened the file before that finds, once it holds the lock, that the path no longer names
    the file it locked, and tries again.
    """

    FILE = ".lock"

    def __init__(self, path: Path, fd: int, created_folder: bool) -> None:
        self.path, self.fd, self.created_folder = path, fd, created_folder

    @classmethod
    def acquire(cls, folder: Path, log: Callable[[str], None] = print) -> RunLock:
        folder = Path(folder)
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise files.WriteError(folder, e, "the run folder") from None
        path = folder / cls.FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise files.WriteError(path, e, "the run folder's lock") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. an NFS mount without locks
                    log(f"note: the filesystem of {folder} cannot lock files ({e.strerror}); nothing stops a second "
                        f"run from writing into this folder")
                    break
                holder = _read_record(fd)
                os.close(fd)
                holder = "a process that is starting" if holder == "no record" else holder
                raise UsageError(f"run folder {folder} is in use by another training ({holder}); wait for it to "
                                 f"finish or stop it, or choose another --out")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and deleted by its holder after we opened it: open the new one
        previous = _read_record(fd)
        if previous != "no record":  # the file of a holder that never released it: it died
            log(f"taking over the lock of {folder} left by {previous}, which {_ended(previous)}")
        record = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError as e:  # a full disk
            os.close(fd)
            raise files.WriteError(path, e, "the run folder's lock") from None
        return cls(path, fd, created)

    def release(self) -> None:
        """Delete the lock file (still holding the lock, so no one takes a file about to vanish),
        then drop the lock; removes the folder too if this lock created it and nothing else is there."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if self.created_folder:
            try:
                self.path.parent.rmdir()  # only if empty: a run that stopped before writing anything
            except OSError:
                pass

    def __del__(self) -> None:  # a Trainer dropped without run(): the process keeps no lock it forgot
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


def _ended(record: str) -> str:
    """How the holder of a lock found unreleased ended, as far as this host can tell."""
    holder = re.match(r"pid (\d+) on (.+?), started ", record)
    if holder and holder.group(2) == socket.gethostname():
        try:
            os.kill(int(holder.group(1)), 0)
        except ProcessLookupError:
            return "is no longer running (killed?)"
        except PermissionError:
            pass
    return "no longer holds it (killed?)"


def _read_record(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "no record"


def _keep_tables(saved: TrainConfig, config: TrainConfig, explicit: frozenset[str]) -> TrainConfig:
    """``config`` with the run's batch and learning-rate tables wherever the command line gave none."""
    keep = {name: getattr(saved, name) for name in TABLES if name not in explicit}
    return dataclasses.replace(config, **keep) if keep else config


def _check_same_run(saved: TrainConfig, config: TrainConfig, where: str) -> None:
    """Refuse every difference but a larger ``max_res`` and the batch (:func:`_check_batch_change`)."""
    diffs = saved.differences(config, ignore=("max_res", "batch"))
    if diffs:
        names = [name for name in saved.cli_values() if name not in ("max_res", "batch")
                 and saved.cli_values()[name] != config.cli_values()[name]]
        raise UsageError(f"{where} was made with other settings; refusing to mix them: " + "; ".join(diffs)
                         + f". To continue it as it was made, pass {continue_flags(saved, names)}")
    if config.max_res < saved.max_res:
        raise UsageError(
            f"{where} trains up to --max-res {saved.max_res}; it can grow but not shrink to {config.max_res}"
        )
    if config.max_res > saved.max_res and saved.total_kimg is not None:
        raise UsageError(
            f"{where} has --total-kimg {saved.total_kimg:g}, whose final phase at {saved.max_res}px would no longer "
            f"be final: a run grows to a larger --max-res only without --total-kimg")


def continue_flags(saved: TrainConfig, names: list[str]) -> str:
    """The flags that set ``names`` to the run's values."""
    values = saved.cli_values()
    parts = []
    for name in names:
        value = values[name]
        if isinstance(value, bool):
            parts.append(flag(name) if value else f"(without {flag(name)})")
        else:
            parts.append(f"{flag(name)} {shlex.quote(str(value if not isinstance(value, float) else f'{value:g}'))}")
    return " ".join(parts)


def _check_batch_change(saved: TrainConfig, config: TrainConfig, phase_index: int, step: int, where: str,
                        log: Callable[[str], None]) -> None:
    """A resume may change the batch of the resolutions the run has not started yet, no other."""
    if saved.batch == config.batch:
        return
    phases = saved.schedule()
    started = {p.res for p in phases[:phase_index]}
    if step > 0 and phase_index < len(phases):
        started.add(phases[phase_index].res)
    changed = sorted(r for r in started if saved.batch_at(r) != config.batch_at(r))
    if changed:
        keep = ",".join(f"{r}:{saved.batch_at(r)}" for r in changed)
        raise UsageError(
            f"{where} has trained at {', '.join(f'{r}px' for r in changed)} with --batch {keep}; a resume may change "
            f"only the batch of resolutions not started yet. Pass --batch {keep} (with your other RES:N) to continue")
    moved = [f"{r}px {saved.batch_at(r)} -> {config.batch_at(r)}" for r in RESOLUTIONS
             if r <= config.max_res and saved.batch_at(r) != config.batch_at(r)]
    if moved:
        log(f"batch changed for resolutions not started yet: {', '.join(moved)}")


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
