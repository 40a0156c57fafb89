"""The command line through a subprocess, as a user types it: every bad input is one clear
``error:`` line with exit code 2, no traceback, and nothing already saved is touched."""

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

TINY = ["--max-res", "8", "--kimg-per-phase", "0.02", "--batch", "4", "--fmap-base", "32", "--fmap-max", "8",
        "--latent-size", "8", "--no-progress", "--no-tensorboard"]


def run_cli(*args, cwd=None):
    # As a user runs it: without the Triton interpreter the tests switch on for themselves.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "progan_fast.train", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_images(folder: Path, n: int, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 40 % 256, 100, 200)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run_cli(*TINY, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--data", "--out", "--resume", "--preset", "--max-res", "--kimg-per-phase", "--batch", "--loss",
                 "--device", "--backend", "--seed", "--stop-after-kimg", "--ema-beta"):
        assert flag in result.stdout


def test_missing_folder(tmp_path):
    assert_clean_error(run_cli("--data", tmp_path / "nope", "--out", tmp_path / "r", *TINY), "does not exist")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("--data", tmp_path / "empty", "--out", tmp_path / "r", *TINY), "no image files")


def test_no_readable_image(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    (d / "b.jpg").write_text("not an image")
    assert_clean_error(run_cli("--data", d, "--out", tmp_path / "r", *TINY), "no readable image", "2 unreadable")


@pytest.mark.parametrize("value", ["48", "2", "2048"])
def test_max_res_not_a_supported_power_of_two(tmp_path, value):
    args = [a if a != "8" or i != 1 else value for i, a in enumerate(TINY)]
    assert_clean_error(run_cli("--out", tmp_path / "r", *args), f"--max-res {value}")
    assert not (tmp_path / "r").exists()


def test_max_res_too_large_for_the_data(tmp_path):
    d = make_images(tmp_path / "small", 4, size=6)
    assert_clean_error(run_cli("--data", d, "--out", tmp_path / "r", *TINY), "too large for the data")
    args = [a if a != "8" or i != 1 else "128" for i, a in enumerate(TINY)]
    assert_clean_error(run_cli("--out", tmp_path / "r2", *args), "embedded dataset is 64x64")


def test_batch_larger_than_the_dataset(tmp_path):
    d = make_images(tmp_path / "few", 3)
    assert_clean_error(run_cli("--data", d, "--out", tmp_path / "r", *TINY), "batch 4 is larger than the dataset (3")


def test_one_unreadable_file_is_skipped_and_counted(tmp_path):
    d = make_images(tmp_path / "mixed", 6)
    (d / "zero.png").write_bytes(b"")
    result = run_cli("--data", d, "--out", tmp_path / "r", *TINY)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable" in result.stderr and "loaded 6 images" in result.stderr


def test_existing_run_without_resume_is_refused_and_untouched(finished_run):
    before = snapshot(finished_run)
    args = [a if a != "0.02" else "0.03" for a in TINY]
    assert_clean_error(run_cli(*args, "--out", finished_run), "already holds a run", "--kimg-per-phase", "--resume auto")
    assert_clean_error(run_cli(*TINY, "--out", finished_run), "already holds a run")
    assert snapshot(finished_run) == before


def test_resume_with_a_changed_setting_is_refused(finished_run):
    before = snapshot(finished_run)
    assert_clean_error(run_cli(*TINY, "--loss", "wgan-gp", "--out", finished_run, "--resume", "auto"), "--loss")
    assert snapshot(finished_run) == before


def test_corrupt_checkpoint(tmp_path, finished_run):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    assert_clean_error(run_cli(*TINY, "--out", tmp_path / "r", "--resume", bad), "corrupt")
    # a torn newest checkpoint in a run folder: refused by name, the run left as it was
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in finished_run.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(finished_run)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(finished_run)).write_bytes(p.read_bytes())
    newest = sorted((copy / "checkpoints").glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    before = snapshot(copy)
    assert_clean_error(run_cli(*TINY, "--out", copy, "--resume", "auto"), newest.name, "corrupt")
    assert snapshot(copy) == before


def test_unavailable_backend_and_device(tmp_path):
    if not __import__("torch").cuda.is_available():
        assert_clean_error(run_cli(*TINY, "--out", tmp_path / "r", "--backend", "triton"), "triton", "CUDA")
    from progan_fast.ops import _native

    if not _native.cuda_available():
        assert_clean_error(run_cli(*TINY, "--out", tmp_path / "r", "--backend", "cuda"), "backend 'cuda' is not available")
    # on every machine: the CUDA kernels never run a CPU run, nor the C++ twins a CUDA run
    assert_clean_error(run_cli(*TINY, "--out", tmp_path / "r3", "--device", "cpu", "--backend", "cuda"),
                       "backend 'cuda' is not available")
    if __import__("torch").cuda.is_available():
        assert_clean_error(run_cli(*TINY, "--out", tmp_path / "r4", "--device", "cuda", "--backend", "cpu"),
                           "backend 'cpu' is not available")
    if not __import__("torch").cuda.is_available():
        assert_clean_error(run_cli(*TINY, "--out", tmp_path / "r2", "--device", "cuda"), "no CUDA device")


def test_resume_auto_finds_the_newest_run_in_runs(tmp_path):
    first = run_cli(*TINY, "--stop-after-kimg", "0.01", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "--resume auto" in first.stderr
    second = run_cli(*TINY, "--resume", "auto", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and "done" in second.stderr


def test_ctrl_c_saves_a_checkpoint_and_exits_0(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = [a if a != "0.02" else "50" for a in TINY]  # a schedule far longer than the test waits
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-m", "progan_fast.train", *args, "--out", str(out), "--log-kimg", "0.01"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "--resume auto" in err
    (ckpt,) = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    # The command the message gives is the one that works (it repeats the run's flags).
    hint = err.split("continue with: ")[1].splitlines()[0]
    command = shlex.split(hint)
    assert command[:3] == ["python", "-m", "progan_fast.train"] and "--log-kimg" in command
    resumed = run_cli(*command[3:], "--stop-after-kimg", "0.001")
    assert resumed.returncode == 0 and f"resuming from {ckpt}" in resumed.stderr, resumed.stderr


def test_resuming_a_checkpoint_into_another_runs_folder_is_refused(tmp_path, finished_run):
    other = tmp_path / "other"
    args = [a if a != "0.02" else "0.03" for a in TINY]
    assert run_cli(*args, "--out", other, "--stop-after-kimg", "0.001").returncode == 0
    before = snapshot(other)
    ckpt = sorted((finished_run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert_clean_error(run_cli(*TINY, "--out", other, "--resume", ckpt), f"the run in {other}", "--kimg-per-phase")
    assert snapshot(other) == before
