"""``python -m progan_fast.dataset`` as a user runs it, each case in its own process: bad sources
and output locations get one ``error:`` line before any decoding, and an interrupted preparation
(Ctrl-C, SIGKILL) leaves no file that ``train --data`` would accept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from progan_fast import train
from test_datasets import make_folder, zip_of
from test_training import TINY

PROG = "progan_fast.dataset: error: "


def prepare(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "progan_fast.dataset", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


def the_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one line a failed preparation prints (and nothing else: no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(PROG), proc.stderr
    return lines[0][len(PROG):]


def test_a_source_without_a_usable_image(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "sub").mkdir()
    (src / "sub" / "empty.png").write_bytes(b"")
    message = the_error(prepare(src, "--out", tmp_path / "out.pt", "--max-res", "8"), 2)
    assert message.startswith(f"no readable image in {src}: found 2 image files, 2 unreadable"), message
    assert not (tmp_path / "out.pt").exists()


def test_a_truncated_zip_source(tmp_path):
    archive = zip_of(make_folder(tmp_path / "images"), tmp_path / "images.zip")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    message = the_error(prepare(archive, "--out", tmp_path / "out.pt", "--max-res", "8"), 2)
    assert str(archive) in message and "not a readable zip file" in message, message
    assert not (tmp_path / "out.pt").exists()


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder in which creating a file fails, for root too (tests often run as root, whom file
    modes do not stop): sysfs takes no new files."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    try:
        open("/sys/progan_fast_probe", "wb").close()
    except OSError:
        return Path("/sys")
    os.unlink("/sys/progan_fast_probe")
    pytest.skip("no folder here refuses root a new file")


@pytest.mark.parametrize("where", ["missing folder", "under a file", "unwritable folder"])
def test_an_output_where_no_file_can_be_written(tmp_path, where):
    """Refused before the decoding (which can take hours), with exit 2: the argument is wrong."""
    if where == "missing folder":
        out, expected = tmp_path / "nowhere" / "out.pt", f"{tmp_path / 'nowhere'}: the folder does not exist"
    elif where == "under a file":
        (tmp_path / "a-file").write_text("")
        out, expected = tmp_path / "a-file" / "out.pt", f"{tmp_path / 'a-file'}: it is not a folder"
    else:
        folder = unwritable_folder(tmp_path)
        out, expected = folder / "progan_fast_out.pt", f"{folder}: "
    src = make_folder(tmp_path / "images")
    message = the_error(prepare(src, "--out", out, "--max-res", "8"), 2)
    assert message.startswith("--out's folder ") and expected in message, message
    assert not out.exists()


# Prepares with the last steps of the write slowed down so that a signal can land in them: "write"
# stalls torch.save half way through the file; "rename" stalls after the whole file is written and
# fsynced, just before its rename (the temporary file is then complete and readable).
STALLING_PREPARE = r"""
import os, sys, time, torch
stage = sys.argv.pop(1)
real_save, real_replace = torch.save, os.replace
def stalling_save(obj, f, *args, **kwargs):
    if stage == "write":
        f.write(b"PK\x03\x04 half a dataset")
        f.flush()
        print("STALLED", flush=True)
        time.sleep(120)
    return real_save(obj, f, *args, **kwargs)
def stalling_replace(src, dst):
    if stage == "rename":
        print("STALLED", flush=True)
        time.sleep(120)
    return real_replace(src, dst)
torch.save, os.replace = stalling_save, stalling_replace
from progan_fast import dataset
sys.exit(dataset.main(sys.argv[1:]))
"""


def interrupted_prepare(tmp_path: Path, stage: str, sig: int) -> tuple[subprocess.Popen, str, Path]:
    out = tmp_path / "out" / "photos.pt"
    out.parent.mkdir()
    src = make_folder(tmp_path / "images")
    proc = subprocess.Popen([sys.executable, "-c", STALLING_PREPARE, stage, str(src), "--out", str(out),
                             "--max-res", "8", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "STALLED" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "STALLED" in line, "the preparation never reached its write"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err, out


def test_ctrl_c_while_writing_leaves_nothing(tmp_path):
    proc, err, out = interrupted_prepare(tmp_path, "write", signal.SIGINT)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and lines == [f"{PROG}interrupted; nothing was written to {out}"], err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_sigkill_leaves_no_file_that_training_accepts(tmp_path, capsys, stage):
    proc, _, out = interrupted_prepare(tmp_path, stage, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    left = list(out.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".photos.pt.tmp-"), left  # what a kill can leave
    if stage == "rename":  # the whole dataset is in it: only its name says that it never was finished
        import torch
        assert torch.load(left[0], weights_only=True)["num_images"] == 9
    assert train.main(TINY + ["--data", str(left[0]), "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is the temporary file of a write that never finished" in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()
