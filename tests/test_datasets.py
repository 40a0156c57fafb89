"""Zip archives and prepared datasets as --data: the same images as the folder they came from,
read in place or memory-mapped; bad files exit 2 with one message."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from progan_fast import dataset as dataset_cli
from progan_fast import pyramid_file, train
from progan_fast.config import TrainConfig, load_data
from progan_fast.image_folder import load_image_folder, load_image_zip
from test_training import TINY


def make_folder(root: Path, n: int = 9, size: int = 20) -> Path:
    """Images of several sizes and kinds in sub-folders (one too small to use, one unreadable)."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (size + 3 * i, size + i, 3), generator=g, dtype=torch.uint8).numpy()
        (root / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"sub{i % 2}" / f"img{i}.{'png' if i % 3 else 'jpg'}")
    Image.new("RGB", (4, 4)).save(root / "tiny.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def zip_of(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
        z.writestr("__MACOSX/sub0/._img1.png", b"resource fork")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return out


def assert_same_levels(a, b):
    assert sorted(a.levels) == sorted(b.levels)
    for r in a.levels:
        assert torch.equal(a.levels[r], b.levels[r]), f"{r}px differs"


def test_a_zip_gives_the_same_dataset_as_its_folder(tmp_path):
    folder = make_folder(tmp_path / "images")
    archive = zip_of(folder, tmp_path / "images.zip", {"dataset.json": b'{"labels": null}'})
    from_folder = load_image_folder(folder, 16, progress=False)
    from_zip = load_image_zip(archive, 16, progress=False)
    assert len(from_zip) == 9
    assert_same_levels(from_folder, from_zip)
    assert "skipped: 1 unreadable, 1 smaller than 16px" in from_zip.summary
    # Through the run's cache: the second load reads the cache, with the same content.
    cache = tmp_path / "cache"
    first = load_image_zip(archive, 16, cache_dir=cache, progress=False)
    again = load_image_zip(archive, 16, cache_dir=cache, progress=False)
    assert not first.from_cache and again.from_cache
    assert_same_levels(from_folder, again)


def mapped_from(path: Path, tensor: torch.Tensor) -> bool:
    """Whether the tensor's data lies in a memory mapping of ``path`` (Linux: /proc/self/maps)."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_a_prepared_dataset_gives_the_same_dataset_memory_mapped(tmp_path):
    folder = make_folder(tmp_path / "images")
    out = tmp_path / "prepared.pt"
    assert dataset_cli.main([str(folder), "--out", str(out), "--max-res", "16", "--no-progress"]) == 0
    config = TrainConfig(data=str(out), max_res=16)
    prepared = load_data(config, tmp_path / "run", progress=False)
    assert_same_levels(load_image_folder(folder, 16, progress=False), prepared)
    # Memory-mapped: the levels' memory is the file itself (a mapping of it), not a copy.
    assert mapped_from(out, prepared.levels[16]) and mapped_from(out, prepared.levels[4])
    # A smaller --max-res uses the prepared pyramid's lower levels.
    smaller = load_data(TrainConfig(data=str(out), max_res=8), tmp_path / "run", progress=False)
    assert sorted(smaller.levels) == [4, 8]
    assert torch.equal(smaller.levels[8], prepared.levels[8])
    # The zip prepares to the same file content.
    out_zip = tmp_path / "from-zip.pt"
    assert dataset_cli.main([str(zip_of(folder, tmp_path / "i.zip")), "--out", str(out_zip), "--max-res", "16",
                             "--no-progress"]) == 0
    assert_same_levels(prepared, load_data(TrainConfig(data=str(out_zip), max_res=16), tmp_path, progress=False))


def test_training_from_zip_and_prepared_gives_the_folder_run(tmp_path):
    folder = make_folder(tmp_path / "images")
    archive = zip_of(folder, tmp_path / "images.zip")
    prepared = tmp_path / "prepared.pt"
    assert dataset_cli.main([str(folder), "--out", str(prepared), "--max-res", "8", "--no-progress"]) == 0
    finals = []
    for name, data in [("folder", folder), ("zip", archive), ("prepared", prepared)]:
        run = tmp_path / name
        assert train.main(TINY + ["--data", str(data), "--out", str(run), "--stop-after-kimg", "0.032"]) == 0
        finals.append(torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["G"])
    for other in finals[1:]:
        for k in finals[0]:
            assert torch.equal(finals[0][k], other[k]), k


def run_train(tmp_path, data, capsys, *extra) -> tuple[int, str]:
    code = train.main(TINY + ["--data", str(data), "--out", str(tmp_path / "run"), *extra])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def test_a_truncated_zip_exits_2_with_one_message(tmp_path, capsys):
    archive = zip_of(make_folder(tmp_path / "images"), tmp_path / "images.zip")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    code, err = run_train(tmp_path, archive, capsys)
    assert code == 2
    assert "not a readable zip file" in one_error_line(err) and "images.zip" in err


def test_a_zip_without_images_exits_2(tmp_path, capsys):
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "no images")
    code, err = run_train(tmp_path, archive, capsys)
    assert code == 2 and "no image files" in one_error_line(err)


@pytest.mark.parametrize("damage", ["truncated", "other version", "too small", "not a dataset", "an image"])
def test_a_bad_prepared_dataset_exits_2_with_one_message(tmp_path, capsys, damage):
    folder = make_folder(tmp_path / "images")
    prepared = tmp_path / "prepared.pt"
    assert dataset_cli.main([str(folder), "--out", str(prepared), "--max-res", "8", "--no-progress"]) == 0
    expected = {"truncated": "it is not readable", "other version": "written by another version",
                "too small": "its images are 8x8, smaller than --max-res 16", "not a dataset": "it holds no dataset",
                "an image": "is an image file"}[damage]
    extra = []
    if damage == "truncated":
        prepared.write_bytes(prepared.read_bytes()[:1000])
    elif damage == "other version":
        obj = torch.load(prepared, weights_only=True)
        obj["format"] = "progan_fast.dataset/0"
        torch.save(obj, prepared)
    elif damage == "too small":
        extra = ["--max-res", "16"]
    elif damage == "not a dataset":
        torch.save({"weights": torch.zeros(3)}, prepared)
    else:
        prepared = folder / "sub0" / "img0.jpg"
    code, err = run_train(tmp_path, prepared, capsys, *extra)
    assert code == 2, err
    assert expected in one_error_line(err), err


def test_prepare_refuses_to_overwrite_and_reports_bad_sources(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")
    out = tmp_path / "prepared.pt"
    out.write_bytes(b"precious")
    assert dataset_cli.main([str(folder), "--out", str(out), "--max-res", "8", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert dataset_cli.main([str(folder), "--out", str(out), "--max-res", "8", "--no-progress", "--overwrite"]) == 0
    assert pyramid_file.load_prepared(out, 8).levels[8].shape[0] == 9
    assert dataset_cli.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"), "--max-res", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert dataset_cli.main([str(folder), "--out", str(tmp_path / "y.pt"), "--max-res", "12"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


# ----- labels (for class-conditional training) ------------------------------------------------------

def test_labels_from_class_folders_match_between_folder_zip_and_prepared(tmp_path):
    folder = make_folder(tmp_path / "images")  # sub0: images 0, 2, 4, 6, 8; sub1: 1, 3, 5, 7; tiny/broken at the top
    for f in (folder / "tiny.png", folder / "broken.png"):
        f.rename(folder / "sub1" / f.name)  # every image in a class folder (these two are skipped)
    ds = load_image_folder(folder, 16, progress=False, labels=True)
    assert ds.class_names == ["sub0", "sub1"]
    # Sorted names: sub0/img0,2,4,6,8 then sub1/img1,3,5,7 (broken and tiny skipped, their labels dropped).
    assert ds.labels.tolist() == [0] * 5 + [1] * 4
    assert "2 classes" in ds.summary
    zipped = load_image_zip(zip_of(folder, tmp_path / "images.zip"), 16, progress=False, labels=True)
    assert torch.equal(zipped.labels, ds.labels) and zipped.class_names == ds.class_names
    out = tmp_path / "prepared.pt"
    assert dataset_cli.main([str(folder), "--out", str(out), "--max-res", "16", "--labels", "--no-progress"]) == 0
    prepared = pyramid_file.load_prepared(out, 8)
    assert torch.equal(prepared.labels, ds.labels) and prepared.class_names == ["sub0", "sub1"]
    # Without --labels there are none, and the run's cache keeps the two apart.
    cache = tmp_path / "cache"
    assert load_image_folder(folder, 16, cache_dir=cache, progress=False).labels is None
    again = load_image_folder(folder, 16, cache_dir=cache, progress=False, labels=True)
    assert not again.from_cache and torch.equal(again.labels, ds.labels)
    assert torch.equal(load_image_folder(folder, 16, cache_dir=cache, progress=False, labels=True).labels, ds.labels)


def write_json(folder: Path, labels) -> None:
    import json

    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))


def test_labels_from_dataset_json(tmp_path):
    folder = make_folder(tmp_path / "images")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    write_json(folder, [[n, i % 3] for i, n in enumerate(names)])
    ds = load_image_folder(folder, 16, progress=False, labels=True)
    usable = [i % 3 for i, n in enumerate(names) if n not in ("broken.png", "tiny.png")]
    assert ds.labels.tolist() == usable and ds.class_names == ["0", "1", "2"]
    zipped = load_image_zip(zip_of(folder, tmp_path / "images.zip"), 16, progress=False, labels=True)
    assert torch.equal(zipped.labels, ds.labels)


@pytest.mark.parametrize("problem,expected", [
    ("missing image", "dataset.json names sub0/gone.png, which is not an image there"),
    ("negative", "the label of sub0/img0.jpg is -1, out of range"),
    ("not a number", "must be a class number (an integer), not 'cat'"),
    ("unlabelled", "sub1/img7.png has no label in"),
    ("no labels", "has no labels"),
    ("no class folder", "broken.png in"),
])
def test_a_bad_label_source_exits_2_with_one_message(tmp_path, capsys, problem, expected):
    folder = make_folder(tmp_path / "images")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    labels = [[n, 0] for n in names]
    if problem == "missing image":
        labels.append(["sub0/gone.png", 1])
    elif problem == "negative":
        labels[names.index("sub0/img0.jpg")][1] = -1
    elif problem == "not a number":
        labels[0][1] = "cat"
    elif problem == "unlabelled":
        labels = [entry for entry in labels if entry[0] != "sub1/img7.png"]
    elif problem == "no labels":
        labels = None
    if problem != "no class folder":
        write_json(folder, labels)
    out = tmp_path / "prepared.pt"
    assert dataset_cli.main([str(folder), "--out", str(out), "--max-res", "8", "--labels", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in one_error_line(err) and not out.exists(), err
