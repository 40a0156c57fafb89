"""``python -m progan_fast.bench``: the configurations it times, its table and JSON, its errors."""

import json

import pytest

from progan_fast import bench


def test_configurations_per_device():
    cpu = [v.name for v in bench.variants_for("cpu", with_compile=True)]
    assert cpu[:2] == ["reference", "compile"] and "reference+amp" in cpu
    assert not any("graphs" in n or n.startswith("triton") for n in cpu)  # no interpreter timings, no graphs
    assert cpu[-4:] == ["auto", "auto+amp", "auto+cl", "auto+amp+cl"]  # beside every fixed backend
    assert {"reference+cl", "reference+amp+cl"} <= set(cpu)
    gpu = [v.name for v in bench.variants_for("cuda", with_compile=False)]
    assert {"reference", "reference+amp", "reference+graphs", "reference+amp+graphs"} <= set(gpu)
    assert gpu[-7:] == ["auto", "auto+amp", "auto+graphs", "auto+amp+graphs", "auto+cl", "auto+amp+cl",
                        "auto+amp+graphs+cl"]
    assert not any(n.endswith("+cl") for n in
                   (v.name for v in bench.variants_for("cpu", with_compile=True, with_channels_last=False)))
    assert "compile" not in gpu
    assert bench.kernel_backends("cpu")[0] == "reference"


@pytest.mark.slow  # a whole quick benchmark run: most of a busy machine's 8 minutes for this file
def test_quick_cpu_run_prints_the_table_and_saves_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--res", "4,8", "--batch", "4", "--steps", "1", "--warmup", "0",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "reference+amp" in printed
    record = json.loads(out.read_text())
    rows = {(r["res"], r["variant"]): r for r in record["results"]}
    assert set(rows) >= {(4, "reference"), (4, "reference+amp"), (8, "reference"), (8, "reference+amp"),
                         (4, "auto"), (4, "auto+amp"), (8, "auto"), (8, "auto+amp"),
                         (8, "reference+cl"), (8, "auto+amp+cl")}
    # auto chose in its (forced) warm-up step, and says how: every op shape on some backend, all timed here
    for res in (4, 8):
        picks = rows[(res, "auto")]["picks"]
        n = int(picks.split(" of ")[1].split()[0])
        assert n > 5 and sum(int(part.split()[1]) for part in picks.split(" of ")[0].split(", ")) == n, picks
        assert f"({n} timed here)" in picks
        assert picks in printed
    for (res, name), r in rows.items():
        assert r["note"] == "", (res, name, r["note"])
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["img_per_s"] == pytest.approx(4 * 1000 / r["ms_per_step"], rel=0.02)
    assert rows[(4, "reference")]["vs_reference"] == 1.0
    amp = rows[(8, "reference+amp")]
    assert amp["vs_reference"] == pytest.approx(amp["img_per_s"] / rows[(8, "reference")]["img_per_s"], rel=0.01)


def test_a_failing_configuration_is_reported_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    real = bench.time_variant

    def flaky(variant, *args):
        if variant.amp:
            raise RuntimeError("out of memory\nlong details")
        return real(variant, *args)

    monkeypatch.setattr(bench, "time_variant", flaky)
    assert bench.main(["--device", "cpu", "--res", "4", "--batch", "4", "--steps", "1", "--warmup", "0",
                       "--no-compile", "--json", str(tmp_path / "b.json")]) == 1  # any failure fails the run
    assert "configurations failed: reference+amp at 4px" in capsys.readouterr().err
    rows = {r["variant"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert rows["reference+amp"]["note"] == "failed: RuntimeError: out of memory"
    assert rows["reference+amp"]["img_per_s"] is None and rows["reference"]["img_per_s"] > 0


@pytest.mark.parametrize("args,message", [
    (["--res", "5"], "powers of two"),
    (["--res", "a"], "comma-separated"),
    (["--batch", "1"], "at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_arguments_are_one_clear_error(args, message, capsys):
    assert bench.main(["--device", "cpu"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("progan_fast.bench: error:") and message in err[0]


@pytest.mark.slow
def test_a_killed_bench_keeps_every_row_it_finished(tmp_path):
    """tools/gpu_verify.py cuts a bench stage at its cap: the JSON must already hold the rows that
    were measured, and parse. SIGKILL (no handler can run) right after the first row lands."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "progan_fast.bench", "--device", "cpu", "--res", "4", "--batch", "2",
                             "--widths", "laptop", "--steps", "1", "--warmup", "0", "--json", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = []
    try:
        deadline = time.monotonic() + 120
        while not rows and time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                rows = json.loads(out.read_text())["results"]  # every read parses: the writes are atomic
            time.sleep(0.02)
        assert proc.poll() is None, "the bench finished before any row was saved: rows are not written as they come"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = json.loads(out.read_text())
    assert record["complete"] is False
    kept = record["results"]
    assert 1 <= len(kept) < len(bench.variants_for("cpu", with_compile=False))
    assert kept[0]["variant"] == "reference" and kept[0]["img_per_s"] > 0


def test_configs_times_only_the_named_ones(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--res", "4", "--batch", "2", "--widths", "laptop", "--steps", "1",
                       "--warmup", "0", "--no-channels-last", "--configs", "reference,cpu", "--json", str(out)]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["reference", "cpu"]
    assert bench.main(["--device", "cpu", "--configs", "reference,triton", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("progan_fast.bench: error: --configs: no configuration 'triton' on cpu")
