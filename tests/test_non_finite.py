"""Non-finite losses: found on the device, the step skipped, a run that keeps failing stopped."""

from __future__ import annotations

import json

import pytest
import torch

from nan_train import poison
from progan_fast import train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import Iteration
from test_training import TINY, synthetic_images

CFG = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)


@pytest.fixture
def poisoned():
    """``poisoned(steps)`` makes D's outputs NaN in those steps (None: all) until the test ends."""
    undo = []
    yield lambda steps: undo.append(poison(steps))
    for u in undo:
        u()


def snapshot(state: GANState) -> dict[str, torch.Tensor]:
    out = {f"{net}.{k}": v.clone() for net in ("G", "D") for k, v in getattr(state, net).state_dict().items()}
    for net in ("G", "D"):
        opt = getattr(state, f"opt_{net}")
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for k, v in opt.state[p].items():
                out[f"adam_{net}.{i}.{k}"] = v.clone()
    return out


@pytest.mark.parametrize("loss,fused_adam", [("nonsat", True), ("wgan-gp", True), ("nonsat", False)])
def test_a_non_finite_step_leaves_weights_and_adam_untouched(loss, fused_adam, poisoned):
    """The trainer's fused Adam skips on the device; the for-each one (tests only) via the host."""
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), loss=loss, fused_adam=fused_adam)
    assert bool(state.opt_D.defaults.get("fused")) == fused_adam
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 6, False, torch.device("cpu"), images)
    it()  # a finite step: Adam has state to protect
    clean = it.read_sums()
    before = snapshot(state)
    poisoned({0})  # the next call's step 0 of the patched loop
    it()
    after = snapshot(state)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in a skipped step"
    window = it.read_window()
    assert (window.steps, window.non_finite_steps, window.longest_non_finite_run) == (1, 1, 1)
    assert window.means == {} and all(v == 0.0 for v in window.loss_sums.values())
    it()  # finite again: trains, and the sums hold only finite steps
    assert any(not torch.equal(before[k], v) for k, v in snapshot(state).items() if k.startswith("D."))
    window = it.read_window()
    assert (window.steps, window.non_finite_steps) == (1, 0)
    assert window.longest_non_finite_run == 0  # the run ended with the finite step
    assert set(window.means) == set(clean) and all(v == v for v in window.means.values())


def test_the_longest_run_of_non_finite_steps_is_counted_across_windows(poisoned):
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"))
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 4, False, torch.device("cpu"), images)
    poisoned({1, 2, 3, 5, 6})
    for _ in range(3):
        it()
    first = it.read_window()
    for _ in range(4):
        it()
    second = it.read_window()
    assert (first.steps, first.non_finite_steps, first.longest_non_finite_run) == (3, 2, 2)
    # Steps 3 (a run carried over from the first window: 3 long), 4 finite, 5 and 6.
    assert (second.steps, second.non_finite_steps, second.longest_non_finite_run) == (4, 3, 3)


@pytest.mark.parametrize("amp_dtype", [None, torch.float16])
def test_a_non_finite_loss_whose_gradients_are_finite_is_still_skipped(amp_dtype, monkeypatch):
    """A NaN that is only added to the loss leaves the gradients finite; the step must still be
    skipped (the loss scales its own backward by NaN, which is also how the ranks agree)."""
    from progan_fast import losses

    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), amp_dtype=amp_dtype)
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 4, False, torch.device("cpu"), images)
    it()
    it.read_window()
    if state.scaler_D is not None:
        state.scaler_D.scale.fill_(1.0)  # no fp16 overflow: a skip here can only come from the loss
    before = snapshot(state)
    real_loss = losses.discriminator_loss

    def nan_added(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss + float("nan"), stats

    monkeypatch.setattr(losses, "discriminator_loss", nan_added)
    it()
    after = snapshot(state)
    for k in before:
        if k.startswith(("D.", "adam_D")):
            assert torch.equal(before[k], after[k]), f"{k} changed in a skipped step"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("G."))  # G's step was fine
    window = it.read_window()
    assert (window.steps, window.non_finite_steps, window.longest_non_finite_run) == (1, 1, 1)


def test_an_fp16_overflow_is_skipped_but_not_counted_as_a_non_finite_loss():
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), amp_dtype=torch.float16)
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 4, False, torch.device("cpu"), images)
    it()
    state.scaler_D.scale.fill_(2.0**40)  # every fp16 gradient overflows
    it()
    assert float(state.scaler_D.found_inf) == 1.0
    window = it.read_window()
    assert (window.steps, window.non_finite_steps) == (2, 0)


def test_isolated_non_finite_steps_are_skipped_and_logged(tmp_path, poisoned, capsys):
    out = tmp_path / "run"
    poisoned({2, 9})
    assert train.main(TINY + ["--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in records) == 2
    assert all(r["D_loss"] == r["D_loss"] for r in records)  # the means leave the NaN steps out
    assert "step(s) with non-finite losses" in capsys.readouterr().err
    final = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert all(torch.isfinite(t).all() for net in ("G", "D", "G_ema") for t in final[net].values())


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path, poisoned, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out), "--stop-after-kimg", "0.05"]) == 0
    saved = {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")}
    poisoned(None)  # every step from here on
    code = train.main(TINY + ["--out", str(out), "--resume", "auto", "--max-skipped-steps", "5"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "consecutive steps with non-finite losses" in err and "--max-skipped-steps 5" in err
    assert "no non-finite weights were saved" in err
    # The checkpoints are those of before, byte for byte: a diverged run writes nothing.
    assert {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")} == saved


def test_max_skipped_steps_must_be_positive(tmp_path, capsys):
    assert train.main(TINY + ["--out", str(tmp_path / "run"), "--max-skipped-steps", "0"]) == 2
    assert "--max-skipped-steps must be at least 1" in capsys.readouterr().err
