"""What can befall a run's folder: a run killed with SIGKILL in the middle of writing a checkpoint
loses at most that checkpoint interval (the half-written file never counts as a checkpoint, and
--resume auto continues from the last complete one); a second run into a live run's folder is
refused, naming it, while a killed run's lock is taken over; and a full disk at any write (a
checkpoint, the data cache, a sample grid, the log, a prepared dataset) stops with one error line,
leaving the earlier files as they were and no partial file."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from progan_fast import train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.cli import UsageError
from progan_fast.run_folder import RunLock

from test_training import TINY, final_state

# Runs the trainer with torch.save patched so that the second checkpoint write stalls halfway:
# it writes a zip header, flushes, says so on stdout and waits to be killed.
STALLING_TRAINER = r"""
import sys, time, torch
real_save = torch.save
calls = {"n": 0}
def stalling_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        print("WRITING", flush=True)
        time.sleep(120)
    return real_save(obj, f, *args, **kwargs)
torch.save = stalling_save
from progan_fast import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_loses_at_most_one_interval(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--out", str(out), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-c", STALLING_TRAINER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "WRITING" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "WRITING" in line, "the trainer never reached its second checkpoint write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    folder = out / "checkpoints"
    torn = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    assert torn, "the kill should have left the half-written temporary file"
    complete = list_checkpoints(folder)
    assert len(complete) == 1  # the first phase's checkpoint; the second never became one
    first = load_checkpoint(complete[0])
    assert first["phase_index"] == 1 and first["step"] == 0

    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 0
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # the torn write was cleaned up
    final = final_state(out)
    assert final["phase_index"] == 3
    assert all(torch.isfinite(t).all() for t in final["G"].values())


# ----- one run per folder ------------------------------------------------------------------------

# Takes the run folder's lock the way a trainer does, says so, and holds it until killed.
LOCK_HOLDER = r"""
import sys, time
from pathlib import Path
from progan_fast.run_folder import RunFolder
folder = RunFolder(Path(sys.argv[1]))  # kept: a dropped RunFolder lets its lock go
folder.acquire_lock()
print("LOCKED", flush=True)
time.sleep(300)
"""


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_a_live_runs_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    assert not (out / RunLock.FILE).exists()  # a run that ended released its lock
    # What a resume would remove as torn, were it not a live run's checkpoint write in progress.
    in_progress = out / "checkpoints" / ".ckpt-000000000096.pt.tmp-999999-x1"
    in_progress.write_bytes(b"PK\x03\x04 a live run's checkpoint, half written")
    before = folder_bytes(out / "checkpoints")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert "LOCKED" in holder.stdout.readline(), "the lock holder did not start"
        who = f"pid {holder.pid} on {socket.gethostname()}, started "
        # A second run as a user starts it, and a resume in this process: both refused, naming the holder.
        cli = subprocess.run([sys.executable, "-m", "progan_fast.train", *TINY, "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2, cli.stderr
        line = one_error_line(cli.stderr)
        assert line.startswith("progan_fast.train: error: run folder") and "in use by another training" in line
        assert who in line, line
        assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 2
        assert who in one_error_line(capsys.readouterr().err)
        assert folder_bytes(out / "checkpoints") == before  # the write in progress was left alone
    finally:
        holder.kill()  # SIGKILL: the holder cannot release anything; its record stays in the lock file
        holder.wait(timeout=60)
    assert (out / RunLock.FILE).read_text().startswith(f"pid {holder.pid} ")
    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of {out} left by pid {holder.pid}" in err and "is no longer running" in err, err
    assert not in_progress.exists()  # now that the run holds the folder, the torn write is removed
    assert final_state(out)["phase_index"] == 3
    assert not (out / RunLock.FILE).exists()


def test_a_lock_released_by_its_holder_is_taken_without_a_note(tmp_path):
    """A released lock deletes its file while holding it; a process that opened the old file
    retries on the new one (here: the same process, one lock after the other)."""
    notes = []
    first = RunLock.acquire(tmp_path / "run", notes.append)
    assert (tmp_path / "run" / RunLock.FILE).read_text().startswith(f"pid {os.getpid()} ")
    with pytest.raises(UsageError, match=f"in use by another training \\(pid {os.getpid()} "):
        RunLock.acquire(tmp_path / "run", notes.append)  # flock: a second open file of one process conflicts too
    first.release()
    assert not (tmp_path / "run").exists()  # it created the folder and nothing else was written there
    RunLock.acquire(tmp_path / "run", notes.append).release()
    assert notes == []


# ----- a full disk -------------------------------------------------------------------------------

def full_disk_after(n_bytes: int):
    """A stand-in for ``torch.save(obj, f)`` or ``Image.save(self, f)`` that writes ``n_bytes``
    of the file and then fails as a full disk does."""
    def write(_, f, *args, **kwargs):
        f.write(b"PK\x03\x04"[:n_bytes] + b"\0" * max(0, n_bytes - 4))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_ones(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    before = folder_bytes(out / "checkpoints")
    capsys.readouterr()
    monkeypatch.setattr(torch, "save", full_disk_after(100))
    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("progan_fast.train: error: could not write checkpoint ") and "(the disk is full)" in line
    newest = list_checkpoints(out / "checkpoints")[-1].name
    assert f"are intact (newest: {newest})" in line, line
    assert folder_bytes(out / "checkpoints") == before and no_temporary_files(out)
    monkeypatch.undo()  # space again: the run continues from the intact checkpoint
    assert train.main(TINY + ["--out", str(out), "--resume", "auto", "--stop-after-kimg", "0.1"]) == 0
    assert list_checkpoints(out / "checkpoints")[-1].name > newest


def test_a_full_disk_at_the_data_cache_stops_the_run_before_training(tmp_path, monkeypatch, capsys):
    from test_datasets import make_folder

    images = make_folder(tmp_path / "images")
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk_after(10_000))
    assert train.main(TINY + ["--data", str(images), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "could not write the data cache " in line and "No space left on device" in line, line
    assert not list((out / "cache").iterdir()) and no_temporary_files(out)  # nothing a later run would read
    monkeypatch.undo()
    assert train.main(TINY + ["--data", str(images), "--out", str(out), "--stop-after-kimg", "0.02"]) == 0


def test_a_full_disk_at_a_sample_grid_keeps_the_checkpoints_and_the_old_grid(tmp_path, monkeypatch, capsys):
    from PIL import Image

    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    checkpoints, samples = folder_bytes(out / "checkpoints"), folder_bytes(out / "samples")
    capsys.readouterr()
    monkeypatch.setattr(Image.Image, "save", full_disk_after(50))
    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "could not write the image " in line and "fakes-" in line and "(the disk is full)" in line, line
    assert folder_bytes(out / "checkpoints") == checkpoints and folder_bytes(out / "samples") == samples
    assert no_temporary_files(out)


def test_a_full_disk_in_the_run_log_cuts_the_half_line_off(tmp_path, monkeypatch, capsys):
    from progan_fast import run_log

    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    log_before = (out / "log.jsonl").read_bytes()
    capsys.readouterr()
    real_open = open

    class HalfFull:  # log.jsonl whose next write stops half way, as a filling disk does
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(run_log, "open", lambda *a, **k: HalfFull(real_open(*a, **k)), raising=False)
    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "could not write the run log " in line and "log.jsonl" in line, line
    assert (out / "log.jsonl").read_bytes() == log_before  # every line is still one whole record


def test_a_full_disk_while_preparing_a_dataset_leaves_no_file(tmp_path, monkeypatch, capsys):
    from progan_fast import dataset as dataset_cli
    from test_datasets import make_folder

    images = make_folder(tmp_path / "images")
    out = tmp_path / "prepared" / "photos.pt"
    out.parent.mkdir()
    monkeypatch.setattr(torch, "save", full_disk_after(10_000))
    assert dataset_cli.main([str(images), "--out", str(out), "--max-res", "8", "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"progan_fast.dataset: error: could not write the prepared dataset {out}: No space left on "
                    f"device (the disk is full); nothing was written"), line
    assert list(out.parent.iterdir()) == []
    # Over an existing file (--overwrite): the old one stays as it was.
    out.write_bytes(b"the previous dataset")
    assert dataset_cli.main([str(images), "--out", str(out), "--max-res", "8", "--no-progress", "--overwrite"]) == 1
    assert out.read_bytes() == b"the previous dataset" and list(out.parent.iterdir()) == [out]
