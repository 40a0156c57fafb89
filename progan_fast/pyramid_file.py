"""Files that hold a decoded resolution pyramid: the trainer's data cache and prepared datasets.

One format for both (a ``torch.save`` dict: ``format``, ``max_res``, ``num_images``, ``source``,
``summary``, ``levels`` {res: uint8 [N, C, res, res]}, plus extras such as ``labels``, and how the
images were decoded: ``fit`` and ``channels``, absent in files written before those existed, which
are ``crop`` and 3), written
atomically and read back memory-mapped, so host memory stays bounded by what batches touch.

- :func:`write` / :func:`read`: the file itself; :class:`PyramidFileError` says why one is unusable.
- :func:`prepare` / :func:`load_prepared`: a prepared dataset (``python -m progan_fast.dataset``),
  made once from a folder or zip archive and trained from with ``--data FILE`` without decoding again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import files
from .data import DataError, ImageDataset, check_resolution

#: The format tag of prepared datasets; bump it when their layout or the decoding changes.
PREPARED_FORMAT = "progan_fast.dataset/1"


class PyramidFileError(Exception):
    """A pyramid file that cannot be used; ``str(e)`` says why (for a prepared dataset's message)."""


def read(path: Path, max_res: int, fmt: str, at_least: bool = False, fit: str = "crop", channels: int = 3) -> dict:
    """The saved pyramid in ``path`` (levels memory-mapped), or :class:`PyramidFileError`.

    ``at_least``: the file may hold larger images than ``max_res`` (a prepared dataset); the levels
    up to ``max_res`` are returned. ``fit``, ``channels``: how its images must have been decoded (a
    file decoded another way is refused, never used). Returns the saved dict with ``levels`` replaced."""
    try:
        # Memory-mapped: the levels are read from the file as batches touch them, and the ranks of a
        # torchrun job share one copy in the page cache instead of holding one each.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise PyramidFileError(f"it is not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), str):
        raise PyramidFileError("it holds no dataset")
    if obj["format"] != fmt:
        raise PyramidFileError(f"it was written by another version of progan_fast (format {obj['format']!r}, "
                               f"this version reads {fmt!r})")
    saved_res = obj.get("max_res")
    if not isinstance(saved_res, int) or saved_res < max_res:
        raise PyramidFileError(f"its images are {saved_res}x{saved_res}, smaller than --max-res {max_res}")
    if saved_res != max_res and not at_least:
        raise PyramidFileError(f"its images are {saved_res}x{saved_res}, not {max_res}x{max_res}")
    saved_fit, saved_channels = obj.get("fit", "crop"), obj.get("channels", 3)
    if saved_fit != fit:
        raise PyramidFileError(f"its images were made square with --fit {saved_fit}, not --fit {fit}")
    if saved_channels != channels:
        raise PyramidFileError(f"its images have {saved_channels} channel{'s' if saved_channels != 1 else ''}, "
                               f"not --channels {channels}")
    levels, n = obj.get("levels"), obj.get("num_images")
    expected = [2 ** k for k in range(2, max_res.bit_length()) if 2 ** k <= max_res]
    if not isinstance(levels, dict) or not isinstance(n, int) or any(r not in levels for r in expected):
        raise PyramidFileError("its resolution levels are incomplete")
    for r in expected:
        t = levels[r]
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == (n, channels, r, r)):
            raise PyramidFileError(f"its {r}x{r} level is damaged")
    obj["levels"] = {r: levels[r].contiguous() for r in expected}
    labels, names = obj.get("labels"), obj.get("class_names")
    if labels is not None:
        if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and tuple(labels.shape) == (n,)
                and isinstance(names, list) and names and all(isinstance(c, str) for c in names)
                and (n == 0 or 0 <= int(labels.min()) <= int(labels.max()) < len(names))):
            raise PyramidFileError("its labels are damaged")
    return obj


def write(path: Path, dataset: ImageDataset, fmt: str, what: str) -> None:
    """Write ``dataset`` atomically (:func:`progan_fast.files.atomic_write`): a reader never sees
    half a file. ``path``'s folder must exist. Raises :class:`~progan_fast.files.WriteError`
    naming the file as ``what``."""
    obj = {"format": fmt, "max_res": dataset.max_res, "num_images": len(dataset), "source": dataset.source,
           "summary": dataset.summary, "levels": dataset.levels}
    if (dataset.fit, dataset.channels) != ("crop", 3) or dataset.single_channel_source:
        # Only then: a default file stays byte-for-byte what earlier versions wrote and read.
        obj.update(fit=dataset.fit, channels=dataset.channels, single_channel_source=dataset.single_channel_source)
    if dataset.labels is not None:
        obj.update(labels=dataset.labels, class_names=list(dataset.class_names))
    files.write_bytes(path, lambda f: torch.save(obj, f), what)


def is_prepared(path: Path) -> bool:
    """Whether ``path`` is a file torch wrote (a zip container) that is not a plain image archive.

    Both a torch file and a zip of images are zip containers; a torch file has its ``data.pkl``
    record under one top folder."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/data.pkl") and name.count("/") == 1 for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def prepare(dataset: ImageDataset, out: Path) -> None:
    """Write ``dataset`` (all its levels, and its labels if it has them) to ``out`` as a prepared
    dataset (atomically)."""
    write(out, dataset, PREPARED_FORMAT, "the prepared dataset")


def load_prepared(path: Path, max_res: int, fit: str = "crop", channels: int = 3) -> ImageDataset:
    """The prepared dataset ``path`` at ``max_res`` (memory-mapped), decoded with ``fit`` and
    ``channels``, or DataError naming the problem."""
    check_resolution(max_res)
    try:
        obj = read(path, int(max_res), PREPARED_FORMAT, at_least=True, fit=fit, channels=channels)
    except PyramidFileError as e:
        how = (f" --fit {fit}" if fit != "crop" else "") + (f" --channels {channels}" if channels != 3 else "")
        raise DataError(f"--data {path}: cannot use this prepared dataset: {e}; prepare it again with "
                        f"python -m progan_fast.dataset SRC --out {path} --max-res {max_res}{how}") from None
    n = obj["num_images"]
    summary = f"loaded {n:,} prepared image{'s' if n != 1 else ''} from {path} ({obj['summary']})"
    return ImageDataset(levels=obj["levels"], source=str(path), summary=summary, from_cache=True,
                        labels=obj.get("labels"), class_names=obj.get("class_names"), fit=fit,
                        single_channel_source=bool(obj.get("single_channel_source", False)))
