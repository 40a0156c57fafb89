"""``--backend auto``: the per-op, per-shape choice (progan_fast/ops/autotune.py) and its cache.

Every test decides the timings itself, through an injected clock or timer, so no assertion here
depends on how fast anything really runs.
"""

import json

import pytest
import torch

from progan_fast import ops
from progan_fast.ops import _backend, _native, autotune, autotune_cache
from progan_fast.ops.autotune import Autotuner, AutotuneDuringCaptureError

needs_native = pytest.mark.skipif(not _native.available(), reason="the native library (cpu backend) is not built")


class FakeClock:
    """A clock that only moves when a fake backend 'runs' (advances it)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def backend(self, *durations):
        """An op implementation whose successive calls take ``durations`` (the last one repeats)."""
        calls = []

        def impl(*args):
            calls.append(args)
            self.now += durations[min(len(calls), len(durations)) - 1]
            return None

        impl.calls = calls
        return impl


def table_timer(seconds: dict, calls: list | None = None):
    """A timer that returns ``seconds[backend]`` (or raises it, if it is an exception) without running anything."""
    def timer(trial):
        if calls is not None:
            calls.append((trial.key, trial.backend))
        value = seconds[trial.backend]
        if isinstance(value, Exception):
            raise value
        return value
    return timer


def no_cache(device):
    return None


X = torch.randn(4, 3, 2, 2)
KEY = autotune.signature("pixel_norm", (X, 1e-8))


# ----- choosing --------------------------------------------------------------------------------

def test_the_fastest_backend_wins_by_its_fastest_call_after_an_untimed_warm_up():
    clock = FakeClock()
    tuner = Autotuner(clock=clock, caches=no_cache)
    # reference: a slow first (warm-up) call, then 3 ms every time. cpu: 2 ms, but a majority of its
    # calls hit by 50 ms of other work on the machine (a median would pick reference).
    reference = clock.backend(1.0, 0.003)
    cpu = clock.backend(0.002, 0.002, 0.050, 0.050, 0.050, 0.002)
    assert tuner.select(KEY, {"reference": reference, "cpu": cpu}, {}, (X, 1e-8)) == "cpu"
    assert len(reference.calls) == 1 + autotune.REPEATS and len(cpu.calls) == 1 + autotune.REPEATS
    choice = tuner.choices[autotune.describe(KEY)]
    assert choice.source == "timed" and choice.ms == pytest.approx({"reference": 3.0, "cpu": 2.0})
    # the other way round: reference wins
    tuner = Autotuner(clock=clock, caches=no_cache)
    assert tuner.select(KEY, {"reference": clock.backend(0.002), "cpu": clock.backend(0.003)}, {}, (X, 1e-8)) == "reference"


def test_ties_go_to_the_fixed_preference_order():
    assert autotune.TIE_ORDER[0] == "reference"
    assert autotune.pick({"cpu": 1.0, "reference": 1.0}) == "reference"
    assert autotune.pick({"cpu": 1.0, "reference": 1.02}) == "reference"  # within the 3% tolerance
    assert autotune.pick({"cpu": 1.0, "reference": 1.05}) == "cpu"
    assert autotune.pick({"triton": 1.0, "cuda": 1.0, "reference": 2.0}) == "cuda"
    assert autotune.pick({"triton": 1.0, "cuda": 1.0}, order=("triton", "cuda")) == "triton"
    assert autotune.pick({"triton": 1.0, "cuda": 1.0}, tolerance=0.0) == "cuda"
    assert autotune.pick({"cpu": 0.9, "reference": 1.0}, tolerance=0.0) == "cpu"


def test_a_backend_that_raises_is_skipped_and_its_reason_shown():
    tuner = Autotuner(timer=table_timer({"reference": 2.0, "cpu": RuntimeError("no kernel for this shape\ndetails")}),
                      caches=no_cache)
    assert tuner.select(KEY, {"reference": None, "cpu": None}, {"triton": "not built here"}, (X, 1e-8)) == "reference"
    choice = tuner.choices[autotune.describe(KEY)]
    assert choice.skipped == {"triton": "not built here", "cpu": "RuntimeError: no kernel for this shape"}
    (line,) = autotune.format_report(tuner.take_unreported())
    assert line.startswith("auto pixel_norm: reference at 4x3x2x2 f32 fwd (only candidate)")
    assert "cpu: RuntimeError: no kernel for this shape" in line and "triton: not built here" in line
    assert tuner.take_unreported() == []  # reported once


def test_when_every_backend_raises_the_error_is_the_ops_own():
    tuner = Autotuner(timer=table_timer({"reference": ValueError("bad channels"), "cpu": RuntimeError("x")}),
                      caches=no_cache)
    with pytest.raises(ValueError, match="bad channels"):
        tuner.select(KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8))
    assert not tuner.choices


def test_timing_runs_forward_and_backward_on_copies_when_inputs_require_grad():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(g.clone())
            return g * 2

    key = autotune.signature("probe", (x,))
    assert autotune.needs_backward(key) and "fwd+bwd" in autotune.describe(key)
    Autotuner(caches=no_cache).select(key, {"reference": Probe.apply}, {}, (x,))
    assert len(seen) == 1 + autotune.REPEATS and all(torch.equal(g, torch.ones_like(g)) for g in seen)
    assert x.grad is None  # the caller's tensors are untouched
    seen.clear()
    with torch.no_grad():
        key = autotune.signature("probe", (x,))
        assert not autotune.needs_backward(key)
        Autotuner(caches=no_cache).select(key, {"reference": Probe.apply}, {}, (x,))
    assert seen == []


# ----- the key ---------------------------------------------------------------------------------

def test_the_key_depends_on_shapes_dtypes_layout_and_flags_never_on_values():
    x = torch.randn(4, 8, 3, 3)
    w = torch.randn(8, 8, 3, 3)
    base = autotune.signature("conv", (x, w, None, 0.1, True, False))
    assert autotune.signature("conv", (x * 5, w + 1, None, 0.7, True, False)) == base  # values and floats
    assert autotune.signature("blend", (x, x, torch.tensor(0.25))) == autotune.signature("blend", (x, x, torch.tensor(0.75)))
    differing = [
        ("conv", (torch.randn(4, 8, 5, 5), w, None, 0.1, True, False)),
        ("conv", (x.double(), w.double(), None, 0.1, True, False)),
        ("conv", (x.to(memory_format=torch.channels_last), w, None, 0.1, True, False)),
        ("conv", (x.detach().requires_grad_(), w, None, 0.1, True, False)),
        ("conv", (x, w, None, 0.1, False, False)),
        ("conv", (x, w, torch.zeros(8), 0.1, True, False)),
        ("conv2", (x, w, None, 0.1, True, False)),
    ]
    keys = {autotune.signature(op, args) for op, args in differing}
    assert base not in keys and len(keys) == len(differing)
    assert ":channels_last" in autotune.describe(autotune.signature("p", (x.detach().to(memory_format=torch.channels_last),)))


def test_the_cpu_never_times_triton_and_a_cuda_tensor_never_times_the_cpu_twins():
    from test_ops import _FakeCuda

    table = {"reference": None, "cpu": None, "triton": None}
    impls, skipped = _backend.auto_candidates(table, (torch.zeros(2, 2, 2, 2), 1e-8))
    assert list(impls) == ["reference", "cpu"] and skipped == {}
    impls, skipped = _backend.auto_candidates(table, (_FakeCuda(), 1e-8))
    assert list(impls) == ["reference"] + (["triton"] if not _backend._interpreter_runs_cpu_tensors() else [])
    assert "not available here" in skipped["cuda"]
    if _backend._interpreter_runs_cpu_tensors():
        assert "interpreter" in skipped["triton"]


# ----- through the public ops ---------------------------------------------------------------------

@needs_native
def test_an_op_with_auto_runs_the_winner_and_times_each_key_once(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "TUNER", Autotuner(timer=table_timer({"reference": 2.0, "cpu": 1.0}, calls),
                                                     caches=no_cache))
    used = []
    table = ops.all_op_implementations()["pixel_norm"]
    reference = table["reference"]
    for name in ("reference", "cpu"):
        monkeypatch.setitem(table, name, lambda *a, _n=name, _f=table[name]: used.append(_n) or _f(*a))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ops.pixel_norm(x, backend="auto"), reference(x))
    ops.pixel_norm(x * 3, backend="auto")
    assert len(calls) == 2 and used == ["cpu", "cpu"]  # timed once (a timer that runs nothing), then cpu twice
    ops.set_default_backend("auto")
    ops.pixel_norm(torch.randn(2, 4, 5, 5))  # a new shape: timed again
    assert len(calls) == 4 and used[-1] == "cpu"


def test_a_new_key_during_cuda_graph_capture_is_refused_a_known_one_is_fine(monkeypatch):
    capturing = [False]
    tuner = Autotuner(timer=table_timer({"reference": 1.0, "cpu": 1.0}), caches=no_cache, capturing=lambda: capturing[0])
    monkeypatch.setattr(autotune, "TUNER", tuner)
    x = torch.randn(2, 4, 3, 3)
    ops.pixel_norm(x, backend="auto")  # the eager warm-up
    capturing[0] = True
    ops.pixel_norm(x, backend="auto")  # same key: no timing, allowed
    with pytest.raises(AutotuneDuringCaptureError, match=r"first seen while a CUDA graph was being captured.*warm-up"):
        ops.pixel_norm(torch.randn(2, 4, 5, 5), backend="auto")


def test_checkpoint_choices_come_before_the_cache_and_timing(tmp_path):
    calls = []
    cache = autotune_cache.ChoiceCache(tmp_path / "c.json", {"v": 1})
    text = autotune.describe(KEY)
    cache.put(text, "cpu")
    tuner = Autotuner(timer=table_timer({"reference": 1.0, "cpu": 2.0}, calls), caches=lambda d: cache)
    tuner.adopt({text: "reference"})
    assert tuner.select(KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8)) == "reference"
    assert tuner.choices[text].source == "checkpoint" and calls == []
    assert tuner.saved_choices() == {text: "reference"}
    # an adopted backend that cannot run here is not used: the cache's is
    tuner = Autotuner(timer=table_timer({"reference": 1.0, "cpu": 2.0}, calls), caches=lambda d: cache)
    tuner.adopt({text: "triton"})
    assert tuner.select(KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8)) == "cpu" and calls == []
    assert tuner.choices[text].source == "cache"


# ----- the cache -------------------------------------------------------------------------------

def test_a_second_process_reads_the_cache_and_times_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune_cache.ENV_VAR, str(tmp_path / "cache"))
    calls = []
    first = Autotuner(timer=table_timer({"reference": 2.0, "cpu": 1.0}, calls))
    assert first.select(KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8)) == "cpu" and len(calls) == 2
    (path,) = (tmp_path / "cache").glob("autotune-*.json")
    saved = json.loads(path.read_text())
    assert saved["choices"] == {autotune.describe(KEY): "cpu"}
    assert saved["env"] == autotune_cache.environment(torch.device("cpu"))
    second = Autotuner(timer=table_timer({"reference": 1.0, "cpu": 2.0}, calls))  # would pick reference if timed
    assert second.select(KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8)) == "cpu"
    assert len(calls) == 2 and second.choices[autotune.describe(KEY)].source == "cache"
    # a third key from another process merges into the same file
    other = autotune.signature("pixel_norm", (torch.randn(1, 2, 3, 3), 1e-8))
    second.select(other, {"reference": None, "cpu": None}, {}, (X, 1e-8))
    assert len(json.loads(path.read_text())["choices"]) == 2


def test_the_cache_is_invalidated_when_a_version_changes(tmp_path, monkeypatch):
    env = autotune_cache.environment(torch.device("cpu"))
    newer = {**env, "torch": env["torch"] + ".post1"}
    assert autotune_cache.file_name(env) != autotune_cache.file_name(newer)
    for kind in ("triton", "native", "device", "threads"):
        assert autotune_cache.file_name({**env, kind: "other"}) != autotune_cache.file_name(env)
    # one explicit file: the environment inside decides
    path = tmp_path / "choices.json"
    monkeypatch.setenv(autotune_cache.ENV_VAR, str(path))
    old = autotune_cache.ChoiceCache(autotune_cache.location(env), env)
    old.put("k", "cpu")
    stale = autotune_cache.ChoiceCache(autotune_cache.location(newer), newer)
    assert stale.path == path and stale.get("k") is None and "other versions" in stale.ignored
    stale.put("k2", "reference")
    assert json.loads(path.read_text()) == {"format": 1, "env": newer, "choices": {"k2": "reference"}}
    assert autotune_cache.ChoiceCache(path, env).get("k") is None  # and the old one is gone for good
    path.write_text("{not json")
    broken = autotune_cache.ChoiceCache(path, env)
    assert broken.get("k") is None and "unreadable" in broken.ignored


@pytest.mark.parametrize("value", ["off", "0", "OFF", "false", "none"])
def test_the_cache_can_be_disabled(value, monkeypatch, tmp_path):
    monkeypatch.setenv(autotune_cache.ENV_VAR, value)
    monkeypatch.setenv("HOME", str(tmp_path))  # where the default cache would go
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert autotune_cache.for_device(torch.device("cpu")) is None
    calls = []
    for _ in range(2):  # every process times afresh, and writes nothing
        Autotuner(timer=table_timer({"reference": 1.0, "cpu": 2.0}, calls)).select(
            KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8))
    assert len(calls) == 4 and list(tmp_path.iterdir()) == []
    assert "off" in autotune.cache_description(torch.device("cpu"))


def test_the_cache_location(monkeypatch, tmp_path):
    env = {"device": "cpu: test", "torch": "0"}
    monkeypatch.delenv(autotune_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune_cache.location(env) == tmp_path / "xdg" / "progan_fast" / autotune_cache.file_name(env)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune_cache.location(env) == tmp_path / "home" / ".cache" / "progan_fast" / autotune_cache.file_name(env)
    monkeypatch.setenv(autotune_cache.ENV_VAR, str(tmp_path / "dir"))
    assert autotune_cache.location(env) == tmp_path / "dir" / autotune_cache.file_name(env)


def test_an_unwritable_cache_is_reported_once_and_the_choice_still_made(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = autotune_cache.ChoiceCache(blocker / "sub" / "c.json", {"v": 1})  # a folder inside a file: cannot exist
    tuner = Autotuner(timer=table_timer({"reference": 2.0, "cpu": 1.0}), caches=lambda d: cache)
    assert tuner.select(KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8)) == "cpu"
    cache.put("other", "cpu")
    err = capsys.readouterr().err
    assert err.count("cannot write its cache") == 1 and cache.get("other") == "cpu"
