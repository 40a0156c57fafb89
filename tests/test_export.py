"""``python -m progan_fast.export``: the EMA generator as a torch.export program that runs where
progan_fast cannot be imported, with generate's images; ONNX where onnxruntime is installed; every
bad input one ``error:`` line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan_fast import export, generate, train
from progan_fast.images import to_uint8
from progan_fast.inference import load_generator
from test_conditional import class_folder
from test_metrics_cli import TINY, assert_one_error, run_module

#: Stops in the 8px fade (5 steps a phase of batch 4: 20 images at 4px, then 8 into the fade): the
#: program must hold the fade, not only the newest layers.
MID_FADE = ["--stop-after-kimg", "0.028"]


@pytest.fixture(autouse=True)
def _default_tf32_flags():
    """conftest sets cuDNN's conv precision to "ieee" through the new API; torch.export (2.13) reads
    the legacy ``allow_tf32``, which raises unless conv and RNN are both at their default "tf32".
    These tests export and run on the CPU, where the flag changes nothing: put the default back."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "tf32"
    yield
    conv.fp32_precision = saved


@pytest.fixture(scope="module")
def fading_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fading"
    assert train.main(TINY + MID_FADE + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    data = class_folder(root / "data", per_class=4, classes=("blue", "red", "green"))
    out = root / "run"
    assert train.main(TINY + ["--data", str(data), "--cond", "--out", str(out)]) == 0
    return out


def run_isolated(jobs: list[dict], cwd: Path) -> None:
    """Load and run each ``.pt2`` in a Python that cannot import progan_fast: no site processing
    (``-S``: so not the editable install's import hook either), no PYTHONPATH, the user's site or the
    working folder (``-I``), only torch's site-packages folder on ``sys.path``. Each job's ``inputs``
    file holds the input tensors; the outputs are written to its ``out`` file."""
    site = str(Path(torch.__file__).resolve().parents[1])
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.append({site!r})
        try:
            import progan_fast
        except ImportError:
            pass
        else:
            sys.exit("progan_fast is importable here: " + progan_fast.__file__)
        import torch
        for job in json.loads(sys.argv[1]):
            program = torch.export.load(job["program"]).module()
            inputs = torch.load(job["inputs"])
            torch.save([program(*args) for args in inputs], job["out"])
        assert not [m for m in sys.modules if m.startswith("progan_fast")]
        print("ran", len(json.loads(sys.argv[1])), "programs")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([sys.executable, "-S", "-I", "-c", script, json.dumps(jobs)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"ran {len(jobs)} programs" in result.stdout


def test_help_explains_every_flag():
    text = export.build_parser().format_help()
    for flag in ("--out", "--batch", "--onnx", "--device", "CKPT_OR_RUN_DIR"):
        assert flag in text


@pytest.mark.slow
def test_exported_programs_run_without_progan_fast_and_give_generates_images(fading_run, conditional_run, tmp_path):
    free, fixed = tmp_path / "free.pt2", tmp_path / "fixed.pt2"
    assert export.main([str(fading_run), "--out", str(free)]) == 0
    assert export.main([str(conditional_run), "--out", str(fixed), "--batch", "3"]) == 0

    # No progan_fast op in either graph, and the file says what it holds.
    extra = {export.METADATA_FILE: ""}
    program = torch.export.load(free, extra_files=extra)
    assert export.custom_ops_in(program) == []
    assert any(str(n.target).startswith("aten.") for n in program.graph.nodes if n.op == "call_function")
    meta = json.loads(extra[export.METADATA_FILE])
    assert meta["res"] == 8 and meta["alpha"] == pytest.approx(0.4) and meta["batch"] is None
    assert export.custom_ops_in(torch.export.load(fixed)) == []

    # generate's latents and images: a grid of 5 from seed 3, and its first image alone (batch 1).
    grid = tmp_path / "grid.png"
    assert generate.main([str(fading_run), "--n", "5", "--columns", "5", "--seed", "3", "--out", str(grid)]) == 0
    z = generate.sample_grid_latents(5, 8, 3)
    labels = torch.tensor([0, 1, 2])
    zc = generate.sample_grid_latents(3, 8, 4)
    torch.save([(z,), (z[:1],)], tmp_path / "free_in.pt")
    torch.save([(zc, labels)], tmp_path / "fixed_in.pt")
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_isolated([{"program": str(free), "inputs": str(tmp_path / "free_in.pt"), "out": str(tmp_path / "free_out.pt")},
                  {"program": str(fixed), "inputs": str(tmp_path / "fixed_in.pt"),
                   "out": str(tmp_path / "fixed_out.pt")}], cwd=work)
    images, first = torch.load(tmp_path / "free_out.pt")
    conditional, = torch.load(tmp_path / "fixed_out.pt")

    loaded = load_generator(fading_run)
    assert (loaded.res, loaded.alpha) == (8, pytest.approx(0.4))
    with torch.no_grad():
        want = loaded.G(z, 8, loaded.alpha)
        want_plain = loaded.G(z, 8, None)
    assert images.shape == (5, 3, 8, 8)
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, want[:1], rtol=1e-5, atol=1e-5)
    assert (images - want_plain).abs().max() > 1e-3  # the fade is in the program
    png = np.asarray(Image.open(grid))[::8, ::8].reshape(8, 5, 8, 3).transpose(1, 0, 2, 3)
    assert np.abs(png.astype(int) - to_uint8(images).astype(int)).max() <= 1  # generate's PNG, to rounding

    cond = load_generator(conditional_run)
    with torch.no_grad():
        want_cond = cond.G(zc, cond.res, cond.alpha, labels)
    torch.testing.assert_close(conditional, want_cond, rtol=1e-5, atol=1e-5)

    # The fixed batch is fixed; the free one takes any.
    with pytest.raises(Exception):
        torch.export.load(fixed).module()(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    assert program.module()(torch.randn(9, 8)).shape == (9, 3, 8, 8)


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(fading_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.pt2"
    (tmp_path / "empty").mkdir()
    assert_one_error(export.main([str(tmp_path / "empty"), "--out", str(out)]), capsys.readouterr().err,
                     "no checkpoint")
    corrupt = tmp_path / "ckpt-000000000001.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert_one_error(export.main([str(corrupt), "--out", str(out)]), capsys.readouterr().err, "corrupt")
    newer = tmp_path / "newer.pt"
    torch.save({"format_version": 99}, newer)
    assert_one_error(export.main([str(newer), "--out", str(out)]), capsys.readouterr().err, "format 99")
    assert_one_error(export.main([str(fading_run), "--out", str(tmp_path / "g.onnx")]), capsys.readouterr().err,
                     ".pt2")
    assert_one_error(export.main([str(fading_run), "--out", str(out), "--batch", "0"]), capsys.readouterr().err,
                     "--batch")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert_one_error(export.main([str(fading_run), "--out", str(out), "--onnx"]), capsys.readouterr().err,
                     "onnx", "pip install onnx onnxscript")
    assert not out.exists() and not out.with_suffix(".onnx").exists()
    result = run_module("progan_fast.export", tmp_path / "nope", "--out", out)
    assert_one_error(result.returncode, result.stderr, "does not exist")
    assert "progan_fast.export" in result.stderr


@pytest.mark.slow
def test_onnx_through_onnxruntime(fading_run, conditional_run, tmp_path):
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("onnx, onnxscript and onnxruntime are not installed")
    import onnxruntime

    def session(path: Path):
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    out = tmp_path / "g.pt2"
    assert export.main([str(fading_run), "--out", str(out), "--onnx"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.pt2"]  # one self-contained file each
    free = session(out.with_suffix(".onnx"))
    assert [i.name for i in free.get_inputs()] == ["z"]
    loaded = load_generator(fading_run)
    for n in (1, 6):  # the batch is free
        z = generate.sample_grid_latents(n, 8, 7)
        with torch.no_grad():
            want = loaded.G(z, loaded.res, loaded.alpha)
        np.testing.assert_allclose(free.run(None, {"z": z.numpy()})[0], want.numpy(), rtol=1e-4, atol=1e-4)

    named = tmp_path / "cond" / "c.onnx"
    assert export.main([str(conditional_run), "--out", str(tmp_path / "c.pt2"), "--batch", "3", "--onnx",
                        str(named)]) == 0
    fixed = session(named)
    assert [(i.name, i.shape) for i in fixed.get_inputs()] == [("z", [3, 8]), ("labels", [3])]
    cond = load_generator(conditional_run)
    z, labels = generate.sample_grid_latents(3, 8, 8), torch.tensor([2, 0, 1])
    with torch.no_grad():
        want = cond.G(z, cond.res, cond.alpha, labels)
    got = fixed.run(None, {"z": z.numpy(), "labels": labels.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
