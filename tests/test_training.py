"""Training behaviour: D learns, resume is bit-identical (with --backend auto too), a finished run grows."""

import json

import pytest
import torch

from progan_fast import ops, train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import fade_reals, train_step

TINY = ["--max-res", "8", "--kimg-per-phase", "0.1", "--batch", "8", "--fmap-base", "64", "--fmap-max", "16",
        "--latent-size", "16", "--no-progress", "--no-tensorboard", "--log-kimg", "0.05"]


def synthetic_images(n, res, seed=0):
    """Smooth colour gradients: a simple distribution that D can learn to tell from G's noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, res)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return (colour * ramp.view(1, 1, 1, res) * ramp.view(1, 1, res, 1).abs()).clamp(-1, 1)


@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
@pytest.mark.slow
def test_discriminator_loss_falls_over_a_few_hundred_steps(loss):
    torch.manual_seed(0)
    cfg = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
    state = GANState.create(cfg, torch.device("cpu"), loss=loss)
    data = synthetic_images(256, 8)
    d_losses = []
    for step in range(300):
        reals = fade_reals(data[torch.randint(256, (16,))], None)
        d_losses.append(train_step(state, reals, 8, None).d_loss.item())
    first, last = sum(d_losses[:30]) / 30, sum(d_losses[-30:]) / 30
    assert all(torch.isfinite(torch.tensor(d_losses)))
    assert last < first - 0.1, (first, last)


def test_minimax_and_fade_steps_run():
    torch.manual_seed(0)
    cfg = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
    state = GANState.create(cfg, torch.device("cpu"), loss="minimax")
    before = [p.clone() for p in state.G.parameters()]
    ema_before = [p.clone() for p in state.G_ema.parameters()]
    out = train_step(state, fade_reals(synthetic_images(8, 8), 0.5), 8, torch.tensor(0.5))
    assert torch.isfinite(out.d_loss) and torch.isfinite(out.g_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.G.parameters()))
    # EMA moved by (1 - beta) of the way towards G. That is ~1e-6 after one step, below
    # assert_close's default float32 atol (1e-5), so compare the change itself, to within the
    # rounding of G_ema (one float32 ulp of the result, two allowed).
    def flat(tensors):
        return torch.cat([t.detach().double().flatten() for t in tensors])

    e0, e1, g = flat(ema_before), flat(state.G_ema.parameters()), flat(state.G.parameters())
    change, expected = e1 - e0, (g - e0) * 0.001
    rounding = 2 * torch.finfo(torch.float32).eps * e1.abs()
    assert (change - expected).abs().le(rounding).all()
    # Most changes exceed that rounding, so an EMA that did not move, or moved by a wrong beta, fails.
    assert (expected.abs() > rounding).double().mean() > 0.9


def final_state(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def assert_same_training_state(a, b):
    assert (a["phase_index"], a["step"], a["images"]) == (b["phase_index"], b["step"], b["images"])
    for key in ("G", "D", "G_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for key in ("opt_G", "opt_D"):
        for pid, s in a[key]["state"].items():
            for name, t in s.items():
                assert torch.equal(t, b[key]["state"][pid][name]), f"{key}[{pid}].{name} differs"
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])


@pytest.mark.parametrize("stop_kimg", ["0.152", "0.104"])  # mid-phase, and exactly at a phase boundary
@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
def test_resume_after_a_stop_is_bit_identical(tmp_path, stop_kimg, loss):
    # The wgan-gp cases also mirror the reals (--mirror's coins are part of the resumed RNG stream).
    common = TINY + ["--loss", loss] + (["--mirror"] if loss == "wgan-gp" else [])
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--stop-after-kimg", stop_kimg]) == 0
    stopped = final_state(tmp_path / "split")
    assert stopped["images"] == int(float(stop_kimg) * 1000)
    assert train.main(common + ["--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert_same_training_state(final_state(tmp_path / "whole"), final_state(tmp_path / "split"))


def test_a_finished_run_grows_to_a_larger_max_res(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--out", out]) == 0
    small = final_state(tmp_path / "run")
    grown_args = [a if a != "8" or i != 1 else "16" for i, a in enumerate(TINY)]
    assert train.main(grown_args + ["--out", out, "--resume", "auto"]) == 0
    assert "growing the run from 8px to 16px" in capsys.readouterr().err
    big = final_state(tmp_path / "run")
    assert big["config"]["max_res"] == 16 and big["phase_index"] == 5 and big["images"] == 5 * 13 * 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["max_res"] == 16
    # new layers trained; the samples of the grown run are 16x16
    assert set(big["G"]) > set(small["G"])
    from PIL import Image
    assert Image.open(tmp_path / "run" / "samples" / "latest.png").size == (8 * 64, 8 * 64)


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY[:-3] + ["--out", str(out), "--log-kimg", "0.05"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records and {"kimg", "res", "phase", "alpha", "img_per_s", "D_loss", "G_loss"} <= set(records[0])
    assert [r["res"] for r in records][-1] == 8
    assert (out / "samples" / "reals.png").is_file() and (out / "samples" / "latest.png").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list_checkpoints(out / "checkpoints")) <= 3


def test_swd_logging_leaves_training_unchanged(tmp_path):
    """--swd-kimg writes SWD records to log.jsonl and never touches the training RNG."""
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    assert train.main(TINY + ["--out", str(plain)]) == 0
    assert train.main(TINY + ["--out", str(scored), "--swd-kimg", "0.05", "--swd-images", "32"]) == 0
    records = [json.loads(line) for line in (scored / "log.jsonl").read_text().splitlines()]
    swd = [r for r in records if "SWDx1e3_avg" in r]
    assert {r["res"] for r in swd} == {4, 8} and len(swd) >= 3
    assert all(r["SWDx1e3_avg"] > 0 for r in swd)
    assert_same_training_state(final_state(plain), final_state(scored))


def test_a_checkpoint_with_a_setting_this_version_does_not_know_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    newest = list_checkpoints(out / "checkpoints")[-1]
    state = load_checkpoint(newest)
    state["config"]["style_mixing"] = 0.9  # as if written by a later progan_fast
    future = newest.with_name("ckpt-999999999999.pt")
    torch.save(state, future)
    before = future.read_bytes()
    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "style_mixing" in err and "unknown to this progan_fast" in err
    assert future.read_bytes() == before


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from progan_fast.cli import TrainingDiverged
    from progan_fast.config import RunOptions, TrainConfig
    from progan_fast.trainer import Trainer

    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    saved = {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")}
    config = TrainConfig.from_dict(final_state(out)["config"])
    trainer = Trainer(config, RunOptions(out=out, resume="auto", progress=False, tensorboard=False), log=lambda m: None)
    trainer.checkpoint()  # finite weights: written (over the same step's file)
    good = {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")}
    assert set(good) == set(saved)
    with torch.no_grad():
        next(trainer.state.D.parameters()).view(-1)[0] = float("nan")
    trainer.step += 1  # a later step: it would get a new file name
    with pytest.raises(TrainingDiverged, match="non-finite weights in D"):
        trainer.checkpoint()
    assert {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")} == good
    assert all(torch.isfinite(t).all() for p in list_checkpoints(out / "checkpoints")
               for t in load_checkpoint(p)["D"].values())


def test_adam_starts_afresh_at_every_phase(tmp_path):
    """The official code resets Adam's moments and step count when a phase starts. Every phase
    ends with a checkpoint, whose Adam has taken exactly that phase's steps; a carried-over Adam
    would have counted the earlier phases' steps too."""
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out)]) == 0
    batch = int(TINY[TINY.index("--batch") + 1])
    checkpoints = [load_checkpoint(path) for path in list_checkpoints(out / "checkpoints")]
    assert [c["phase_index"] for c in checkpoints] == [1, 2, 3]  # 4px; 8px fade; 8px stable
    images_before = 0
    for c in checkpoints:
        phase_steps = (c["images"] - images_before) // batch
        images_before = c["images"]
        for opt in ("opt_G", "opt_D"):
            steps = {float(s["step"]) for s in c[opt]["state"].values()}
            assert steps == {phase_steps}, f"{opt} after phase {c['phase_index'] - 1}: steps {steps}"


# ----- --backend auto --------------------------------------------------------------------------

#: The ops a fake timer lets the native twins win (the conv goes to the reference), as measured on a CPU.
CPU_WINS = {"pixel_norm", "minibatch_stddev", "downsample2x", "fade_in", "fade_reals", "blend"}


def op_timer(flip=frozenset(), timed=None):
    """A timer with fixed winners (``cpu`` for :data:`CPU_WINS`, else ``reference``), the other
    way round for the keys in ``flip``; records every key it times in ``timed``."""
    def timer(trial):
        if timed is not None:
            timed.append(trial.key)
        cpu_wins = (trial.op in CPU_WINS) != (trial.key in flip)
        return 1.0 if (trial.backend == "cpu") == cpu_wins else 2.0
    return timer


def auto_wins_step_checks(monkeypatch):
    """Every phase's step check (progan_fast/step_choice.py) keeps auto's choices, whatever the
    machine measures, so runs that are compared bit for bit train with the same backends."""
    from progan_fast import step_choice

    monkeypatch.setattr(step_choice, "TIMER", lambda setup, run: (run(), 1.0 if setup.backend == "auto" else 2.0)[1])


needs_cpu_backend = pytest.mark.skipif("cpu" not in ops.all_op_implementations()["pixel_norm"],
                                       reason="the native library (cpu backend) is not built")


@needs_cpu_backend
@pytest.mark.slow
def test_resume_with_auto_is_bit_identical_and_times_nothing_the_checkpoint_chose(tmp_path, monkeypatch, capsys):
    autotune = ops.autotune
    common = TINY + ["--loss", "wgan-gp", "--backend", "auto"]
    auto_wins_step_checks(monkeypatch)
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(timer=op_timer()))
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--stop-after-kimg", "0.152"]) == 0
    saved = final_state(tmp_path / "split")["auto_choices"]
    assert set(saved.values()) == {"cpu", "reference"}  # both backends really run in this test
    # The resumed run's timer would pick the other backend for every key the checkpoint holds.
    timed = []
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(timer=op_timer(flip=set(saved), timed=timed)))
    capsys.readouterr()
    assert train.main(common + ["--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert f"reusing the checkpoint's {len(saved)} choices" in capsys.readouterr().err
    assert not set(timed) & set(saved)
    final = final_state(tmp_path / "split")
    assert_same_training_state(final_state(tmp_path / "whole"), final)
    assert {k: final["auto_choices"][k] for k in saved} == saved


@needs_cpu_backend
def test_auto_prints_one_line_per_op_family_and_logs_its_choices(tmp_path, monkeypatch, capsys):
    autotune = ops.autotune
    auto_wins_step_checks(monkeypatch)
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(timer=op_timer()))
    out = tmp_path / "run"
    assert train.main(TINY + ["--backend", "auto", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "backend auto: each op times its backends on first use" in err and "no choice cache" in err
    printed = [line.split(": ", 1)[1] for line in err.splitlines() if ": auto " in line]
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "auto" in r]
    assert records[0]["kimg"] == 0.008 and records[0]["res"] == 4  # after the first step
    # every report: one line per op family, in the order the ops were first called
    assert [line.split(":")[0] for line in printed] == [f"auto {op}" for r in records
                                                        for op in dict.fromkeys(c["op"] for c in r["auto"])]
    choices = [c for r in records for c in r["auto"]]
    assert {"conv2d_bias_lrelu", "pixel_norm", "minibatch_stddev", "fade_in", "blend", "downsample2x",
            "fade_reals"} <= {c["op"] for c in choices}
    for c in choices:
        assert c["backend"] == ("cpu" if c["op"] in CPU_WINS else "reference"), c
        assert c["source"] == "timed" and set(c["ms"]) == {"cpu", "reference"}
    assert len({c["key"] for c in choices}) == len(choices)  # each key chosen once
    assert final_state(out)["auto_choices"] == {c["key"]: c["backend"] for c in choices}
