"""Issue 27, item 3: DiffAugment (``--augment``, ``--augment-p P|ada``).

Each transform against a direct formula written here; gradients through the policy (gradcheck and
gradgradcheck, for the penalty); every image D sees goes through it; the iteration with it is
capture-safe; ADA's probability rises when D overfits 64 images; a resume is bit-identical.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from progan_fast import augment as aug
from progan_fast import train
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import Iteration, train_step
from test_capture_safety import HOST_SYNC_OPS, assert_capture_safe, make_iteration, run_two_steps
from test_training import TINY, assert_same_training_state, final_state, synthetic_images


def test_policy_and_p_parsing():
    assert aug.parse_policy("translation,cutout,color") == ("color", "translation", "cutout")
    assert aug.parse_policy(" cutout ") == ("cutout",)
    for bad in ("", "rotate", "color,flip"):
        with pytest.raises(ValueError, match="--augment"):
            aug.parse_policy(bad)
    assert aug.parse_p("ada") == "ada" and aug.parse_p("0.25") == 0.25
    for bad in ("1.5", "-0.1", "nan", "often"):
        with pytest.raises(ValueError, match="--augment-p"):
            aug.parse_p(bad)


def test_translate_matches_a_direct_shift():
    x = torch.randn(4, 2, 5, 7, dtype=torch.float64)
    dy, dx = torch.tensor([0, 1, -2, 6]), torch.tensor([0, -3, 2, 1])
    got = aug.translate(x, dy, dx).numpy()
    a = x.numpy()
    want = np.zeros_like(a)
    for n in range(4):
        for i in range(5):
            for j in range(7):
                si, sj = i + int(dy[n]), j + int(dx[n])
                if 0 <= si < 5 and 0 <= sj < 7:
                    want[n, :, i, j] = a[n, :, si, sj]
    np.testing.assert_array_equal(got, want)


def test_cutout_matches_diffaugments_clamped_index_construction():
    x = torch.randn(5, 3, 8, 6, dtype=torch.float64)
    size = aug.cutout_size(8, 6)
    assert size == (4, 3)
    cy, cx = torch.tensor([0, 3, 8, 4, 7]), torch.tensor([0, 2, 5, 6, 1])
    got = aug.cutout(x, cy, cx, size).numpy()
    want = x.numpy().copy()
    for n in range(5):  # DiffAugment: the cells offset - size // 2 + k, clamped into the image, are zeroed
        for k in range(size[0]):
            for m in range(size[1]):
                i = min(max(int(cy[n]) - size[0] // 2 + k, 0), 7)
                j = min(max(int(cx[n]) - size[1] // 2 + m, 0), 5)
                want[n, :, i, j] = 0.0
    np.testing.assert_array_equal(got, want)


def test_colour_transforms_match_their_formulas():
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    v = torch.tensor([0.3, -0.5, 1.7], dtype=torch.float64)
    a, w = x.numpy(), v.numpy()[:, None, None, None]
    np.testing.assert_allclose(aug.brightness(x, v).numpy(), a + w)
    m = a.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(aug.saturation(x, v).numpy(), (a - m) * w + m)
    m = a.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(aug.contrast(x, v).numpy(), (a - m) * w + m)
    gray = x[:, :1]
    torch.testing.assert_close(aug.saturation(gray, v), gray)  # one channel: nothing to saturate


def test_draws_stay_in_diffaugments_ranges_and_p_selects_per_image():
    x = torch.zeros(2000, 1, 16, 16, dtype=torch.float64)
    torch.manual_seed(0)
    out = aug.Augment(("color",), 0.5, torch.device("cpu"))(x, 2000)
    b = out[:, 0, 0, 0]  # zeros: saturation and contrast keep 0 + brightness, so each pixel is the brightness
    changed = b != 0
    assert 0.45 < changed.double().mean() < 0.55  # a coin per image
    assert b.min() >= -0.5 and b.max() < 0.5 and b[changed].abs().mean() > 0.2
    torch.manual_seed(0)
    assert torch.equal(aug.Augment(("color", "translation", "cutout"), 0.0, torch.device("cpu"))(x + 1, 2000), x + 1)


def test_gradients_flow_through_the_policy():
    policy = ("color", "translation", "cutout")
    augment = aug.Augment(policy, 1.0, torch.device("cpu"))

    def f(x):
        torch.manual_seed(3)  # the same draws at every evaluation
        return augment(x, x.shape[0])

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert not torch.equal(f(x), x)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))  # the gradient penalty differentiates the gradient


@pytest.mark.parametrize("loss,calls", [("nonsat", 3), ("wgan-gp", 4)])
def test_every_image_d_sees_is_augmented(loss, calls, monkeypatch):
    """Reals and fakes in the D step, the penalty's mixes, and the fakes of the G step."""
    cfg = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
    torch.manual_seed(0)
    state = GANState.create(cfg, torch.device("cpu"), loss=loss)
    augment = aug.Augment(("translation",), 1.0, torch.device("cpu"))
    seen = []
    original = aug.Augment.__call__
    monkeypatch.setattr(aug.Augment, "__call__", lambda self, x, *a: seen.append(tuple(x.shape)) or original(self, x, *a))
    train_step(state, synthetic_images(8, 8), 8, None, augment=augment)
    assert seen == [(8, 3, 8, 8)] * calls


@pytest.mark.parametrize("loss", ["nonsat", "wgan-gp"])
def test_the_iteration_with_augment_is_capture_safe(loss):
    augment = aug.Augment(("color", "translation", "cutout"), "ada", torch.device("cpu"))
    it, images = make_iteration(loss, None, True, False, iteration=functools.partial(Iteration, augment=augment))
    first, second = run_two_steps(it, images, False)
    names = {e.op for e in first}
    assert "aten::gather" in names  # translation ran
    assert not names & HOST_SYNC_OPS, sorted(names & HOST_SYNC_OPS)
    assert_capture_safe(first, second)


def test_ada_moves_p_by_the_sign_of_d_on_reals():
    for scores, moves in ((torch.ones(8), 1), (-torch.ones(8), 0), (torch.tensor([1.0] * 5 + [-1.0] * 3), -1)):
        a = aug.Augment(("color",), "ada", torch.device("cpu"))
        a.p.fill_(0.5)
        for step in range(aug.ADA_INTERVAL):
            assert float(a.p) == 0.5  # only every ADA_INTERVAL steps
            a.observe(scores, 8, lambda t: t)
        # r_t = 1 (> 0.6: up), -1 and 0.25 (< 0.6: down); one step of 8 * 4 / 500k
        step_size = 8 * aug.ADA_INTERVAL / (aug.ADA_KIMG * 1000)
        assert float(a.p) == pytest.approx(0.5 + (step_size if moves == 1 else -step_size))
        assert float(a.signs[1]) == 0.0  # the statistic restarts


@pytest.mark.slow
def test_ada_p_rises_when_d_overfits_64_images(monkeypatch):
    monkeypatch.setattr(aug, "ADA_KIMG", 0.5)  # a visible move within a test's few steps: 0.128 per update
    cfg = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)
    torch.manual_seed(0)
    state = GANState.create(cfg, torch.device("cpu"), loss="nonsat", lr=0.005)  # D learns the 64 images fast
    images = (synthetic_images(64, 8) * 127.5 + 127.5).round().to(torch.uint8)
    augment = aug.Augment(("color", "translation", "cutout"), "ada", torch.device("cpu"))
    it = Iteration(state, 8, 16, False, torch.device("cpu"), images, augment=augment)
    ps = []
    for _ in range(20):
        it()
        ps.append(float(augment.p))
    # Within a few steps D is sure of the 64 smooth images (E[sign(D(real))] > 0.6) and P goes up
    # (seen: 0 for 11 steps, then 0.128, 0.256; augmented, D is less sure and P comes down again).
    assert ps[:3] == [0.0] * 3 and max(ps) >= 0.128, ps
    assert it.read_sums()["augment_p"] > 0  # logged


@pytest.mark.slow
def test_resume_with_ada_is_bit_identical(tmp_path):
    common = TINY + ["--augment", "translation,cutout,color", "--augment-p", "ada"]
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--stop-after-kimg", "0.152"]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    whole, split = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert_same_training_state(whole, split)
    assert all(torch.equal(whole["augment"][k], split["augment"][k]) for k in ("p", "signs", "steps"))
    assert whole["config"]["augment"] == "color,translation,cutout" and whole["config"]["augment_p"] == "ada"


def test_cli_refuses_bad_settings_and_a_changed_policy_on_resume(tmp_path, capsys):
    assert train.main(TINY + ["--augment", "rotate", "--out", str(tmp_path / "a")]) == 2
    assert "unknown: rotate" in capsys.readouterr().err
    assert train.main(TINY + ["--augment-p", "0.5", "--out", str(tmp_path / "b")]) == 2
    assert "--augment-p needs --augment" in capsys.readouterr().err
    run = tmp_path / "run"
    assert train.main(TINY + ["--augment", "cutout", "--stop-after-kimg", "0.016", "--out", str(run)]) == 0
    assert train.main(TINY + ["--augment", "cutout", "--augment-p", "0.5", "--out", str(run), "--resume", "auto"]) == 2
    assert "--augment-p: 1.0 in the run, 0.5 now" in capsys.readouterr().err
    text = train.build_parser().format_help()
    assert "--augment POLICY" in text and "--augment-p P|ada" in text


@pytest.mark.slow
def test_two_gloo_ranks_augment_like_one_process(tmp_path):
    """Each rank keeps its rows of the global batch's draws, and ADA's statistic is summed over the
    ranks: two ranks train to the weights and the P of one process."""
    from test_distributed import TINY as DDP_TINY
    from test_distributed import assert_same_weights, final, image_folder, run_cli

    data = image_folder(tmp_path / "images")
    args = DDP_TINY + ["--data", str(data), "--loss", "wgan-gp", "--augment", "translation,cutout,color",
                       "--augment-p", "ada"]
    one = run_cli(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli(args + ["--out", str(tmp_path / "two")], ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = final(tmp_path / "one"), final(tmp_path / "two")
    assert_same_weights(a, b)
    assert torch.equal(a["augment"]["steps"], b["augment"]["steps"])
    assert float(b["augment"]["p"]) == pytest.approx(float(a["augment"]["p"]), abs=1e-6)


def test_a_copy_leaves_the_original_untouched():
    a = aug.Augment(("color",), "ada", torch.device("cpu"))
    a.observe(torch.ones(8), 8, lambda t: t)
    twin = a.copy()
    for _ in range(aug.ADA_INTERVAL):
        twin.observe(torch.ones(8), 8, lambda t: t)
    assert float(twin.p) > 0 and float(a.p) == 0 and float(a.signs[1]) == 8 and int(a.steps) == 1
