"""``--preset paper`` trains what the official code (tkarras/progressive_growing_of_gans) trains.

The expected values here are written from the official code, not from progan_fast: the v2 preset
lines of its ``config.py`` (copied below as they stand there), the ``TrainingSchedule`` of its
``train.py`` (re-typed as :func:`official_schedule`), its loss defaults (``loss.py``:
``D_wgangp_acgan(wgan_lambda=10.0, wgan_epsilon=0.001, wgan_target=1.0)``) and its D, which takes
every image at the final resolution (nearest-upscaled) and average-pools it down (``networks.py``).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from progan_fast import losses, train
from progan_fast.config import TrainConfig
from progan_fast.networks import Discriminator, NetworkConfig

# config.py, "Config presets": desc += '-preset-v2-<n>gpu(s)'; num_gpus = <n>; sched.minibatch_base = ...;
# sched.minibatch_dict = ...; sched.G_lrate_dict = ...; sched.D_lrate_dict = EasyDict(sched.G_lrate_dict);
# train.total_kimg = 12000.
OFFICIAL = {
    1: dict(minibatch_base=4, minibatch_dict={4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4},
            G_lrate_dict={1024: 0.0015}),
    2: dict(minibatch_base=8, minibatch_dict={4: 256, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8},
            G_lrate_dict={512: 0.0015, 1024: 0.002}),
    4: dict(minibatch_base=16, minibatch_dict={4: 512, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16},
            G_lrate_dict={256: 0.0015, 512: 0.002, 1024: 0.003}),
    8: dict(minibatch_base=32, minibatch_dict={4: 512, 8: 256, 16: 128, 32: 64, 64: 32},
            G_lrate_dict={128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}),
}
TOTAL_KIMG = 12000
# '-fp32': sched.max_minibatch_per_gpu = {256: 16, 512: 8, 1024: 4}
MAX_MINIBATCH_PER_GPU = {256: 16, 512: 8, 1024: 4}


def official_schedule(cur_nimg, resolution_log2, num_gpus, preset, lod_training_kimg=600, lod_transition_kimg=600,
                      lod_initial_resolution=4, G_lrate_base=0.001):
    """train.py's TrainingSchedule.__init__, line for line: (lod, resolution, minibatch, G_lrate)."""
    kimg = cur_nimg / 1000.0
    phase_dur = lod_training_kimg + lod_transition_kimg
    phase_idx = int(math.floor(kimg / phase_dur)) if phase_dur > 0 else 0
    phase_kimg = kimg - phase_idx * phase_dur
    lod = resolution_log2
    lod -= math.floor(math.log2(lod_initial_resolution))
    lod -= phase_idx
    if lod_transition_kimg > 0:
        lod -= max(phase_kimg - lod_training_kimg, 0.0) / lod_transition_kimg
    lod = max(lod, 0.0)
    resolution = 2 ** (resolution_log2 - int(math.floor(lod)))
    minibatch = preset["minibatch_dict"].get(resolution, preset["minibatch_base"])
    minibatch -= minibatch % num_gpus
    if resolution in MAX_MINIBATCH_PER_GPU:
        minibatch = min(minibatch, MAX_MINIBATCH_PER_GPU[resolution] * num_gpus)
    G_lrate = preset["G_lrate_dict"].get(resolution, G_lrate_base)
    return lod, resolution, minibatch, G_lrate


def paper_config(*flags, ranks=1) -> TrainConfig:
    return train.config_from_args(train.build_parser().parse_args(["--preset", "paper", *flags]), ranks)


def phase_spans(phases):
    start = 0
    for p in phases:
        yield p, start, start + p.steps * p.batch
        start += p.steps * p.batch


@pytest.mark.parametrize("max_res", [256, 1024])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_paper_schedule_is_the_official_training_schedule(gpus, max_res):
    config = paper_config("--max-res", str(max_res), ranks=gpus)
    phases = config.schedule()
    log2 = int(math.log2(max_res))
    for phase, start, end in phase_spans(phases):
        # Inside the phase (away from its ends, which each phase's rounding to whole batches moves by
        # less than a batch), the official
        # schedule trains the same resolution, fading or not, with the same batch and learning rate.
        for nimg in (start + (end - start) // 20, (start + end) // 2, end - (end - start) // 20):
            lod, res, minibatch, lrate = official_schedule(nimg, log2, gpus, OFFICIAL[gpus])
            assert (res, lod != math.floor(lod)) == (phase.res, phase.fading), (phase, nimg)
            assert phase.batch == minibatch and phase.lr == lrate, (phase, nimg)
        if phase.fading:  # alpha is the official 1 - frac(lod) (lod falls by 1 across the fade)
            step = (end - start) // phase.batch // 2
            lod, *_ = official_schedule(start + step * phase.batch, log2, gpus, OFFICIAL[gpus])
            drift = sum(p.batch for p in phases[:phase.index + 1])  # each phase's rounding moves less than a batch
            assert phase.alpha(step) == pytest.approx(1 - (lod - math.floor(lod)), abs=drift / 600e3)
    # The official loop runs while cur_nimg < total_kimg * 1000: the run ends within a batch after it.
    total = sum(p.steps * p.batch for p in phases)
    assert TOTAL_KIMG * 1000 <= total < TOTAL_KIMG * 1000 + phases[-1].batch
    last_fade_end = 600 * (1 + 2 * (log2 - 2) - 1) * 1000  # 4px stable, then (fade + stable) per doubling, less the last stable
    assert phases[-1].steps * phases[-1].batch == pytest.approx(TOTAL_KIMG * 1000 - last_fade_end,
                                                                abs=sum(p.batch for p in phases))


def test_paper_preset_trains_official_wgan_gp_and_the_laptop_keeps_its_recipe():
    paper = paper_config()
    assert paper.loss == "wgan-gp" and paper.total_kimg == TOTAL_KIMG and paper.gp_resolution == "max"
    # loss.py: D_wgangp_acgan(wgan_lambda=10.0, wgan_epsilon=0.001, wgan_target=1.0)
    assert (losses.WGAN_LAMBDA, losses.WGAN_DRIFT, losses.WGAN_TARGET) == (10.0, 0.001, 1.0)
    laptop = train.config_from_args(train.build_parser().parse_args([]))
    assert laptop.loss == "nonsat" and laptop.total_kimg is None
    assert dict(laptop.batch) == {r: 32 for r in dict(laptop.batch)} and set(dict(laptop.lr).values()) == {1e-3}
    # The laptop schedule still ends one stabilize phase after the last fade.
    assert [p.steps * p.batch for p in laptop.schedule()] == [16 * 1000] * 7


@pytest.mark.parametrize("ranks,gpus", [(3, 2), (6, 4), (16, 8)])
def test_other_rank_counts_take_the_next_lower_preset_rounded_as_the_official_code_rounds(ranks, gpus):
    # What the official TrainingSchedule computes with num_gpus = ranks and that preset's tables.
    phases = paper_config("--max-res", "1024", ranks=ranks).schedule()
    for phase, start, end in phase_spans(phases):
        lod, res, minibatch, lrate = official_schedule((start + end) // 2, 10, ranks, OFFICIAL[gpus])
        assert (phase.res, phase.batch, phase.lr) == (res, minibatch, lrate)


def test_batch_and_lr_tables_override_only_the_resolutions_they_name():
    config = paper_config("--batch", "256:4,128:12", "--lr", "1024:0.0025")
    batch, lr = dict(config.batch), dict(config.lr)
    assert batch[256] == 4 and batch[128] == 12 and batch[64] == 32 and batch[4] == 128 and batch[1024] == 4
    assert lr[1024] == 0.0025 and lr[256] == 0.001
    plain = paper_config("--batch", "16", "--lr", "0.002")
    assert set(dict(plain.batch).values()) == {16} and set(dict(plain.lr).values()) == {0.002}
    mixed = paper_config("--batch", "16,256:8")
    assert dict(mixed.batch)[256] == 8 and dict(mixed.batch)[4] == 16


# ----- item 3: the gradient penalty's scale while growing -----------------------------------------

@pytest.mark.parametrize("res,max_res,fading", [(4, 16, False), (8, 32, True), (16, 16, False)])
def test_penalty_is_the_official_one_on_the_input_upscaled_to_max_res(res, max_res, fading):
    torch.manual_seed(0)
    D = Discriminator(NetworkConfig(max_res=max_res, latent_size=8, fmap_base=64, fmap_max=16)).double()
    alpha = torch.tensor(0.3, dtype=torch.float64) if fading else None
    reals, fakes = torch.randn(4, 3, res, res, dtype=torch.float64), torch.randn(4, 3, res, res, dtype=torch.float64)
    mix = torch.rand(4, 1, 1, 1, dtype=torch.float64)
    f = max_res // res

    # The official code: reals and fakes reach D at max_res, nearest-upscaled (tf.tile); D average-pools
    # the input back down (downscale2d) before the layers of the current resolution.
    up = lambda x: x.repeat_interleave(f, 2).repeat_interleave(f, 3)  # noqa: E731
    mixed_full = torch.lerp(up(reals), up(fakes), mix).requires_grad_(True)
    scores = D(F.avg_pool2d(mixed_full, f) if f > 1 else mixed_full, res, alpha)
    (grad,) = torch.autograd.grad(scores.sum(), mixed_full)
    want = 10.0 * (grad.flatten(1).norm(dim=1) - 1.0).square().mean()

    got = losses.gradient_penalty(lambda x: D(x, res, alpha), reals, fakes, mix=mix,
                                  norm_scale=losses.penalty_norm_scale(res, max_res))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if f > 1:  # the penalty at the phase's own resolution is another number
        old = losses.gradient_penalty(lambda x: D(x, res, alpha), reals, fakes, mix=mix)
        assert not torch.allclose(old, want)


def test_training_step_penalises_with_its_phase_resolution_scale(monkeypatch):
    from progan_fast.gan_state import GANState
    from progan_fast.step import train_step

    seen = []
    real_loss = losses.discriminator_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["penalty_norm_scale"])
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(losses, "discriminator_loss", spy)
    config = NetworkConfig(max_res=16, latent_size=8, fmap_base=32, fmap_max=8)
    for gp_resolution, expected in (("max", [0.25, 0.5, 1.0]), ("phase", [1.0, 1.0, 1.0])):
        seen.clear()
        state = GANState.create(config, torch.device("cpu"), loss="wgan-gp", gp_resolution=gp_resolution)
        for res in (4, 8, 16):
            train_step(state, torch.randn(4, 3, res, res), res, None)
        assert seen == expected


# ----- items 2 and 4 through the command line ------------------------------------------------------

TINY = ["--max-res", "8", "--kimg-per-phase", "0.02", "--batch", "4", "--fmap-base", "32", "--fmap-max", "8",
        "--latent-size", "8", "--no-progress", "--no-tensorboard", "--device", "cpu"]


class Cli:
    """``python -m progan_fast.train ARGS`` in this process (``run(*args)`` -> its exit status and stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args):
        self.capsys.readouterr()
        code = train.main([str(a) for a in args])
        return subprocess.CompletedProcess(args, code, "", self.capsys.readouterr().err)


@pytest.fixture
def run_cli(capsys):
    return Cli(capsys)


def clean_error(result, *fragments):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.slow
def test_total_kimg_gives_the_final_phase_the_rest_and_the_printout_and_bar_show_it(tmp_path, run_cli):
    args = [a for a in TINY if a != "--no-progress"]
    result = run_cli(*args, "--total-kimg", "0.1", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    # 4px stable 20 images, 8px fade 20, and the final stabilize phase every image up to 100.
    assert "   8px: fade 0.02 + stable 0.06 kimg, batch 4, lr 0.001" in result.stderr
    assert "total: 0.1 kimg" in result.stderr and "done: 0.1 kimg" in result.stderr
    assert "100/100" in result.stderr  # the progress bar's total


@pytest.mark.parametrize("flags,fragments", [
    (["--batch", "256:x"], ["--batch", "'256:x'"]),
    (["--batch", "300:4"], ["--batch", "300"]),
    (["--lr", "8:2"], ["--lr must be in (0, 1)", "8px"]),
    (["--total-kimg", "0.03"], ["--total-kimg 0.03 ends before the last fade"]),
    (["--total-kimg", "lots"], ["--total-kimg must be a number"]),
    (["--batch", "8:2"], ["the batch at 8px is 2 per rank", "minibatch-stddev group size 4", "--mbstd-group"]),
])
def test_bad_tables_and_lengths_are_one_error_line(tmp_path, run_cli, flags, fragments):
    clean_error(run_cli(*TINY, *flags, "--out", tmp_path / "run"), *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_small_per_rank_batch_trains_once_the_group_is_given(tmp_path, run_cli):
    result = run_cli(*TINY, "--batch", "8:2", "--mbstd-group", "2", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_resume_may_change_the_batch_of_resolutions_not_started(tmp_path, run_cli):
    out = tmp_path / "run"
    assert run_cli(*TINY, "--stop-after-kimg", "0.02", "--out", out).returncode == 0  # 4px done, 8px not started
    line = clean_error(run_cli(*TINY, "--batch", "4,4:8", "--resume", "auto", "--out", out), "--batch 4:4", "4px")
    assert "not started" in line
    resumed = run_cli(*TINY, "--batch", "4,8:8", "--stop-after-kimg", "0.036", "--resume", "auto", "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "batch changed for resolutions not started yet: 8px 4 -> 8" in resumed.stderr
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["batch"]["8"] == 8 and saved["batch"]["4"] == 4
    # 8px has started now (the fade is two steps in): its batch is fixed; no --batch keeps the run's.
    clean_error(run_cli(*TINY, "--batch", "4", "--resume", "auto", "--out", out), "--batch 8:8", "8px")
    assert run_cli(*TINY[:4], *TINY[6:], "--resume", "auto", "--out", out).returncode == 0


# ----- runs written before these settings existed ---------------------------------------------------

def _make_old_format(out: Path) -> None:
    """Rewrite a run's config.json and checkpoints as progan_fast wrote them before tables, total_kimg
    and gp_resolution: ``batch`` one number (or null), ``lr`` one number, the new keys absent."""
    def old(cfg):
        cfg = {k: v for k, v in cfg.items() if k not in ("total_kimg", "gp_resolution")}
        cfg["batch"] = next(iter(set(cfg["batch"].values())))
        cfg["lr"] = next(iter(set(cfg["lr"].values())))
        return cfg

    doc = json.loads((out / "config.json").read_text())
    doc["config"] = old(doc["config"])
    (out / "config.json").write_text(json.dumps(doc))
    for ckpt in (out / "checkpoints").glob("ckpt-*.pt"):
        state = torch.load(ckpt, weights_only=True)
        state["config"] = old(state["config"])
        torch.save(state, ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
def test_a_run_from_before_resumes_unchanged_or_is_refused_with_the_flags_that_continue_it(tmp_path, run_cli, loss):
    out = tmp_path / "run"
    args = [*TINY, "--loss", loss]
    gp = ["--gp-resolution", "phase"] if loss == "wgan-gp" else []
    assert run_cli(*args, *gp, "--stop-after-kimg", "0.028", "--out", out).returncode == 0
    _make_old_format(out)
    if loss == "wgan-gp":  # its penalty was at the phase's resolution: today's default would change it
        clean_error(run_cli(*args, "--resume", "auto", "--out", out), "--gp-resolution: 'phase' in the run",
                    "pass --gp-resolution phase")
    resumed = run_cli(*args, *gp, "--resume", "auto", "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr


def test_an_old_paper_run_names_what_today_s_paper_preset_changed(tmp_path):
    from progan_fast.cli import UsageError
    from progan_fast.run_folder import RunFolder

    stored = {"max_res": 256, "fmap_base": 8192, "fmap_max": 512, "kimg_per_phase": 600.0, "batch": None,
              "lr": 0.001, "ema_beta": 0.999, "loss": "nonsat"}
    old = TrainConfig.from_dict(stored)
    assert dict(old.batch) == {r: OFFICIAL[1]["minibatch_dict"].get(r, 4) for r in dict(old.batch)}
    assert old.total_kimg is None and old.gp_resolution == "max"
    (tmp_path / "config.json").write_text(json.dumps({"config": stored}))
    folder = RunFolder(tmp_path, log=lambda m: None)
    with pytest.raises(UsageError) as e:  # today's preset: wgan-gp for 12000 kimg (its tables are the run's)
        folder.checkpoint_to_resume(paper_config(), "auto")
    assert str(e.value).endswith("pass --loss nonsat --total-kimg none")
    config, checkpoint = folder.checkpoint_to_resume(paper_config("--loss", "nonsat", "--total-kimg", "none"), "auto")
    assert checkpoint is None and config == old  # the run's lr table (0.001 everywhere) is kept


# ----- issue 27 item 4: out of memory in a step ----------------------------------------------------

def test_out_of_memory_in_a_step_stops_with_one_line_naming_the_phase_and_the_batch_flag(tmp_path, run_cli,
                                                                                        monkeypatch):
    """A device allocation failing inside a step (raised here from the step itself, as the CUDA
    allocator raises it) ends the run with exit 1 and one error line: the phase, its batch, the
    newest checkpoint (intact, still loadable) and the --batch that halves that resolution's batch."""
    from progan_fast import step as stepmod
    from progan_fast.checkpoint import list_checkpoints, load_checkpoint
    from progan_fast.cli import DEVICE_OUT_OF_MEMORY

    real_call = stepmod.Iteration.__call__

    def call(self):
        if self.res == 8:  # 4px trains (and is checkpointed at its end); the first 8px step fails
            raise DEVICE_OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self)

    monkeypatch.setattr(stepmod.Iteration, "__call__", call)
    out = tmp_path / "run"
    args = [a for a in TINY if a not in ("--batch", "4")]
    result = run_cli(*args, "--out", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert "out of device memory in a training step at 8px fade (batch 32)" in line, line
    assert f"the newest checkpoint, {newest.name}, is intact" in line, line
    assert "--resume auto" in line and line.endswith("--batch 8:16"), line
    assert load_checkpoint(newest)["phase_index"] == 1  # the end of 4px: the 8px fade starts from it

    # With --batch given, the hint says to add the entry to that table instead of a second flag.
    result = run_cli(*TINY, "--out", tmp_path / "run2")
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and "continue with 8:2 added to --batch in:" in line, line
    monkeypatch.setattr(stepmod.Iteration, "__call__", real_call)  # memory enough now: the hint's resume runs
    assert run_cli(*args, "--out", out, "--resume", "auto", "--batch", "8:16").returncode == 0
