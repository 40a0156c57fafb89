"""``train --init-from``: a new run starts from another run's weights, at the resolution that run had
reached, on its own data, and never reads the source again on a resume."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from progan_fast import train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.trainer import Trainer
from test_cli import make_images
from test_conditional import class_folder
from test_metrics_cli import TINY, assert_one_error

#: TINY grown to 16px (TINY's first two items are --max-res 8).
TINY16 = ["--max-res", "16"] + TINY[2:]


def newest(run) -> dict:
    return load_checkpoint(list_checkpoints(run / "checkpoints")[-1])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 8px run on the embedded emoji set."""
    out = tmp_path_factory.mktemp("src") / "run8"
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cond_source(tmp_path_factory):
    """A finished 8px conditional run with two classes."""
    root = tmp_path_factory.mktemp("cond")
    data = class_folder(root / "data", per_class=4)
    out = root / "run8"
    assert train.main(TINY + ["--data", str(data), "--cond", "--out", str(out)]) == 0
    return out


def started(monkeypatch, argv: list[str]) -> Trainer:
    """The trainer ``train ARGV`` builds, at step 0: set up, before its first step."""
    made = []
    monkeypatch.setattr(Trainer, "run", lambda self: made.append(self) or self.folder.path)
    assert train.main(argv) == 0
    return made[0]


def assert_holds(net: torch.nn.Module, weights: dict, skip=()) -> None:
    own = net.state_dict()
    for key, value in weights.items():
        if key not in skip:
            assert torch.equal(own[key], value), key


def test_step_0_holds_the_source_weights_bit_for_bit(source, tmp_path, monkeypatch):
    trainer = started(monkeypatch, TINY16 + ["--init-from", str(source), "--out", str(tmp_path / "new")])
    src = newest(source)
    for name in ("G", "D", "G_ema"):
        assert_holds(getattr(trainer.state, name), src[name])
    assert set(trainer.state.G.state_dict()) > set(src["G"])  # 16px layers: new, freshly initialized
    # The 8px stabilize phase of this run's schedule, at its first step; the architecture is the source's.
    phase = trainer.phases[trainer.phase_index]
    assert (phase.res, phase.fading, trainer.step) == (8, False, 0)
    assert trainer.config.fmap_base == 32 and trainer.config.latent_size == 8 and trainer.config.max_res == 16
    assert not trainer.state.opt_G.state and not trainer.state.opt_D.state  # a fresh optimizer


@pytest.mark.slow
def test_a_run_from_an_8px_run_grows_to_16px_on_other_data_and_resumes_without_it(source, tmp_path, capsys):
    moved = tmp_path / "source"
    source_ckpt = list_checkpoints(source / "checkpoints")[-1]
    digest = hashlib.sha256(source_ckpt.read_bytes()).hexdigest()
    data = make_images(tmp_path / "faces", 8, size=16)
    out = tmp_path / "new"
    argv = TINY16 + ["--data", str(data), "--init-from", str(moved), "--out", str(out)]
    moved.mkdir()
    (moved / "checkpoints").mkdir()
    (moved / "checkpoints" / source_ckpt.name).write_bytes(source_ckpt.read_bytes())
    # 4px (20 images) and the 8px fade (20) are the source's; stop in the 16px fade.
    assert train.main(argv + ["--stop-after-kimg", "0.068"]) == 0
    assert "starting from" in capsys.readouterr().err
    record = json.loads((out / "config.json").read_text())
    assert record["init_from"]["sha256"] == digest and record["init_from"]["path"].endswith(source_ckpt.name)
    assert record["config"]["data"] == str(data.resolve())

    # The resume reads this run's checkpoint, not the source: the source is gone.
    for p in sorted(moved.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    moved.rmdir()
    assert train.main(argv + ["--resume", "auto"]) == 0
    assert "starting from" not in capsys.readouterr().err
    final = newest(out)
    assert final["config"]["max_res"] == 16 and final["images"] == 5 * 20
    assert "blocks.16.0.weight" in final["G"]
    assert json.loads((out / "config.json").read_text())["init_from"]["sha256"] == digest  # kept on resume


@pytest.mark.parametrize("flags, fragments", [
    (["--fmap-base", "64"], ["--fmap-base 64", "fmap_base is 32"]),
    (["--fmap-max", "16"], ["--fmap-max 16", "fmap_max is 8"]),
    (["--latent-size", "512"], ["--latent-size 512", "latent_size is 8"]),
    (["--mbstd-group", "2"], ["--mbstd-group 2", "mbstd_group_size is 4"]),
    (["--channels", "1"], ["--channels 1", "channels is 3"]),  # toRGB/fromRGB are shaped by it
    (["--max-res", "4"], ["--max-res 4 is lower", "8px"]),
])
def test_a_flag_that_contradicts_the_source_exits_2_naming_it(source, tmp_path, capsys, flags, fragments):
    out = tmp_path / "new"
    assert_one_error(train.main(TINY + flags + ["--init-from", str(source), "--out", str(out)]),
                     capsys.readouterr().err, *fragments)
    assert not out.exists()


def test_a_source_that_is_not_a_run_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "ckpt-000000000001.pt"
    corrupt.write_bytes(b"not a checkpoint")
    newer = tmp_path / "newer.pt"
    torch.save({"format_version": 99}, newer)
    for where, fragment in ((tmp_path / "empty", "no checkpoint"), (corrupt, "corrupt"), (newer, "format 99"),
                            (tmp_path / "nope", "does not exist")):
        assert_one_error(train.main(TINY + ["--init-from", str(where), "--out", str(tmp_path / "new")]),
                         capsys.readouterr().err, "--init-from", fragment)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source_kind, classes", [("plain", 2), ("cond", 3), ("cond", 0), ("cond", 2)])
def test_another_number_of_classes_restarts_only_the_class_parts(source, cond_source, tmp_path, monkeypatch,
                                                                 capsys, source_kind, classes):
    src_dir = cond_source if source_kind == "cond" else source
    src = newest(src_dir)
    src_classes = len(src.get("class_names") or ()) if src["config"]["cond"] else 0
    if classes:
        names = ("blue", "red", "green")[:classes]
        data = class_folder(tmp_path / "data", per_class=4, classes=names)
        run = ["--data", str(data), "--cond"]
    else:
        run = []
    capsys.readouterr()
    trainer = started(monkeypatch, TINY + run + ["--init-from", str(src_dir), "--out", str(tmp_path / "new")])
    said = capsys.readouterr().err
    fresh = started(monkeypatch, TINY + run + ["--out", str(tmp_path / "fresh")]).state  # same seed, no source
    latent = 8
    if classes == src_classes:
        assert "start afresh" not in said
        for name in ("G", "D", "G_ema"):
            assert_holds(getattr(trainer.state, name), src[name])
        return
    assert "G's label input and D's class outputs start afresh" in said
    class_parts = {"G": ["input.weight"], "G_ema": ["input.weight"], "D": ["output.out.weight", "output.out.bias"]}
    for name, parts in class_parts.items():
        net, new = getattr(trainer.state, name), getattr(trainer.state, name).state_dict()
        assert_holds(net, src[name], skip=parts)  # everything else is the source's
        if name == "D":
            for key in parts:  # the score row is the source's, the class rows the fresh run's
                assert torch.equal(new[key][:1], src["D"][key][:1])
                assert torch.equal(new[key][1:], fresh.D.state_dict()[key][1:])
                assert new[key].shape[0] == 1 + classes
        else:
            assert torch.equal(new["input.weight"][:, :latent], src[name]["input.weight"][:, :latent])
            assert torch.equal(new["input.weight"][:, latent:], fresh.G.state_dict()["input.weight"][:, latent:])
            assert new["input.weight"].shape[1] == latent + classes


def test_help_explains_the_new_flags():
    from progan_fast import generate

    assert "--init-from" in train.build_parser().format_help()
    assert "--truncation" in generate.build_parser().format_help()
