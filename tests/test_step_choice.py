"""The step check (progan_fast/step_choice.py): ``--backend auto`` confirmed against ``reference``
on whole steps, ``--channels-last auto``; and auto's GPU timing and cache key (ops/autotune*.py).

Every decision here comes from injected timers or CUDA events, never from how fast anything runs.
"""

import json

import pytest
import torch

from progan_fast import distributed, ops, step_choice, train
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.ops import autotune, autotune_cache
from progan_fast.step import Iteration
from progan_fast.step_choice import Setup

CFG = NetworkConfig(max_res=8, latent_size=12, fmap_base=48, fmap_max=12, mbstd_group_size=2)
CPU = torch.device("cpu")
REF, AUTO = Setup("reference", False), Setup("auto", False)
NCHW, NHWC = Setup("reference", False), Setup("reference", True)


def table_timer(seconds, seen=None):
    """A step timer that runs the step and reports ``seconds[setup]`` (a list: one per round)."""
    rounds = {}

    def timer(setup, run):
        run()
        if seen is not None:
            seen.append(setup)
        i = rounds[setup] = rounds.get(setup, -1) + 1
        value = seconds[setup]
        return value[min(i, len(value) - 1)] if isinstance(value, list) else value
    return timer


def tiny_run(seed=0, loss="wgan-gp"):
    torch.manual_seed(seed)
    state = GANState.create(CFG, CPU, loss=loss)
    return state, tiny_iteration(state)


def tiny_iteration(state):
    """An Iteration of an 8px fade phase on fixed images (the global RNG is left alone)."""
    images = (torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    iteration = Iteration(state, 8, 4, True, CPU, images, mirror=True)
    iteration.set_alpha(0.5)
    return iteration


def every_tensor(state):
    out = {}
    for name in ("G", "D", "G_ema"):
        out.update({f"{name}.{k}": v.clone() for k, v in getattr(state, name).state_dict().items()})
    for name in ("opt_G", "opt_D"):
        for pid, s in getattr(state, name).state_dict()["state"].items():
            out.update({f"{name}.{pid}.{k}": v.clone() for k, v in s.items()})
    out["rng"] = torch.get_rng_state()
    return out


# ----- the step check ------------------------------------------------------------------------------

@pytest.mark.parametrize("before", [0, 2])  # at a phase start (no Adam state yet) and inside a phase
def test_the_checked_steps_leave_no_trace(before):
    """Training with a check in the middle ends bit for bit where training without it ends:
    weights, EMA, Adam's moments and step counts, the random generators, the phase's loss sums."""
    plain, plain_it = tiny_run()
    for _ in range(before + 2):
        plain_it()
    checked, checked_it = tiny_run()
    for _ in range(before):
        checked_it()
    side_it = tiny_iteration(checked)  # the check's own Iteration, as the trainer makes one
    seen = []
    step_choice.check([NCHW, NHWC], side_it, checked, CPU, timer=table_timer({NCHW: 2.0, NHWC: 1.0}, seen), rounds=2)
    assert len(seen) == 2 * 2  # the timed steps really ran (and changed the state meanwhile)
    step_choice.apply(NCHW, checked, "cpu")  # train on as the plain run did
    for _ in range(2):
        checked_it()
    a, b = every_tensor(plain), every_tensor(checked)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert plain_it.read_sums() == checked_it.read_sums()


def test_the_check_keeps_reference_unless_auto_is_faster_beyond_the_tolerance():
    state, it = tiny_run()
    cases = [({REF: 1.0, AUTO: 1.1}, REF), ({REF: 1.0, AUTO: 0.9}, AUTO),
             ({REF: 1.0, AUTO: 0.99}, REF),  # within the 3%: a tie keeps reference
             ({REF: [1.0, 1.0, 1.0], AUTO: [5.0, 0.9, 7.0]}, AUTO)]  # each setup's fastest step counts
    for timings, expected in cases:
        seen = []
        decision = step_choice.check([REF, AUTO], lambda: None, state, CPU, timer=table_timer(timings, seen))
        assert decision.setup == expected, timings
        assert ops.get_default_backend() == expected.backend  # applied for the phase's steps
        assert seen == [REF, AUTO] * step_choice.ROUNDS  # interleaved, one step each per round
    assert decision.seconds == {REF: 1.0, AUTO: 0.9}
    assert "reference 1000.00 ms, auto 900.00 ms; training with auto" in decision.line()


@pytest.mark.parametrize("faster", [False, True])
def test_channels_last_auto_picks_the_faster_memory_format(faster):
    state, _ = tiny_run()
    fast, slow = Setup("reference", faster), Setup("reference", not faster)
    setups = step_choice.candidates("reference", "auto")
    assert setups == [NCHW, NHWC]
    decision = step_choice.check(setups, lambda: None, state, CPU, timer=table_timer({fast: 1.0, slow: 1.5}))
    assert decision.setup == fast
    want = torch.channels_last if faster else torch.contiguous_format
    assert state.G.memory_format == state.D.memory_format == state.G_ema.memory_format == want
    assert decision.record() == {"backend": "reference", "channels_last": faster, "steps_each": step_choice.ROUNDS,
                                 "ms": {"NCHW": 1000.0 if not faster else 1500.0,
                                        "NHWC": 1000.0 if faster else 1500.0}}


def test_the_setups_compared():
    assert step_choice.candidates("auto", False) == [REF, AUTO]
    assert step_choice.candidates("auto", True) == [Setup("reference", True), Setup("auto", True)]
    assert step_choice.candidates("auto", "auto") == [NCHW, NHWC, Setup("auto", False), Setup("auto", True)]
    assert step_choice.candidates("cpu", "auto") == [Setup("cpu", False), Setup("cpu", True)]
    assert step_choice.candidates("reference", False) == [REF]  # one setup: no check
    assert step_choice.candidates("triton", True) == [Setup("triton", True)]


class RankOneWorld(distributed.World):
    """A rank that is not 0: its broadcast returns what rank 0 decided."""

    def __init__(self, rank0_decision):
        super().__init__(rank=1, size=2)
        object.__setattr__(self, "decision", rank0_decision)

    def broadcast_object(self, obj):
        return self.decision


def test_every_rank_trains_with_rank_0s_decision():
    state, _ = tiny_run()
    world = RankOneWorld(AUTO.record())
    decision = step_choice.check([REF, AUTO], lambda: None, state, CPU, world,
                                 timer=table_timer({REF: 1.0, AUTO: 9.0}))  # this rank alone would keep reference
    assert decision.setup == AUTO and ops.get_default_backend() == "auto"


class FakeEvent:
    """A CUDA event on a fake clock: ``record`` reads the clock, ``elapsed_time`` is in ms."""

    def __init__(self, clock):
        self.clock, self.at, self.waited = clock, None, False

    def record(self):
        self.at = self.clock[0]

    def synchronize(self):
        self.waited = True

    def elapsed_time(self, end):
        assert end.waited, "read before the end event was waited for"
        return (end.at - self.at) * 1000.0


def test_a_step_on_a_gpu_is_timed_between_cuda_events():
    clock = [0.0]
    timer = step_choice.timer_for(torch.device("cuda"), events=lambda: FakeEvent(clock),
                                  clock=lambda: pytest.fail("the host clock was read"))

    def step():
        clock[0] += 0.25
    assert timer(REF, step) == pytest.approx(0.25)


# ----- through the trainer ----------------------------------------------------------------------

@pytest.mark.slow
def test_channels_last_auto_in_training_logs_checkpoints_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    from test_training import TINY, assert_same_training_state, final_state

    favour_nhwc = table_timer({NCHW: 2.0, NHWC: 1.0})
    monkeypatch.setattr(step_choice, "TIMER", favour_nhwc)
    common = TINY + ["--channels-last", "auto"]
    assert train.main(common + ["--out", str(tmp_path / "whole")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "step check" in line]
    assert len(lines) == 3 and all(line.endswith("training with NHWC") for line in lines), lines
    records = [r["step_check"] for r in map(json.loads, (tmp_path / "whole" / "log.jsonl").read_text().splitlines())
               if "step_check" in r]
    assert [r["channels_last"] for r in records] == [True] * 3
    whole = final_state(tmp_path / "whole")
    assert whole["step_choices"] == {str(i): {"backend": "reference", "channels_last": True} for i in range(3)}

    # Stopped inside the last phase; resumed with a timer that would pick NCHW: the checkpoint's
    # decision is used, nothing is timed, and the run ends bit for bit where the whole one did.
    split = str(tmp_path / "split")
    assert train.main(common + ["--out", split, "--stop-after-kimg", "0.256"]) == 0
    seen = []
    monkeypatch.setattr(step_choice, "TIMER", table_timer({NCHW: 1.0, NHWC: 2.0}, seen))
    capsys.readouterr()
    assert train.main(common + ["--out", split, "--resume", "auto"]) == 0
    assert "8px stable: training with NHWC, as the checkpoint decided" in capsys.readouterr().err
    assert seen == []
    assert_same_training_state(whole, final_state(tmp_path / "split"))


def test_the_channels_last_flag_spellings():
    parse = train.build_parser().parse_args
    assert parse([]).channels_last == "off"
    assert parse(["--channels-last"]).channels_last == "on"
    assert parse(["--channels-last", "auto"]).channels_last == "auto"
    assert parse(["--channels-last", "--batch", "4"]).channels_last == "on"
    with pytest.raises(SystemExit):
        parse(["--channels-last", "maybe"])
    assert "'auto' times a few extra steps in NCHW and in NHWC" in " ".join(train.build_parser().format_help().split())


# ----- auto's per-op timing on a GPU -------------------------------------------------------------

def test_auto_times_n_back_to_back_calls_between_cuda_events_on_a_gpu():
    clock, log = [0.0], []

    class LoggedEvent(FakeEvent):
        def record(self):
            super().record()
            log.append("event")

    def run():  # 0.1 ms a call; the first call of the 3rd timed sample is hit by 10 ms of other work
        log.append("call")
        starts = log.count("event") // 2 - 1  # timed samples begun (after the sizing sample)
        hit = starts == 3 and log[-2] == "event"
        clock[0] += 1e-4 + (0.01 if hit else 0.0)
    tuner = autotune.Autotuner(events=lambda: LoggedEvent(clock), clock=lambda: pytest.fail("host clock on CUDA"),
                               caches=lambda d: None)
    seconds = tuner.timer(autotune.Trial("op", "k", "cuda", run, torch.device("cuda")))
    assert seconds == pytest.approx(1e-4)  # per call: a sample's time / its calls; the slowed sample lost
    # warm-up call(s), then one call between two events sizes the samples (2 ms / 0.1 ms: about 20),
    # then REPEATS samples of that many back-to-back calls between two events
    text = " ".join(log)
    assert text.startswith("call " * autotune.WARMUP_CALLS + "event call event")
    runs = [part.split().count("call") for part in text.split("event")[1::2]]
    assert runs[0] == 1 and len(runs) == 1 + autotune.REPEATS
    assert len(set(runs[1:])) == 1 and 15 <= runs[1] <= 25, runs
    # A slow op is timed one call per sample, never fewer; a fast one at most MAX_CALLS_PER_SAMPLE.
    assert autotune.event_seconds(lambda: clock.__setitem__(0, clock[0] + 0.5), lambda: FakeEvent(clock)) == 0.5
    log.clear()
    autotune.event_seconds(lambda: (log.append("call"), clock.__setitem__(0, clock[0] + 1e-9)),
                           lambda: LoggedEvent(clock))
    assert max(part.split().count("call") for part in " ".join(log).split("event")) == autotune.MAX_CALLS_PER_SAMPLE
    # On the CPU the host clock times single calls, as before.
    host = [0.0]
    cpu_trial = autotune.Trial("op", "k", "cpu", lambda: host.__setitem__(0, host[0] + 0.003), CPU)
    assert autotune.Autotuner(clock=lambda: host[0], caches=lambda d: None).timer(cpu_trial) == pytest.approx(0.003)


# ----- the cache key ---------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(autotune_cache, "device_name", lambda device: "Fake H100")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 13000, raising=False)
    monkeypatch.delattr(torch.cuda, "driver_version", raising=False)
    return torch.device("cuda")


@pytest.fixture
def restore_precision():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32 = saved[1]
    torch.backends.cudnn.conv.fp32_precision = saved[2]


def test_the_cache_key_takes_cudnn_driver_and_the_fp32_precision_policy(fake_gpu, monkeypatch, restore_precision):
    base = autotune_cache.environment(fake_gpu)
    assert base["cudnn"] == 91000 and base["driver"] == 13000 and "fp32" in base
    name = autotune_cache.file_name(base)
    changes = [
        lambda: monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100),
        lambda: monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12080, raising=False),
        lambda: torch.set_float32_matmul_precision("high"),
        lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", not torch.backends.cuda.matmul.allow_tf32),
        lambda: setattr(torch.backends.cudnn.conv, "fp32_precision",
                        "tf32" if torch.backends.cudnn.conv.fp32_precision != "tf32" else "ieee"),
    ]
    seen = {name}
    for change in changes:
        change()
        now = autotune_cache.file_name(autotune_cache.environment(fake_gpu))
        assert now not in seen, change
        seen.add(now)
    monkeypatch.delattr(torch._C, "_cuda_getDriverVersion", raising=False)
    assert autotune_cache.driver_version() is None  # a torch without it: no driver in the key, no error


def test_a_choice_cached_under_one_precision_policy_is_not_reused_under_another(tmp_path, monkeypatch,
                                                                                restore_precision):
    from test_autotune import KEY, X
    from test_autotune import table_timer as op_timer

    monkeypatch.setenv(autotune_cache.ENV_VAR, str(tmp_path))
    calls = []

    def select(timings):
        return autotune.Autotuner(timer=op_timer(timings, calls)).select(
            KEY, {"reference": None, "cpu": None}, {}, (X, 1e-8))
    torch.set_float32_matmul_precision("highest")
    assert select({"reference": 2.0, "cpu": 1.0}) == "cpu" and len(calls) == 2
    torch.set_float32_matmul_precision("high")
    assert select({"reference": 1.0, "cpu": 2.0}) == "reference" and len(calls) == 4  # timed again
    torch.set_float32_matmul_precision("highest")
    assert select({"reference": 1.0, "cpu": 2.0}) == "cpu" and len(calls) == 4  # that policy's cache
    assert len(list(tmp_path.glob("autotune-*.json"))) == 2
