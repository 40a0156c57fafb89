"""Class labels of an image folder or zip archive, for class-conditional training.

Two sources, as in the official ProGAN (class folders) and StyleGAN2-ADA (``dataset.json``) tools:

- ``dataset.json`` at the top of the folder or archive: ``{"labels": [["relative/path.png", 3], ...]}``,
  one integer class per image (paths as the scan names them: relative, ``/``-separated);
- otherwise the top-level subfolders, in sorted order: class k is the k-th folder name.

Every image must get a label and every label must name an image; a wrong label file is an error
that names the first offender (:class:`~progan_fast.data.DataError`), never a silent guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .data import DataError

LABELS_FILE = "dataset.json"
#: The most classes a dataset may have (one-hot inputs wider than this are surely a mistake).
MAX_CLASSES = 4096


@dataclass(frozen=True)
class Labels:
    per_image: list[int]  # the class of each image, in the order of the names given
    class_names: list[str]  # class k's name: its folder, or "k" for dataset.json labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def from_json(text: str, names: list[str], where: str) -> Labels:
    """Labels of ``names`` from the text of a ``dataset.json`` (``where`` names it in messages)."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where} is not valid JSON: {e}") from None
    entries = obj.get("labels") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f'{where} has no labels: expected {{"labels": [["path/to/image.png", 0], ...]}}')
    table: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DataError(f'{where}: each label must be ["relative/path.png", class], not {entry!r}')
        path, label = entry
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{where}: the label of {path} must be a class number (an integer), not {label!r}")
        if not 0 <= label < MAX_CLASSES:
            raise DataError(f"{where}: the label of {path} is {label}, out of range (0 to {MAX_CLASSES - 1})")
        table[path] = label
    known = set(names)
    missing = [p for p in table if p not in known]
    if missing:
        raise DataError(f"{where} names {missing[0]}, which is not an image there"
                        + (f" ({len(missing) - 1:,} more such names)" if len(missing) > 1 else ""))
    unlabelled = [n for n in names if n not in table]
    if unlabelled:
        raise DataError(f"{unlabelled[0]} has no label in {where}"
                        + (f" ({len(unlabelled) - 1:,} more images without one)" if len(unlabelled) > 1 else ""))
    num_classes = max(table.values()) + 1
    return Labels([table[n] for n in names], [str(k) for k in range(num_classes)])


def from_folders(names: list[str], where: str) -> Labels:
    """Labels of ``names`` from their top-level folder: the sorted folder names are the classes."""
    outside = [n for n in names if "/" not in n]
    if outside:
        raise DataError(f"{outside[0]} in {where} is in no class folder (with labels, put each image in a subfolder "
                        f"named after its class, or list the labels in {LABELS_FILE})")
    classes = sorted({n.split("/", 1)[0] for n in names})
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{where} has {len(classes):,} class folders; at most {MAX_CLASSES} are supported")
    index = {c: k for k, c in enumerate(classes)}
    return Labels([index[n.split("/", 1)[0]] for n in names], classes)
