"""The metrics and generate command lines: results on a tiny finished run, and every bad input as
one ``error:`` line with exit code 2 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan_fast import fid, generate, metrics, train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint
from progan_fast.images import to_uint8
from progan_fast.networks import Generator, NetworkConfig

TINY = ["--max-res", "8", "--kimg-per-phase", "0.02", "--batch", "4", "--fmap-base", "32", "--fmap-max", "8",
        "--latent-size", "8", "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


def run_module(module, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- metrics


def test_metrics_scores_the_newest_checkpoint_and_logs_it(run_dir, capsys):
    assert metrics.main([str(run_dir), "--n", "64"]) == 0
    out = capsys.readouterr().out
    assert "SWDx1e3_8" in out and "SWDx1e3_avg" in out
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert record["checkpoint"] == str(newest) and record["res"] == 8 and record["n"] == 64
    assert record["SWDx1e3_avg"] == pytest.approx(record["SWDx1e3_8"]) and record["SWDx1e3_avg"] > 0
    # The same command gives the same figures.
    assert metrics.main([str(run_dir), "--n", "64", "--no-save"]) == 0
    assert f"{record['SWDx1e3_avg']:.4f}" in capsys.readouterr().out


def test_metrics_bad_inputs(tmp_path, run_dir, capsys):
    assert_one_error(metrics.main([str(tmp_path / "nope")]), capsys.readouterr().err, "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_error(metrics.main([str(tmp_path / "empty")]), capsys.readouterr().err, "no checkpoint")
    bad = tmp_path / "ckpt-000000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_one_error(metrics.main([str(bad)]), capsys.readouterr().err, str(bad))
    assert_one_error(metrics.main([str(run_dir), "--n", "1"]), capsys.readouterr().err, "--n")


def test_metrics_without_the_fid_package_says_how_to_install(run_dir, capsys, monkeypatch):
    def unavailable():
        raise fid.FIDUnavailable("FID unavailable: the FID Inception weights are not installed; install them with: X")

    monkeypatch.setattr(fid, "inception_weights_path", unavailable)
    assert_one_error(metrics.main([str(run_dir), "--fid"]), capsys.readouterr().err, "FID unavailable", "install")


def test_metrics_cli_as_a_user_runs_it(tmp_path):
    result = run_module("progan_fast.metrics", tmp_path / "missing")
    assert_one_error(result.returncode, result.stderr, "does not exist")
    assert "progan_fast.metrics" in result.stderr


# --------------------------------------------------------------------------- generate


def _ema_and_raw_generators(ckpt: Path):
    state = load_checkpoint(ckpt)
    cfg = state["config"]
    nc = NetworkConfig(cfg["max_res"], cfg["latent_size"], cfg["fmap_base"], cfg["fmap_max"], cfg["mbstd_group_size"])
    nets = []
    for key in ("G_ema", "G"):
        G = Generator(nc)
        G.load_state_dict(state[key])
        nets.append(G.eval())
    return nets


def test_generate_writes_a_seeded_grid_from_the_ema_generator(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert generate.main([str(run_dir), "--n", "4", "--columns", "4", "--out", str(out), "--seed", "5"]) == 0
    grid = Image.open(out)
    assert grid.size == (4 * 64, 64)  # 8px tiles are shown enlarged to 64px
    again = tmp_path / "again.png"
    assert generate.main([str(run_dir), "--n", "4", "--columns", "4", "--out", str(again), "--seed", "5"]) == 0
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.png"
    assert generate.main([str(run_dir), "--n", "4", "--columns", "4", "--out", str(other), "--seed", "6"]) == 0
    assert other.read_bytes() != out.read_bytes()

    # The first tile is G_ema's image of the first N(0, 1) latent of the seed, not G's.
    ema, raw = _ema_and_raw_generators(list_checkpoints(run_dir / "checkpoints")[-1])
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    first = torch.from_numpy(np.asarray(grid)[::8, :64:8].copy())  # top-left tile, 8x8
    with torch.no_grad():
        want_ema, want_raw = to_uint8(ema(z, 8)), to_uint8(raw(z, 8))
    assert torch.equal(first, torch.from_numpy(want_ema[0]))
    assert not torch.equal(first, torch.from_numpy(want_raw[0]))


def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g) * 2
    path = generate.slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (3, 5, 16)
    assert torch.allclose(path[:, 0], a, atol=1e-5) and torch.allclose(path[:, -1], b, atol=1e-5)
    # The direction moves along the great circle: equal angles between consecutive steps.
    u = path / path.norm(dim=2, keepdim=True)
    steps = torch.arccos((u[:, 1:] * u[:, :-1]).sum(2).clamp(-1, 1))
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-4)
    assert torch.allclose(path.norm(dim=2)[:, 2], (a.norm(dim=1) + b.norm(dim=1)) / 2, atol=1e-4)


def test_generate_interpolation_strip(run_dir, tmp_path):
    out = tmp_path / "strip.png"
    assert generate.main([str(run_dir), "--interpolate", "6", "--n", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (6 * 64, 2 * 64)


def test_generate_bad_inputs(tmp_path, run_dir, capsys):
    assert_one_error(generate.main([str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")]),
                     capsys.readouterr().err, "does not exist")
    assert_one_error(generate.main([str(run_dir), "--out", str(tmp_path / "g.jpg")]), capsys.readouterr().err, ".png")
    assert_one_error(generate.main([str(run_dir), "--interpolate", "1", "--out", str(tmp_path / "g.png")]),
                     capsys.readouterr().err, "--interpolate")
    assert_one_error(generate.main([str(run_dir), "--n", "0", "--out", str(tmp_path / "g.png")]),
                     capsys.readouterr().err, "--n")
    result = run_module("progan_fast.generate", tmp_path / "nope")
    assert_one_error(result.returncode, result.stderr, "does not exist")


# --------------------------------------------------------------------------- generate --truncation


def test_truncated_normal_redraws_only_the_values_beyond_t():
    plain = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    z = generate.truncated_normal((64, 32), torch.Generator().manual_seed(3), 1.0)
    inside = plain.abs() <= 1.0
    assert torch.equal(z[inside], plain[inside])  # values within T are the plain draw's
    redrawn = z[~inside]
    assert redrawn.numel() > 500 and redrawn.abs().max() <= 1.0
    # Redrawn, not clamped: no value sits on the bound, and they spread over [-1, 1] as the
    # truncated normal does (variance 1 - 2 phi(1) / (2 Phi(1) - 1) = 0.2911).
    assert (redrawn.abs() == 1.0).sum() == 0
    assert abs(redrawn.var().item() - 0.2911) < 0.03
    # The seed fixes the draw; a large T is the plain draw, bit for bit.
    assert torch.equal(z, generate.truncated_normal((64, 32), torch.Generator().manual_seed(3), 1.0))
    assert torch.equal(generate.truncated_normal((64, 32), torch.Generator().manual_seed(3), 1e9), plain)
    tiny = generate.truncated_normal((64, 32), torch.Generator().manual_seed(3), 1e-6)
    assert tiny.abs().max() <= 1e-6 and tiny.abs().min() > 0


def _tiles(path: Path, n: int, tile: int = 64, step: int = 8) -> np.ndarray:
    """The ``n`` 8x8 images of a one-row grid of 8px tiles shown at 64px."""
    grid = np.asarray(Image.open(path))
    return np.stack([grid[::step, i * tile:(i + 1) * tile:step] for i in range(n)]).astype(int)


def test_generate_truncation_limits_and_seed(run_dir, tmp_path):
    common = [str(run_dir), "--n", "4", "--columns", "4", "--device", "cpu"]
    paths = {name: tmp_path / f"{name}.png" for name in ("plain", "large", "small", "seed", "seed_again", "other")}
    assert generate.main(common + ["--out", str(paths["plain"])]) == 0
    assert generate.main(common + ["--truncation", "1e9", "--out", str(paths["large"])]) == 0
    assert paths["large"].read_bytes() == paths["plain"].read_bytes()  # T large: the plain draw

    # T near 0: every image is the zero latent's. G pixel-normalizes z, so "near" means far below pixel
    # norm's epsilon: then the normalized z is ~T / 1e-4 (a tiny untrained G's input bias is ~1e-3).
    assert generate.main(common + ["--truncation", "1e-12", "--out", str(paths["small"])]) == 0
    ema, _ = _ema_and_raw_generators(list_checkpoints(run_dir / "checkpoints")[-1])
    with torch.no_grad():
        zero = to_uint8(ema(torch.zeros(1, 8), 8))[0].astype(int)
    assert np.abs(_tiles(paths["small"], 4) - zero).max() <= 1
    assert np.abs(_tiles(paths["plain"], 4) - zero).max() > 10

    # The seed still fixes the picture, and another seed changes it.
    for name, seed in (("seed", "5"), ("seed_again", "5"), ("other", "6")):
        assert generate.main(common + ["--truncation", "0.5", "--seed", seed, "--out", str(paths[name])]) == 0
    assert paths["seed"].read_bytes() == paths["seed_again"].read_bytes()
    assert paths["seed"].read_bytes() != paths["other"].read_bytes()
    assert paths["seed"].read_bytes() != paths["plain"].read_bytes()


def test_generate_truncation_with_interpolate(run_dir, tmp_path):
    common = [str(run_dir), "--interpolate", "5", "--n", "2", "--device", "cpu"]
    plain, large, small = tmp_path / "plain.png", tmp_path / "large.png", tmp_path / "small.png"
    assert generate.main(common + ["--out", str(plain)]) == 0
    assert generate.main(common + ["--truncation", "1e9", "--out", str(large)]) == 0
    assert large.read_bytes() == plain.read_bytes()
    assert generate.main(common + ["--truncation", "1e-12", "--out", str(small)]) == 0
    grid = np.asarray(Image.open(small)).astype(int)[::8, ::8]  # 2 rows of 5 8px images
    assert np.abs(grid - np.tile(grid[:8, :8], (2, 5, 1))).max() <= 1  # all one image


def test_generate_truncation_must_be_positive(run_dir, tmp_path, capsys):
    for value in ("0", "-1", "nan"):
        assert_one_error(generate.main([str(run_dir), "--truncation", value, "--out", str(tmp_path / "g.png")]),
                         capsys.readouterr().err, "--truncation")
