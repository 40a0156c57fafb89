"""The training iteration is safe to capture in a CUDA graph, checked on the CPU.

A graph replays the exact kernels, shapes, addresses and constants it recorded, and capture fails
(or, worse, records garbage) at any host sync. So the iteration a graph captures
(:class:`progan_fast.step.Iteration`) must, whatever alpha and the data are,

- issue the same ATen ops with the same shapes, and none of the ops that read a value back to the
  host or whose output shape depends on the data;
- pass the same Python scalars to them: a graph freezes a scalar at its captured value, so alpha
  handed to an op as a Python float would stay at the capture's alpha forever;
- read every tensor that existed before the step at the same address: a graph reads what lives at
  the captured address, so a batch or any other input that is rebound to a new tensor, instead of
  copied into the old one, is never seen by a replay. (Tensors the step itself makes may move:
  captured, they live in the graph's memory pool.)

A dispatch mode records every ATen op of two steps with different alpha and data, and
:func:`capture_hazards` lists every difference a replay would get wrong.
"""

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from progan_fast import ops
from progan_fast.gan_state import GANState
from progan_fast.networks import NetworkConfig
from progan_fast.step import Iteration, fade_reals, train_step

from test_training import synthetic_images

CFG = NetworkConfig(max_res=8, latent_size=16, fmap_base=64, fmap_max=16)

#: Ops that force a host sync or produce a data-dependent shape.
HOST_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), bool(t), int(t)
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::repeat_interleave",  # with a tensor of repeats: output size read from the device
}


@dataclass(frozen=True)
class TensorArg:
    """A tensor an op read or wrote. ``address`` is its ``data_ptr()`` if it existed before the
    step (a graph keeps reading that address), None if the step made it. ``label`` names a known
    buffer or parameter for messages only; it takes no part in comparisons."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    address: int | None
    label: str | None = field(default=None, compare=False)


class OpRecord(NamedTuple):
    op: str  # "aten::lerp" (the overload shows in the argument names)
    args: tuple[tuple[str, object], ...]  # (argument name, description), positional then keyword
    outputs: object


#: Non-tensor arguments recorded by value.
PLAIN_VALUES = (bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


class RecordOps(TorchDispatchMode):
    """Records every ATen op: each argument described by :meth:`describe`, and the outputs.

    A tensor "existed before the step" when its storage was first seen as an op's input, not as
    an op's output (views share their base's storage, so a view of a parameter counts as the
    parameter). A weak reference to each storage seen keeps its identity from being reused by a
    later storage while recording.
    """

    def __init__(self, labels: dict[int, str] | None = None):
        super().__init__()
        self.ops: list[OpRecord] = []
        self.labels = labels or {}  # storage data_ptr -> name, for messages
        self._storages: dict[int, tuple[bool, StorageWeakRef]] = {}  # storage id -> (made in the step?, ref)

    def _note_storages(self, value, made_here: bool) -> None:
        for t in _tensors(value):
            ref = StorageWeakRef(t.untyped_storage())
            self._storages.setdefault(ref.cdata, (made_here, ref))

    def describe(self, x):
        if isinstance(x, torch.Tensor):
            made_here, _ = self._storages[StorageWeakRef(x.untyped_storage()).cdata]
            address = None if made_here else x.data_ptr()
            label = None if made_here else self.labels.get(x.untyped_storage().data_ptr())
            return TensorArg(tuple(x.shape), x.dtype, x.device.type, address, label)
        if isinstance(x, (list, tuple)):
            return tuple(self.describe(v) for v in x)
        if isinstance(x, float) and math.isnan(x):
            return "nan"  # NaN != NaN, but the same constant in both steps is no hazard
        if x is None or isinstance(x, PLAIN_VALUES):
            return x  # Python scalars, dtypes, devices: by value
        return f"<{type(x).__qualname__}>"  # e.g. the profiler's record_function handles

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._note_storages([args, list(kwargs.values())], made_here=False)
        out = func(*args, **kwargs)
        self._note_storages(out, made_here=True)
        names = [a.name for a in func._schema.arguments]
        described = tuple((names[i], self.describe(v)) for i, v in enumerate(args))
        described += tuple((k, self.describe(v)) for k, v in kwargs.items())
        self.ops.append(OpRecord(func._schema.name, described, self.describe(out)))
        return out


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _walk(description):
    if isinstance(description, TensorArg):
        yield description
    elif isinstance(description, tuple):
        for v in description:
            yield from _walk(v)


def _cross_device(entry: OpRecord) -> bool:
    """True when an op's tensors are not all on one device (a host copy in a GPU run)."""
    return len({t.device for t in _walk((entry.args, entry.outputs))}) > 1


def record(fn, labels: dict[int, str] | None = None) -> list[OpRecord]:
    with RecordOps(labels) as mode:
        fn()
    return mode.ops


def _differences(x, y, where: str):
    """Why description ``x`` (first step) and ``y`` (second step) differ, as (where, why) pairs."""
    if x == y:
        return
    if isinstance(x, TensorArg) and isinstance(y, TensorArg):
        where += f" ({x.label or y.label})" if x.label or y.label else ""
        if (x.shape, x.dtype, x.device) != (y.shape, y.dtype, y.device):
            yield where, f"tensor {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
        elif x.address is None or y.address is None:
            yield where, "a tensor made by the step in one step and one from before it in the other"
        else:
            yield where, (f"a tensor from before the step moved ({x.address:#x} vs {y.address:#x}): a graph "
                          "keeps reading the captured address; copy new values into the old tensor instead")
    elif isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y):
        for i, (a, b) in enumerate(zip(x, y)):
            yield from _differences(a, b, f"{where}[{i}]")
    elif not isinstance(x, (TensorArg, tuple)) and not isinstance(y, (TensorArg, tuple)):
        yield where, (f"Python scalar {x!r} vs {y!r}: a graph replays the captured value; pass it in a "
                      "device tensor updated in place")
    else:
        yield where, f"{x!r} vs {y!r}"


def capture_hazards(first: list[OpRecord], second: list[OpRecord]) -> list[str]:
    """What a graph captured from step ``first`` would get wrong when replayed for step ``second``:
    a different op sequence, a differing shape or Python scalar, or a pre-existing tensor at a new
    address. Stops at the first op that differs by name (what follows is misaligned)."""
    problems = []
    for i, (a, b) in enumerate(zip(first, second)):
        if a.op != b.op:
            problems.append(f"op {i}: {a.op} in the first step, {b.op} in the second")
            return problems
        args_a, args_b = dict(a.args), dict(b.args)
        for name in dict.fromkeys([*args_a, *args_b]):
            for where, why in _differences(args_a.get(name), args_b.get(name), f"argument {name}"):
                problems.append(f"op {i} {a.op}, {where}: {why}")
        for where, why in _differences(a.outputs, b.outputs, "output"):
            problems.append(f"op {i} {a.op}, {where}: {why}")
    if len(first) != len(second):
        problems.append(f"the steps issue {len(first)} and {len(second)} ops")
    return problems


def assert_capture_safe(first: list[OpRecord], second: list[OpRecord]) -> None:
    problems = capture_hazards(first, second)
    assert not problems, f"{len(problems)} capture hazards, the first ones:\n" + "\n".join(problems[:10])


def buffer_labels(it: Iteration) -> dict[int, str]:
    """Names for the tensors an iteration reads from outside the step: its buffers, the networks'
    parameters and Adam's state (keyed by storage address, for :class:`RecordOps`)."""
    state = it.state
    named = {"Iteration.images": it.images, "Iteration.batch_buffer": it.batch_buffer,
             "Iteration.alpha": it.alpha, "Iteration.counts": it.counts,
             **{f"Iteration.sums[{k}]": v for k, v in it.sums.items()},
             **{f"state.found_inf[{k}]": v for k, v in state.found_inf.items()}}
    for net in ("D", "G"):
        scaler = getattr(state, f"scaler_{net}")
        if scaler is not None:
            named.update({f"scaler_{net}.{k}": v for k, v in vars(scaler).items()})
    for net in ("G", "D", "G_ema"):
        params = dict(getattr(state, net).named_parameters())
        named.update({f"{net}.{k}": p for k, p in params.items()})
        if net != "G_ema":
            opt = getattr(state, f"opt_{net}")
            for k, p in params.items():
                named.update({f"opt_{net}.state[{net}.{k}][{s}]": t for s, t in opt.state.get(p, {}).items()})
    return {t.untyped_storage().data_ptr(): name for name, t in named.items() if isinstance(t, torch.Tensor)}


def make_iteration(loss, amp_dtype, fade, staged, device="cpu", fused_adam=True, iteration=Iteration):
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device(device), loss=loss, amp_dtype=amp_dtype, fused_adam=fused_adam,
                            capturable=device == "cuda")
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = iteration(state, 8, 6, fade, torch.device(device), None if staged else images.to(device))
    return it, images


def run_two_steps(it, images, staged):
    """Warm up once (creates Adam state and the sums), then record two steps with different alpha
    and data (the batch indices differ: the random generator moves on)."""
    records = []
    for alpha in (0.25, 0.25, 0.8125):
        it.set_alpha(alpha)
        if staged:
            it.load_batch(images)
        records.append(record(it, buffer_labels(it)))
    return records[1], records[2]


CASES = [
    ("nonsat", None, True, False),
    ("wgan-gp", None, True, False),
    ("wgan-gp", torch.bfloat16, True, False),
    ("wgan-gp", torch.float16, False, False),
    ("nonsat", torch.float16, True, True),
    ("minimax", None, False, True),
]


@pytest.mark.parametrize("loss,amp_dtype,fade,staged", CASES)
def test_iteration_issues_the_same_ops_and_never_syncs(loss, amp_dtype, fade, staged):
    it, images = make_iteration(loss, amp_dtype, fade, staged)
    first, second = run_two_steps(it, images, staged)
    names = {op for op, _, _ in first}
    assert len(first) > 100, "the recording missed the iteration"
    assert "aten::randn" in names and ("aten::rand" in names) == (loss == "wgan-gp")
    assert "aten::_fused_adam_" in names
    if amp_dtype == torch.float16:
        assert "aten::_amp_foreach_non_finite_check_and_unscale_" in names
    synced = sorted(names & HOST_SYNC_OPS)
    assert not synced, f"host-syncing ops in the step: {synced}"
    assert not [e for e in first if _cross_device(e)]
    assert_capture_safe(first, second)


def _backend_available(name: str) -> bool:
    try:
        ops.set_default_backend(name, "cpu")
        return True
    except ops.BackendUnavailableError:
        return False
    finally:
        ops.set_default_backend("reference")


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.slow
def test_the_kernel_backends_take_alpha_in_a_tensor_and_never_sync(backend):
    """On a GPU a graph captures the Triton or the CUDA kernels' ops, not the reference's. Here
    Triton runs in its interpreter, and the native CPU twins register the same op schemas as the
    CUDA kernels. One case: a wgan-gp fade, whose penalty runs every op's double backward."""
    if not _backend_available(backend):
        pytest.skip(f"backend {backend} is not available here")
    ops.set_default_backend(backend, "cpu")
    it, images = make_iteration("wgan-gp", None, True, False)
    first, second = run_two_steps(it, images, False)
    names = {e.op for e in first}
    assert any(name.startswith("progan_fast") for name in names), "the kernels' ops did not run"
    assert not names & HOST_SYNC_OPS, sorted(names & HOST_SYNC_OPS)
    assert_capture_safe(first, second)


def test_auto_chooses_in_the_warm_up_step_and_is_capture_safe_after(monkeypatch):
    """``--backend auto`` times each op signature at its first call, in an eager warm-up step; later
    steps only look the choice up, so they issue the chosen backends' ops, never sync, and never
    time. Here a fixed timer makes the native twins win the pointwise ops and the reference the
    conv, and "capture" starts after the first step: a new signature then would raise."""
    if not _backend_available("cpu"):
        pytest.skip("backend cpu is not available here")
    timed, capturing = [], [False]

    def timer(trial):
        timed.append(trial.key)
        cpu_wins = trial.op != "conv2d_bias_lrelu"
        return 1.0 if (trial.backend == "cpu") == cpu_wins else 2.0

    monkeypatch.setattr(ops.autotune, "TUNER", ops.autotune.Autotuner(timer=timer, capturing=lambda: capturing[0]))
    ops.set_default_backend("auto", "cpu")
    it, images = make_iteration("wgan-gp", None, True, False)
    it.set_alpha(0.5)
    it()  # the eager warm-up step: every signature is timed here
    chosen = len(timed)
    capturing[0] = True
    first, second = run_two_steps(it, images, False)
    assert chosen > 0 and len(timed) == chosen
    names = {e.op for e in first}
    assert "progan_fast_native::pixel_norm" in names and "aten::convolution" in names
    assert not names & HOST_SYNC_OPS, sorted(names & HOST_SYNC_OPS)
    assert_capture_safe(first, second)


def test_the_check_catches_a_host_sync():
    """The default (for-each, non-capturable) Adam reads its step count on the host: caught."""
    it, images = make_iteration("nonsat", None, False, False, fused_adam=False)
    first, _ = run_two_steps(it, images, False)
    assert "aten::_local_scalar_dense" in {op for op, _, _ in first}


def test_the_check_catches_a_shape_that_depends_on_alpha():
    it, images = make_iteration("nonsat", None, True, False)
    steps = []
    for alpha in (0.25, 0.5, 0.75):
        # A step that (wrongly) builds a batch whose size depends on alpha.
        steps.append(record(lambda: train_step(it.state, synthetic_images(4 + int(alpha * 8), 8), 8, alpha)))
    problems = capture_hazards(steps[1], steps[2])
    # a batch of 8 at alpha 0.5 and of 10 at 0.75: the step's tensors differ in shape, and it says so
    assert any(re.search(r"tensor \(8, 3, 8, 8\) \S+ vs \(10, 3, 8, 8\)", p) for p in problems), problems[:10]


class AlphaAsPythonFloat(Iteration):
    """Sabotage: keeps alpha as the Python float the caller gave, as the eager loop did, so the
    fade ops get a scalar. No host sync, same ops, same shapes: only the scalars differ."""

    def set_alpha(self, alpha):
        self.alpha = 1.0 if alpha is None else float(alpha)


class BatchRebound(Iteration):
    """Sabotage: binds ``batch_buffer`` to a new tensor each step instead of copying into it.
    Same ops, same shapes: only the address the step reads its batch from differs."""

    def load_batch(self, host_images):
        self.batch_buffer = host_images[torch.randint(host_images.shape[0], (self.batch,))]


def test_the_check_catches_alpha_passed_as_a_python_float():
    it, images = make_iteration("wgan-gp", None, True, False, iteration=AlphaAsPythonFloat)
    problems = capture_hazards(*run_two_steps(it, images, False))
    assert problems
    assert all("Python scalar" in p for p in problems), problems  # alpha and, in backward, 1 - alpha
    # The fades of G, of D and of the reals, all through torch.lerp's weight in the reference.
    assert sum("aten::lerp, argument weight: Python scalar 0.25 vs 0.8125" in p for p in problems) >= 3, problems


def test_the_check_catches_a_batch_buffer_rebound_each_step():
    it, images = make_iteration("nonsat", None, False, True, iteration=BatchRebound)
    problems = capture_hazards(*run_two_steps(it, images, True))
    assert problems
    assert all("argument self (Iteration.batch_buffer): a tensor from before the step moved" in p
               for p in problems), problems


def _plain_run(alphas, fade):
    """The trainer's loop before static buffers: indices drawn each step, alpha as a Python float."""
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), loss="wgan-gp", fused_adam=True)
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    for alpha in alphas:
        idx = torch.randint(images.shape[0], (6,))
        a = alpha if fade else None
        reals = fade_reals(images[idx].float().div_(127.5).sub_(1.0), a)
        train_step(state, reals, 8, a)
    return state


@pytest.mark.parametrize("staged", [False, True])
def test_static_buffer_iteration_trains_exactly_like_the_plain_step(staged):
    alphas = [0.0, 0.125, 0.25, 0.5, 0.75]
    plain = _plain_run(alphas, fade=True)
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device("cpu"), loss="wgan-gp", fused_adam=True)
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 6, True, torch.device("cpu"), None if staged else images)
    for alpha in alphas:
        it.set_alpha(alpha)
        if staged:
            it.load_batch(images)
        it()
    for name in ("G", "D", "G_ema"):
        for (k, a), b in zip(getattr(plain, name).state_dict().items(), getattr(state, name).state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"{name}.{k}")
    sums = it.read_sums()
    assert set(sums) == {"D_loss", "G_loss", "D_real", "D_fake", "penalty"}
    assert all(v == 0.0 for v in it.read_sums().values())  # read_sums zeroes them


@pytest.mark.cuda
@pytest.mark.parametrize("loss,amp_dtype,fade,staged", CASES)
def test_iteration_on_the_gpu_issues_the_same_ops_and_never_syncs(loss, amp_dtype, fade, staged):
    it, images = make_iteration(loss, amp_dtype, fade, staged, device="cuda")
    first, second = run_two_steps(it, images, staged)
    names = {op for op, _, _ in first}
    assert not (names & HOST_SYNC_OPS), sorted(names & HOST_SYNC_OPS)
    assert not [e for e in first if _cross_device(e) and e.op != "aten::copy_"], "host copies in the step"
    assert_capture_safe(first, second)
