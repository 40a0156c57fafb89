"""--mirror: x-flip augmentation drawn on the device inside the iteration."""

from __future__ import annotations

import pytest
import torch

from progan_fast import step, train
from progan_fast.data import mirror
from progan_fast.distributed import World
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import Iteration, StepLosses
from test_training import TINY

CFG = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)


def test_mirror_flips_exactly_the_flagged_images():
    batch = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)
    out = mirror(batch, torch.tensor([True, False]))
    assert torch.equal(out[0], batch[0].flip(-1)) and torch.equal(out[1], batch[1])
    assert torch.equal(out[0, 0, 0], torch.tensor([3, 2, 1, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match="one flag per image"):
        mirror(batch, torch.tensor([True]))


def reals_seen(monkeypatch, mirror_on: bool, batch: int, world: World = World(), seed: int = 0):
    """The float reals one Iteration call hands to train_step, and the dataset it sampled."""
    torch.manual_seed(seed)
    state = GANState.create(CFG, torch.device("cpu"), loss="nonsat")
    state.world = world
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    seen = []

    def record(state_, reals, res, alpha, *labels):
        seen.append(reals.clone())
        zero = torch.zeros(())
        return StepLosses(zero, zero, {}, zero)

    monkeypatch.setattr(step, "train_step", record)
    torch.manual_seed(seed)
    Iteration(state, 8, batch, False, torch.device("cpu"), images, mirror=mirror_on)()
    as_uint8 = ((seen[0] + 1) * 127.5).round().to(torch.uint8)
    return as_uint8, images


def count_flips(reals: torch.Tensor, images: torch.Tensor) -> int:
    flips = 0
    for row in reals:
        plain = any(torch.equal(row, im) for im in images)
        flipped = any(torch.equal(row, im.flip(-1)) for im in images)
        assert plain or flipped, "a real image is neither a dataset image nor its mirror"
        flips += flipped and not plain
    return flips


def test_mirror_flips_about_half_of_a_large_batch(monkeypatch):
    reals, images = reals_seen(monkeypatch, True, 400)
    flips = count_flips(reals, images)
    assert 0.4 * 400 < flips < 0.6 * 400, flips  # binomial(400, 1/2): 10 standard deviations wide
    reals, images = reals_seen(monkeypatch, False, 400)
    assert count_flips(reals, images) == 0


def test_each_rank_gets_its_rows_of_the_one_process_batch(monkeypatch):
    """The coins are drawn for the global batch and sliced like the batch indices, so two ranks
    together see exactly the images (flipped or not) that one process sees."""
    whole, _ = reals_seen(monkeypatch, True, 8)
    for rank in range(2):
        part, _ = reals_seen(monkeypatch, True, 8, World(rank=rank, size=2))
        assert torch.equal(part, whole[rank::2])


def test_the_flag_reaches_the_iteration_and_belongs_to_the_run(tmp_path, monkeypatch):
    """(Resume with --mirror is bit-identical: tests/test_training.py's wgan-gp resume cases use it.)"""
    from progan_fast import trainer

    seen = []

    class Recording(Iteration):
        def __init__(self, *args, mirror=False, **kwargs):
            seen.append(mirror)
            super().__init__(*args, mirror=mirror, **kwargs)

    monkeypatch.setattr(trainer, "Iteration", Recording)
    run = ["--out", str(tmp_path / "run"), "--stop-after-kimg", "0.008"]
    assert train.main(TINY + ["--mirror"] + run) == 0
    assert seen == [True]
    assert '"mirror": true' in (tmp_path / "run" / "config.json").read_text()
    # Resuming without it would train a different run: refused, naming the setting.
    assert train.main(TINY + ["--out", str(tmp_path / "run"), "--resume", "auto"]) == 2


def test_mirroring_never_changes_labels(monkeypatch):
    """Conditional + mirror: every real keeps the label of the image it came from, flipped or not."""
    torch.manual_seed(0)
    cfg = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16, num_classes=5)
    state = GANState.create(cfg, torch.device("cpu"), loss="nonsat")
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.tensor([3, 0, 4, 1, 2])  # image i has class labels[i]
    seen = []

    def record(state_, reals, res, alpha, real_labels, pool, augment=None):
        seen.append((reals.clone(), real_labels.clone()))
        zero = torch.zeros(())
        return StepLosses(zero, zero, {}, zero)

    monkeypatch.setattr(step, "train_step", record)
    Iteration(state, 8, 300, False, torch.device("cpu"), images, mirror=True, labels=labels)()
    reals, real_labels = seen[0]
    reals = ((reals + 1) * 127.5).round().to(torch.uint8)
    flips = 0
    for row, label in zip(reals, real_labels.tolist()):
        source = [i for i, im in enumerate(images) if torch.equal(row, im) or torch.equal(row, im.flip(-1))]
        assert len(source) == 1 and labels[source[0]] == label
        flips += not torch.equal(row, images[source[0]])
    assert 0.4 * 300 < flips < 0.6 * 300
