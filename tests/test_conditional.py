"""Class-conditional training (--cond): AC-GAN as the official code does it, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from progan_fast import generate, losses, metrics, train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.gan_state import GANState
from progan_fast.networks import Discriminator, Generator, NetworkConfig
from progan_fast.step import Iteration
from test_distributed import assert_same_weights, run_cli
from test_training import TINY, assert_same_training_state, final_state

CFG = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16, num_classes=3)


def class_folder(root: Path, per_class: int = 12, classes=("blue", "red")) -> Path:
    """Two visibly different classes: noisy mostly-red and mostly-blue 16x16 images."""
    g = torch.Generator().manual_seed(3)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 60, (16, 16, 3), generator=g)
            pixels[..., 2 - 2 * k] += 190  # blue channel for class 0 (blue), red for class 1 (red)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{i:02d}.png")
    return root


# ----- networks and losses ---------------------------------------------------------------------------

def test_conditional_shapes():
    torch.manual_seed(0)
    G, D = Generator(CFG), Discriminator(CFG)
    assert G.input.weight.shape[1] == 16 + 3  # latent and one-hot, concatenated
    z, y = torch.randn(5, 16), torch.tensor([0, 1, 2, 1, 0])
    img = G(z, 8, 0.5, y)
    assert img.shape == (5, 3, 8, 8)
    assert D(img, 8, 0.5).shape == (5, 1 + 3)
    # The label changes the image; the latent alone does not decide it.
    assert not torch.allclose(G(z, 8, None, y), G(z, 8, None, (y + 1) % 3))
    with pytest.raises(ValueError, match="conditional"):
        G(z, 8)
    plain = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
    with pytest.raises(ValueError, match="unconditional"):
        Generator(plain)(z, 8, None, y)
    assert Discriminator(plain)(img, 8).shape == (5,)


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        rows.append(-(row[y] - math.log(sum(math.exp(v) for v in row))))
    return torch.tensor(sum(rows) / len(rows), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["nonsat", "minimax", "wgan-gp"])
def test_auxiliary_classifier_terms_against_a_hand_computation(kind):
    g = torch.Generator().manual_seed(1)
    real_out, fake_out = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g,
                                                                                          dtype=torch.float64)
    real_y, fake_y = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([2, 2, 0, 1, 1, 0])
    reals, fakes = torch.zeros(6, 1, dtype=torch.float64), torch.ones(6, 1, dtype=torch.float64)
    weight = 0.7

    def critic(x):  # reals -> real_out, fakes -> fake_out; the mixed images of the penalty -> a linear score
        if torch.equal(x, reals):
            return real_out
        if torch.equal(x, fakes):
            return fake_out
        return torch.cat([x * 3.0, torch.zeros(x.shape[0], 3, dtype=x.dtype)], dim=1)

    d_loss, stats = losses.discriminator_loss(kind, critic, reals, fakes, mix=torch.full((6, 1), 0.5,
                                              dtype=torch.float64), real_labels=real_y, fake_labels=fake_y,
                                              cond_weight=weight)
    plain, _ = losses.discriminator_loss(kind, lambda x: critic(x)[:, 0], reals, fakes,
                                         mix=torch.full((6, 1), 0.5, dtype=torch.float64))
    aux = cross_entropy_by_hand(real_out[:, 1:], real_y) + cross_entropy_by_hand(fake_out[:, 1:], fake_y)
    torch.testing.assert_close(d_loss, plain + weight * aux)
    torch.testing.assert_close(stats["D_labels"], aux)
    accuracy = (real_out[:, 1:].argmax(1) == real_y).double().mean()
    torch.testing.assert_close(stats["D_label_accuracy"].double(), accuracy)
    if kind == "wgan-gp":  # the penalty saw the score alone: d(3x)/dx = 3, (3 - 1)^2 * 10
        torch.testing.assert_close(stats["penalty"], torch.tensor(40.0, dtype=torch.float64))
    g_loss = losses.generator_loss(kind, fake_out, fake_y, weight)
    torch.testing.assert_close(g_loss, losses.generator_loss(kind, fake_out[:, 0]) +
                               weight * cross_entropy_by_hand(fake_out[:, 1:], fake_y))


@pytest.mark.slow
def test_d_learns_the_classes_in_a_few_hundred_steps():
    """On two colour classes, D's label accuracy on reals rises from chance (0.56 in the first 25
    steps here) to 1 (from about step 50 on)."""
    torch.manual_seed(0)
    cfg = NetworkConfig(max_res=4, latent_size=16, fmap_base=64, fmap_max=16, num_classes=2)
    state = GANState.create(cfg, torch.device("cpu"), loss="wgan-gp")
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(64) % 2
    images = torch.randint(0, 60, (64, 3, 4, 4), generator=g)
    images[labels == 0, 2] += 190
    images[labels == 1, 0] += 190
    it = Iteration(state, 4, 16, False, torch.device("cpu"), images.to(torch.uint8), labels=labels)
    accuracy = []
    for step in range(200):
        it()
        if step % 25 == 24:
            accuracy.append(it.read_window().means["D_label_accuracy"])
    assert accuracy[0] < 0.9 and min(accuracy[-3:]) > 0.95, accuracy


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_conditional_steps_compute_the_same_on_every_backend(backend):
    """The class terms add no op of their own: a conditional step on the Triton kernels (the
    interpreter, here) or the C++ twins gives the reference's losses."""
    from progan_fast import ops
    from progan_fast.step import train_step

    def run(name):
        ops.set_default_backend(name, "cpu")
        try:
            torch.manual_seed(0)
            cfg = NetworkConfig(max_res=8, latent_size=8, fmap_base=24, fmap_max=6, num_classes=3)
            state = GANState.create(cfg, torch.device("cpu"), loss="wgan-gp")
            out = []
            for res, alpha in [(4, None), (8, 0.5)]:
                reals = torch.rand(4, 3, res, res) * 2 - 1
                step = train_step(state, reals, res, alpha, torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 2, 2]))
                out.append(torch.stack([step.d_loss, step.g_loss, step.stats["D_labels"]]))
            return torch.stack(out)
        finally:
            ops.set_default_backend("reference")

    try:
        ops.set_default_backend(backend, "cpu")
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    finally:
        ops.set_default_backend("reference")
    torch.testing.assert_close(run(backend), run("reference"), rtol=1e-4, atol=1e-4)


def test_fake_labels_follow_the_real_distribution(monkeypatch):
    """Each fake's class is the label of a uniformly drawn image: with 3 of 4 images in class 1, about
    3/4 of the fakes are class 1."""
    from progan_fast import step

    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"))
    seen = []
    real = Generator.forward

    def recording(self, z, res, alpha=None, labels=None):
        seen.append(labels)
        return real(self, z, res, alpha, labels)

    monkeypatch.setattr(Generator, "forward", recording)
    pool = torch.tensor([1, 1, 1, 0])
    reals = torch.zeros(400, 3, 8, 8)
    step.train_step(state, reals, 8, None, torch.zeros(400, dtype=torch.int64), pool)
    drawn = torch.cat([y for y in seen if y is not None])
    assert 0.68 < (drawn == 1).float().mean() < 0.82 and set(drawn.tolist()) <= {0, 1}


# ----- the command lines -----------------------------------------------------------------------------

@pytest.mark.slow
def test_conditional_run_resumes_bit_identically_and_samples_by_class(tmp_path, capsys):
    data = class_folder(tmp_path / "data")
    common = TINY + ["--data", str(data), "--cond", "--loss", "wgan-gp", "--mirror"]
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--stop-after-kimg", "0.152"]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    whole = final_state(tmp_path / "whole")
    assert_same_training_state(whole, final_state(tmp_path / "split"))
    assert whole["class_names"] == ["blue", "red"]
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert all("D_label_accuracy" in r and "D_labels" in r for r in records if "D_loss" in r)
    assert (tmp_path / "whole" / "samples" / "latest.png").is_file()
    capsys.readouterr()
    # Resuming without --cond would be another run: refused.
    assert train.main(TINY + ["--data", str(data), "--loss", "wgan-gp", "--mirror", "--out", str(tmp_path / "split"),
                              "--resume", "auto"]) == 2

    out = tmp_path / "all.png"
    assert generate.main([str(tmp_path / "whole"), "--n", "3", "--out", str(out), "--device", "cpu"]) == 0
    # two rows (classes) of three 8x8 images, each enlarged to a 64-pixel tile: (width, height)
    assert Image.open(out).size == (3 * 64, 2 * 64)
    capsys.readouterr()
    for klass, name in (("red", "r"), ("1", "r1"), ("blue", "b")):
        assert generate.main([str(tmp_path / "whole"), "--class", klass, "--n", "4", "--out",
                              str(tmp_path / f"{name}.png"), "--device", "cpu"]) == 0
        assert f"wrote {tmp_path / f'{name}.png'} (4 images" in capsys.readouterr().err
    assert Image.open(tmp_path / "r.png").size == (2 * 64, 2 * 64)  # 4 images of one class: square-ish
    # a class by name is that class by number (same seed, same latents), and another class draws otherwise
    red, red1, blue = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("r", "r1", "b"))
    assert red == red1 and red != blue
    assert generate.main([str(tmp_path / "whole"), "--class", "7", "--out", str(tmp_path / "x.png"),
                          "--device", "cpu"]) == 2
    assert "not a class of this run" in capsys.readouterr().err
    assert metrics.main([str(tmp_path / "whole"), "--n", "16", "--per-class", "--device", "cpu", "--no-save"]) == 0
    printed = capsys.readouterr().out
    assert "SWDx1e3_avg[blue]" in printed and "SWDx1e3_avg[red]" in printed


def test_bad_conditional_setups_exit_2_with_one_message(tmp_path, capsys):
    assert train.main(TINY + ["--cond", "--out", str(tmp_path / "a")]) == 2
    assert "embedded emoji set has no classes" in capsys.readouterr().err
    data = class_folder(tmp_path / "data")
    Image.new("RGB", (16, 16)).save(data / "loose.png")
    assert train.main(TINY + ["--data", str(data), "--cond", "--out", str(tmp_path / "b")]) == 2
    assert "loose.png" in capsys.readouterr().err
    assert generate.main([str(tmp_path / "b"), "--out", str(tmp_path / "x.png")]) == 2  # no checkpoint there
    (data / "loose.png").unlink()
    assert train.main(TINY + ["--data", str(data), "--out", str(tmp_path / "c"), "--stop-after-kimg", "0.008"]) == 0
    capsys.readouterr()
    assert generate.main([str(tmp_path / "c"), "--class", "0", "--out", str(tmp_path / "x.png"), "--device",
                          "cpu"]) == 2
    assert "not from a class-conditional run" in capsys.readouterr().err
    assert train.main(TINY + ["--data", str(data), "--cond", "--cond-weight", "-1", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "error: --cond-weight must be a non-negative number, not -1" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_two_ranks_train_a_conditional_run_like_one_process(tmp_path):
    data = class_folder(tmp_path / "data")
    args = TINY + ["--data", str(data), "--cond", "--kimg-per-phase", "0.064"]
    one = run_cli(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli(args + ["--out", str(tmp_path / "two")], ranks=2)
    assert two.returncode == 0, two.stderr
    assert_same_weights(load_checkpoint(list_checkpoints(tmp_path / "one" / "checkpoints")[-1]),
                        load_checkpoint(list_checkpoints(tmp_path / "two" / "checkpoints")[-1]))


@pytest.mark.parametrize("backend", ["cpu"])
def test_conditional_amp_run_with_a_native_backend(tmp_path, backend):
    from progan_fast.ops import _native

    if _native.ops is None:
        pytest.skip("the native library did not load")
    data = class_folder(tmp_path / "data")
    for name, amp in (("amp", ["--amp"]), ("fp32", [])):
        assert train.main(TINY + ["--data", str(data), "--cond", *amp, "--backend", backend, "--out",
                                  str(tmp_path / name), "--stop-after-kimg", "0.064"]) == 0
    amp, fp32 = final_state(tmp_path / "amp"), final_state(tmp_path / "fp32")
    # bf16 autocast trains what the fp32 run trains (8 steps: weights within 0.02, seen 0.005; the
    # class head included), and it did run in bf16 (the weights are not the fp32 run's bit for bit).
    differs = False
    for net in ("G", "D"):
        for k, want in fp32[net].items():
            got = amp[net][k]
            assert torch.isfinite(got).all(), f"{net}.{k}"
            torch.testing.assert_close(got, want, rtol=0, atol=0.02, msg=lambda m: f"{net}.{k}: {m}")
            differs |= not torch.equal(got, want)
    assert differs, "the --amp run computed exactly what the fp32 run did: autocast was not on"
    records = [json.loads(line) for line in (tmp_path / "amp" / "log.jsonl").read_text().splitlines()]
    assert [r["D_label_accuracy"] for r in records if "D_loss" in r], "no class terms logged"


@pytest.mark.cuda
def test_graphed_conditional_training_matches_eager(tmp_path):
    data = class_folder(tmp_path / "data")
    common = TINY + ["--data", str(data), "--cond", "--device", "cuda", "--stop-after-kimg", "0.064"]
    assert train.main(common + ["--out", str(tmp_path / "eager")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "graphed"), "--cuda-graphs"]) == 0
    assert_same_weights(final_state(tmp_path / "eager"), final_state(tmp_path / "graphed"), atol=1e-4, rtol=1e-4)
