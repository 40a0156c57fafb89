"""The training iteration is safe to capture in a CUDA graph, checked on the CPU.

A graph replays the exact kernels, shapes and addresses it recorded, and capture fails (or,
worse, records garbage) at any host sync. So the iteration a graph captures
(:class:`progan_fast.step.Iteration`) must issue the same ATen ops with the same shapes whatever
alpha and the data are, and none of the ops that read a value back to the host or whose output
shape depends on the data. A dispatch mode records every ATen op to check exactly that.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return tuple(_describe(v) for v in x)
    return None  # Python scalars may differ between steps only if they are baked-in constants


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func._schema.name, _describe(list(args)), _describe(out)))
        return out


def _cross_device(entry):
    """True when an op's tensors are not all on one device (a host copy in a GPU run)."""
    devices = set()

    def walk(d):
        if isinstance(d, tuple) and d and d[0] == "T":
            devices.add(d[3])
        elif isinstance(d, tuple):
            for v in d:
                walk(v)

    walk(entry[1:])
    return len(devices) > 1


def record(fn):
    with RecordOps() as mode:
        fn()
    return mode.ops


def make_iteration(loss, amp_dtype, fade, staged, device="cpu", fused_adam=True):
    torch.manual_seed(0)
    state = GANState.create(CFG, torch.device(device), loss=loss, amp_dtype=amp_dtype, fused_adam=fused_adam,
                            capturable=device == "cuda")
    images = (synthetic_images(40, 8) * 127.5 + 127.5).round().to(torch.uint8)
    it = Iteration(state, 8, 6, fade, torch.device(device), None if staged else images.to(device))
    return it, images


def run_two_steps(it, images, staged):
    """Warm up once (creates Adam state and the sums), then record two steps with different alpha
    and data."""
    records = []
    for alpha in (0.25, 0.25, 0.8125):
        it.set_alpha(alpha)
        if staged:
            it.load_batch(images)
        records.append(record(it))
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
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a == b, f"op {i} differs between two steps: {a} vs {b}"


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
    assert steps[1] != steps[2]


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
    assert not [e for e in first if _cross_device(e) and e[0] != "aten::copy_"], "host copies in the step"
    assert first == second
