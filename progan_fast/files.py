"""Writing a file so that no reader ever sees half of it: the one atomic-write helper every writer uses.

:func:`atomic_write` writes to a temporary file next to the target (``.NAME.tmp-PID-XXXX``), flushes
and fsyncs it, then renames it over ``NAME`` and fsyncs the folder. Whatever goes wrong on the way
-- a full disk (``ENOSPC``), an unwritable folder, Ctrl-C -- the temporary file is removed and the
target keeps its old content (or stays absent); the error is one :class:`WriteError` naming the file.
Only SIGKILL or a power cut can leave a temporary file behind, and its name says what it is
(:func:`is_temporary`), so the readers refuse it instead of taking it for a finished file.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

#: ``.NAME.tmp-PID`` or ``.NAME.tmp-PID-XXXX``: a temporary file of :func:`atomic_write`.
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+(-[A-Za-z0-9_]+)?$")


class WriteError(OSError):
    """A file that could not be written; ``str(e)`` is one line naming it and the reason. Nothing
    of it was left behind (the previous file, if any, is untouched)."""

    def __init__(self, path: Path, cause: OSError, what: str = "", note: str = "") -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path, self.cause, self.what, self.note = Path(path), cause, what, note

    @property
    def reason(self) -> str:
        reason = self.cause.strerror or str(self.cause)
        return reason + " (the disk is full)" if self.cause.errno == errno.ENOSPC else reason

    def __str__(self) -> str:
        reason = self.reason
        note = f"; {self.note}" if self.note else ""
        return f"could not write {self.what + ' ' if self.what else ''}{self.path}: {reason}{note}"


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an :func:`atomic_write` (one that a kill left behind)."""
    return bool(_TEMPORARY.match(Path(path).name))


def temporary_name(path: Path) -> str:
    """The prefix of ``path``'s temporary files (``.NAME.tmp-PID-``)."""
    return f".{Path(path).name}.tmp-{os.getpid()}-"


@contextmanager
def atomic_write(path: Path, what: str = "") -> Iterator[BinaryIO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` gets the bytes written, all or
    none. ``what`` names the file in the error (e.g. "checkpoint"). The folder must exist (a missing
    one is an error here, not silently created: the callers decide). Raises :class:`WriteError`
    for any OSError, and lets every other exception (KeyboardInterrupt included) through after
    removing the temporary file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_name(path), dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a finished file gets the usual mode
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)  # make the rename itself durable
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e, what) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_bytes(path: Path, write: Callable[[BinaryIO], object], what: str = "") -> Path:
    """``write(f)`` into ``path`` through :func:`atomic_write`; returns ``path``."""
    with atomic_write(path, what) as f:
        write(f)
    return Path(path)


def check_writable_folder(folder: Path, what: str) -> None:
    """Raise :class:`WriteError` unless a file can be created in ``folder`` (it exists, is a folder
    and takes a new file), by creating and removing one: checked before long work whose result
    would go there, so an hour of decoding never ends in a refused write."""
    folder = Path(folder)
    try:
        with tempfile.NamedTemporaryFile(prefix=temporary_name(folder / "probe"), dir=folder):
            pass
    except OSError as e:
        if not folder.exists():
            e = FileNotFoundError(errno.ENOENT, "the folder does not exist")
        elif not folder.is_dir():
            e = NotADirectoryError(errno.ENOTDIR, "it is not a folder")
        raise WriteError(folder, e, what) from None


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
