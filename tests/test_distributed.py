"""Data-parallel training under torchrun (gloo on the CPU): R ranks train like one process.

The multi-process tests start real ``torchrun --standalone`` jobs of the CLI, a few seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from progan_fast import distributed
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.networks import Discriminator, Generator, NetworkConfig
from progan_fast.ops.minibatch_stddev import reference as mbstd_reference
from progan_fast.schedule import build_schedule

# Two phases at 8px (fade, stable) after 4px: every kind of phase, and two re-wraps of DDP.
TINY = ["--max-res", "8", "--kimg-per-phase", "0.064", "--batch", "8", "--fmap-base", "64", "--fmap-max", "16",
        "--latent-size", "16", "--no-progress", "--no-tensorboard", "--log-kimg", "0.032", "--device", "cpu"]
HERE = Path(__file__).parent

# Equal within float32 rounding of sums taken in another order (two half-batch means averaged
# vs one mean), after a few dozen Adam steps.
ATOL, RTOL = 1e-4, 1e-4


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def run_cli(args: list[str], ranks: int = 1, script: str | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m progan_fast.train ARGS`` as one process, or under torchrun with ``ranks`` ranks."""
    target = [str(HERE / script)] if script else ["-m", "progan_fast.train"]
    if ranks == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})})


def final(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def assert_same_weights(a: dict, b: dict, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert (a["phase_index"], a["step"], a["images"]) == (b["phase_index"], b["step"], b["images"])
    for net in ("G", "D", "G_ema"):
        for name, value in a[net].items():
            torch.testing.assert_close(b[net][name], value, atol=atol, rtol=rtol, msg=f"{net}.{name}")


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def image_folder(path: Path, n: int = 24) -> Path:
    path.mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(n):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
    return path


# ----- the choices the equivalence rests on (in-process, fast) --------------------------------------


@pytest.mark.parametrize("batch,ranks,group", [(16, 2, 4), (16, 4, 4), (12, 3, 2), (8, 2, 4)])
def test_interleaved_rank_slices_keep_the_minibatch_stddev_groups(batch, ranks, group):
    x = torch.randn(batch, 5, 4, 4, dtype=torch.float64)
    whole = mbstd_reference(x, group)
    for rank in range(ranks):
        world = distributed.World(rank, ranks, rank)
        torch.testing.assert_close(mbstd_reference(world.take(x), group), world.take(whole))


def test_contiguous_rank_slices_would_change_the_groups():
    """Why the slice is interleaved: contiguous halves put other samples together."""
    x = torch.randn(16, 5, 4, 4, dtype=torch.float64)
    whole = mbstd_reference(x, 4)
    assert not torch.allclose(mbstd_reference(x[:8], 4), whole[:8])


@pytest.mark.parametrize("max_res", [4, 16])
def test_parameters_used_are_exactly_those_a_phase_trains(max_res):
    """DDP ignores the rest, so a wrong list would either miss gradients or wait for ones never made."""
    cfg = NetworkConfig(max_res=max_res, latent_size=8, fmap_base=64, fmap_max=8)
    G, D = Generator(cfg), Discriminator(cfg)
    for phase in build_schedule(max_res, 0.01, 4):
        G.zero_grad(set_to_none=True), D.zero_grad(set_to_none=True)
        alpha = 0.5 if phase.fading else None
        D(G(torch.randn(4, 8), phase.res, alpha), phase.res, alpha).sum().backward()
        for net in (G, D):
            with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
            assert net.parameters_used(phase.res, phase.fading) == with_grad, (type(net).__name__, phase)


def test_the_world_comes_from_torchruns_environment():
    assert distributed.from_environment({}) == distributed.SINGLE
    world = distributed.from_environment({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (world.rank, world.size, world.local_rank, world.is_main, world.distributed) == (2, 4, 0, False, True)
    with pytest.raises(distributed.DistributedError, match="inconsistent"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(distributed.DistributedError, match="integers"):
        distributed.from_environment({"WORLD_SIZE": "two"})


# ----- torchrun jobs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_train_to_the_same_weights_as_one_process(tmp_path):
    """Same global batch, an image folder (rank 0 builds the cache, rank 1 maps it), WGAN-GP (the
    penalty's double backward under DDP), fade and stable phases, --mirror (each rank keeps its
    rows of the global batch's coins)."""
    data = image_folder(tmp_path / "images")
    # --gp-resolution phase: with the default (max) penalty scale this tiny run's trajectory has a point
    # where any rounding change (two ranks, or one process with --channels-last alike) sends it elsewhere
    # (D loss 7.089 vs 7.094 at 0.128 kimg), so it could not compare the ranks to 1e-4. The scale is a
    # per-phase constant applied on every rank alike; what this test checks (DDP) does not depend on it.
    args = TINY + ["--data", str(data), "--loss", "wgan-gp", "--mirror", "--gp-resolution", "phase"]
    one = run_cli(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli(args + ["--out", str(tmp_path / "two")], ranks=2)
    assert two.returncode == 0, two.stderr
    assert "2 ranks (DDP)" in two.stderr
    assert_same_weights(final(tmp_path / "one"), final(tmp_path / "two"))

    # The logged losses are the global batch's, and rank 0 alone wrote: one line per window,
    # one message per event, the same files as one process.
    a, b = log_records(tmp_path / "one"), log_records(tmp_path / "two")
    assert [r["kimg"] for r in a] == [r["kimg"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("D_loss", "G_loss", "penalty"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-4), (key, ra, rb)
    assert two.stderr.count("run folder") == 1 and two.stderr.count("done:") == 1
    names = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "cache" not in p.parts)
    assert names(tmp_path / "one") == names(tmp_path / "two")
    assert len(list((tmp_path / "two" / "cache").glob("*.pt"))) == 1


@pytest.mark.slow
def test_a_rank_ends_its_process_without_the_interpreters_finalization(tmp_path):
    """A rank _exits once it has left the group: finalizing raced gloo's worker threads and aborted
    about one 2-rank job in five after a successful run (distributed.end_process). An atexit hook
    shows whether finalization ran; one process still ends normally."""
    script = tmp_path / "train_with_atexit_marker.py"
    script.write_text(
        "import atexit, os, sys\n"
        "from pathlib import Path\n"
        "from progan_fast import train\n"
        "marker = Path(os.environ['MARKER_DIR']) / ('finalized-' + os.environ.get('RANK', 'alone'))\n"
        "atexit.register(marker.touch)\n"
        "sys.exit(train.main(sys.argv[1:]))\n")
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"MARKER_DIR": str(markers)}
    alone = run_cli(TINY + ["--out", str(tmp_path / "one")], script=str(script), env=env)
    assert alone.returncode == 0, alone.stderr
    two = run_cli(TINY + ["--out", str(tmp_path / "two")], ranks=2, script=str(script), env=env)
    assert two.returncode == 0, two.stderr
    assert "done: 0.2 kimg" in two.stderr  # rank 0's last line was flushed before _exit
    assert sorted(p.name for p in markers.iterdir()) == ["finalized-alone"]
    assert list_checkpoints(tmp_path / "two" / "checkpoints")


@pytest.mark.slow
def test_a_run_resumes_with_a_different_number_of_ranks(tmp_path):
    args = TINY + ["--loss", "nonsat"]
    whole = run_cli(args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    # Two ranks, stopped in the fade phase, continued by one process...
    first = run_cli(args + ["--out", str(tmp_path / "two_one"), "--stop-after-kimg", "0.1"], ranks=2)
    assert first.returncode == 0, first.stderr
    then = run_cli(args + ["--out", str(tmp_path / "two_one"), "--resume", "auto"])
    assert then.returncode == 0, then.stderr
    # ...and one process continued by two ranks.
    first = run_cli(args + ["--out", str(tmp_path / "one_two"), "--stop-after-kimg", "0.1"])
    assert first.returncode == 0, first.stderr
    then = run_cli(args + ["--out", str(tmp_path / "one_two"), "--resume", "auto"], ranks=2)
    assert then.returncode == 0, then.stderr
    assert "resuming from" in then.stderr
    reference = final(tmp_path / "whole")
    assert_same_weights(reference, final(tmp_path / "two_one"))
    assert_same_weights(reference, final(tmp_path / "one_two"))


def test_a_batch_that_does_not_split_across_the_ranks_is_refused_once(tmp_path):
    out = tmp_path / "run"
    result = run_cli(TINY + ["--out", str(out)], ranks=3)
    assert result.returncode != 0
    message = "the batch at 4px (8) does not split evenly across 3 ranks"
    assert result.stderr.count(message) == 1, result.stderr
    assert not (out / "checkpoints").exists() and not (out / "config.json").exists()


def test_a_per_rank_batch_below_the_stddev_group_is_refused_once(tmp_path):
    # --batch 8 over 4 ranks leaves 2 images a rank: minibatch stddev's groups of 4 would hold 2.
    out = tmp_path / "run"
    result = run_cli(TINY + ["--out", str(out)], ranks=4)
    assert result.returncode != 0
    message = "the batch at 4px is 2 per rank (8 over 4 ranks), below the minibatch-stddev group size 4"
    assert result.stderr.count(message) == 1, result.stderr
    assert not (out / "checkpoints").exists() and not (out / "config.json").exists()


@pytest.mark.slow
def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """Rank 1's losses are NaN at steps 3 and 4: both ranks skip those updates (else their weights
    would part), like one process whose whole batch was NaN at those steps."""
    env = {"NAN_STEPS": "3,4"}
    one = run_cli(TINY + ["--out", str(tmp_path / "one")], script="nan_train.py", env=env)
    assert one.returncode == 0, one.stderr
    two = run_cli(TINY + ["--out", str(tmp_path / "two")], ranks=2, script="nan_train.py", env={**env, "NAN_RANK": "1"})
    assert two.returncode == 0, two.stderr
    assert_same_weights(final(tmp_path / "one"), final(tmp_path / "two"))
    skipped = [r["skipped_steps"] for r in log_records(tmp_path / "two") if "skipped_steps" in r]
    assert sum(skipped) == 2
    assert two.stderr.count("with non-finite losses") == len(skipped)  # one note per window, from rank 0


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    """A terminal's Ctrl-C reaches torchrun and every rank (torchrun forwards it once more): the
    ranks agree on a step, rank 0 checkpoints, and the run resumes."""
    import signal
    import time

    out = tmp_path / "run"
    args = [a if a != "0.064" else "50" for a in TINY]  # far longer than the test waits
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "progan_fast.train", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: to the whole process group
    _, err = proc.communicate(timeout=120)  # torchrun itself exits 1 with its SignalException
    assert err.count("stopped at") == 1, err
    hint = err.split("continue with: ")[1].splitlines()[0]
    assert hint.startswith("torchrun --standalone --nproc_per_node=2 -m progan_fast.train") and "--resume auto" in hint
    (ckpt,) = list_checkpoints(out / "checkpoints")
    resumed = run_cli(args + ["--out", str(out), "--resume", "auto", "--stop-after-kimg", "0.001"])
    assert resumed.returncode == 0 and f"resuming from {ckpt}" in resumed.stderr, resumed.stderr


# ----- GPU ---------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_graphs_with_several_ranks_is_refused_with_a_clear_message(tmp_path):
    from progan_fast.cli import UsageError
    from progan_fast.config import RunOptions, TrainConfig
    from progan_fast.trainer import Trainer

    world = distributed.World(rank=0, size=2, local_rank=0)  # checked before any collective
    options = RunOptions(out=tmp_path / "run", device="cuda", cuda_graphs=True, progress=False, tensorboard=False)
    with pytest.raises(UsageError, match="--cuda-graphs is not supported with several ranks"):
        Trainer(TrainConfig(max_res=8), options, log=lambda m: None, world=world)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_in_use_is_refused_once_by_every_rank(tmp_path):
    """Under torchrun rank 0 alone takes the folder's lock; its refusal reaches every rank (none
    waits for it in a collective), and it is printed once."""
    from test_crash_safety import LOCK_HOLDER

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert "LOCKED" in holder.stdout.readline(), "the lock holder did not start"
        result = run_cli(TINY + ["--out", str(out)], ranks=2)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert result.returncode != 0
    assert result.stderr.count(f"is in use by another training (pid {holder.pid} on ") == 1, result.stderr
    assert not (out / "checkpoints").exists() and not (out / "config.json").exists()
