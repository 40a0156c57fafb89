"""The eager reference ops against hand computations and their own autograd."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from progan_fast import ops
from progan_fast.ops.minibatch_stddev import effective_group_size

torch.manual_seed(0)


# ----- pixel_norm ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (5, 7, 3, 9), (2, 512), (3, 16, 1, 1)])
def test_pixel_norm_gives_unit_rms_per_pixel(shape):
    x = torch.randn(shape, dtype=torch.float64) * 5 + 1
    y = ops.pixel_norm(x)
    rms = y.square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-6, atol=1e-6)
    # direction unchanged: y is a positive multiple of x at every pixel
    ratio = y / x
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


def test_pixel_norm_eps_keeps_zero_vectors_finite():
    y = ops.pixel_norm(torch.zeros(2, 4, 3, 3))
    assert torch.isfinite(y).all() and (y == 0).all()


# ----- minibatch_stddev ------------------------------------------------------------------------

def mbstd_by_hand(x, group_size):
    """Loop version of the official layer: sample i is in group i mod (N / G)."""
    n = x.shape[0]
    g = effective_group_size(n, group_size)
    m = n // g
    out = torch.empty(n, 1, *x.shape[2:], dtype=x.dtype)
    for group in range(m):
        members = [i for i in range(n) if i % m == group]
        assert len(members) == g
        xs = x[members]
        var = ((xs - xs.mean(0)) ** 2).mean(0)
        value = (var + 1e-8).sqrt().mean()
        for i in members:
            out[i] = value
    return torch.cat([x, out], 1)


@pytest.mark.parametrize("n,group_size,expected_g", [(8, 4, 4), (12, 4, 4), (6, 4, 3), (7, 4, 1), (1, 4, 1), (2, 4, 2), (9, 4, 3)])
def test_minibatch_stddev_matches_hand_computation(n, group_size, expected_g):
    assert effective_group_size(n, group_size) == expected_g
    x = torch.randn(n, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ops.minibatch_stddev(x, group_size), mbstd_by_hand(x, group_size))


def test_minibatch_stddev_groups_by_index_mod_groups():
    # Samples 0 and 2 form one group and 1 and 3 another (N=4, G=2, M=2): make group {0, 2}
    # constant so its stddev is sqrt(eps), and group {1, 3} spread.
    x = torch.zeros(4, 2, 2, 2, dtype=torch.float64)
    x[1], x[3] = 1.0, -1.0
    y = ops.minibatch_stddev(x, group_size=2)[:, -1]
    assert torch.allclose(y[[0, 2]], torch.tensor(1e-4, dtype=torch.float64))
    assert torch.allclose(y[[1, 3]], torch.tensor(1.0, dtype=torch.float64), atol=1e-6)


def test_minibatch_stddev_keeps_dtype_and_input_channels():
    x = torch.randn(4, 3, 4, 4, dtype=torch.bfloat16)
    y = ops.minibatch_stddev(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 4, 4, 4)
    assert torch.equal(y[:, :3], x)


# ----- fade_in / blend / downsample2x ----------------------------------------------------------

def test_fade_in_ends_are_exact_and_middle_is_the_formula():
    low, high = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    up = low.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(ops.fade_in(low, high, 0.0), up)
    assert torch.equal(ops.fade_in(low, high, 1.0), high)
    torch.testing.assert_close(ops.fade_in(low, high, 0.3), up + (high - up) * 0.3)
    # a 0-dim tensor alpha gives the same result as the float
    torch.testing.assert_close(ops.fade_in(low, high, torch.tensor(0.3)), ops.fade_in(low, high, 0.3))


def test_fade_in_upsample_is_nearest():
    low = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert torch.equal(ops.fade_in(low, torch.zeros(1, 1, 4, 4), 0.0), F.interpolate(low, scale_factor=2, mode="nearest"))


def test_fade_in_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="twice"):
        ops.fade_in(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), 0.5)


def test_blend_and_downsample():
    a, b = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    assert torch.equal(ops.blend(a, b, 0.0), a) and torch.equal(ops.blend(a, b, 1.0), b)
    x = torch.randn(2, 3, 6, 6)
    by_hand = (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 4
    torch.testing.assert_close(ops.downsample2x(x), by_hand)


# ----- conv2d_bias_lrelu -----------------------------------------------------------------------

def conv_by_formula(x, w, b, scale, activation):
    y = F.conv2d(x, w, padding=w.shape[-1] // 2) * scale + b.view(1, -1, 1, 1)
    return torch.where(y >= 0, y, 0.2 * y) if activation else y


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (3, 5, 7, 7), (2, 6, 8, 8)])
def test_conv2d_bias_lrelu_is_scaled_conv_plus_bias_then_lrelu(k, activation, shape):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(7, shape[1], k, k, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    scale = math.sqrt(2) / math.sqrt(shape[1] * k * k)
    got = ops.conv2d_bias_lrelu(x, w, b, scale, activation=activation)
    torch.testing.assert_close(got, conv_by_formula(x, w, b, scale, activation))
    assert got.shape == (shape[0], 7, shape[2], shape[3])


def test_conv2d_bias_lrelu_upsample_and_pixel_norm_options_compose():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    w, b = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    expected = ops.pixel_norm(conv_by_formula(up, w, b, 0.1, True))
    torch.testing.assert_close(ops.conv2d_bias_lrelu(x, w, b, 0.1, upsample=True, pixel_norm=True), expected)


def test_conv2d_bias_lrelu_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        ops.conv2d_bias_lrelu(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 2, 2), None, 1.0)


# ----- autograd: every op, float64; the ops inside the gradient penalty also second order --------

def _d(*shape):
    return torch.randn(shape, dtype=torch.float64, requires_grad=True)


GRAD_CASES = {
    "pixel_norm": (lambda x: ops.pixel_norm(x), lambda: (_d(2, 5, 3, 3),)),
    "minibatch_stddev": (lambda x: ops.minibatch_stddev(x, 2), lambda: (_d(4, 3, 2, 2),)),
    "minibatch_stddev_g3": (lambda x: ops.minibatch_stddev(x, 4), lambda: (_d(3, 2, 2, 2),)),
    "fade_in": (lambda lo, hi, a: ops.fade_in(lo, hi, a), lambda: (_d(2, 3, 2, 2), _d(2, 3, 4, 4), _d())),
    "blend": (lambda a, b, t: ops.blend(a, b, t), lambda: (_d(2, 3, 4, 4), _d(2, 3, 4, 4), _d())),
    "downsample2x": (lambda x: ops.downsample2x(x), lambda: (_d(2, 3, 4, 4),)),
    "conv3x3": (lambda x, w, b: ops.conv2d_bias_lrelu(x, w, b, 0.3), lambda: (_d(2, 3, 5, 5), _d(4, 3, 3, 3), _d(4))),
    "conv_up_pn": (lambda x, w, b: ops.conv2d_bias_lrelu(x, w, b, 0.3, upsample=True, pixel_norm=True),
                   lambda: (_d(1, 2, 3, 3), _d(3, 2, 3, 3), _d(3))),
}
# minibatch_stddev, the discriminator's blend/downsample and the conv sit inside the gradient penalty.
SECOND_ORDER = ["minibatch_stddev", "minibatch_stddev_g3", "blend", "downsample2x", "conv3x3"]


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    fn, make = GRAD_CASES[name]
    assert torch.autograd.gradcheck(fn, make())


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_gradgradcheck(name):
    fn, make = GRAD_CASES[name]
    inputs = make()
    if name == "conv3x3":
        # keep pre-activations away from the kink of leaky-ReLU, where finite differences lie
        inputs = (inputs[0], inputs[1], (inputs[2].detach() + 5).requires_grad_())
    assert torch.autograd.gradgradcheck(fn, inputs)


# ----- backend selection -----------------------------------------------------------------------

def test_unknown_or_missing_backend_is_a_clear_error():
    with pytest.raises(ops.BackendUnavailableError, match="unknown backend 'nope'"):
        ops.set_default_backend("nope")
    # CPU tensors never run on the cuda backend, whether or not CUDA kernels were built here
    with pytest.raises(ops.BackendUnavailableError, match="pixel_norm: backend 'cuda' is not available"):
        ops.pixel_norm(torch.zeros(1, 2, 2, 2), backend="cuda")
    # auto is a choice per op call signature, measured on first use (tests/test_autotune.py)
    assert ops.set_default_backend("auto") == "auto"


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    from progan_fast.ops import triton as triton_backend

    monkeypatch.setattr(triton_backend, "INTERPRETER", False)
    with pytest.raises(ops.BackendUnavailableError, match="runs on a CUDA device"):
        ops.set_default_backend("triton", "cpu")


def test_the_ops_import_and_run_without_the_triton_package():
    # A subprocess in which `import triton` fails: every op keeps its other backends, and the
    # kernel modules of progan_fast.ops.triton define no kernels.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from progan_fast import ops\n"
        "from progan_fast.ops import kernel_report, triton as triton_backend\n"
        "assert not triton_backend.available() and 'not installed' in triton_backend.why_unavailable()\n"
        "assert all('triton' not in t and 'reference' in t for t in ops.all_op_implementations().values())\n"
        "assert kernel_report.all_specs() == []\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "torch.testing.assert_close(ops.fade_reals(x, 0.5), ops.fade_in(ops.downsample2x(x), x, 0.5))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_backends_are_strict_about_devices():
    """The native library registers one op for CPU and CUDA; the backend name must still mean the device."""
    from progan_fast.ops import _backend

    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ops.BackendUnavailableError, match="pixel_norm: backend 'cuda' is not available"):
        ops.pixel_norm(x, backend="cuda")  # where the CUDA kernels exist too: the device check refuses it
    # the device check itself, whatever was built here
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' is not available for CPU tensors"):
        _backend.check_devices("pixel_norm", "cuda", (x,))
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cpu' is not available for CUDA tensors"):
        _backend.check_devices("pixel_norm", "cpu", (_FakeCuda(),))
    _backend.check_devices("pixel_norm", "reference", (x,))  # the reference computes anywhere
    _backend.check_devices("blend", "cuda", (_FakeCuda(), _FakeCuda(), torch.tensor(0.5)))  # 0-dim alpha anywhere
    if not _triton_interprets():
        with pytest.raises(ops.BackendUnavailableError, match="computes only CUDA tensors"):
            ops.pixel_norm(x, backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cpu' is not available on the cuda device"):
        ops.set_default_backend("cpu", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' is not available on the cpu device"):
        ops.set_default_backend("cuda", "cpu")
    if torch.cuda.is_available() and "cpu" in ops.all_op_implementations()["pixel_norm"]:
        with pytest.raises(ops.BackendUnavailableError, match="computes only CPU tensors"):
            ops.pixel_norm(x.cuda(), backend="cpu")
    # alpha, a 0-dim tensor, may live anywhere; the activations decide
    if "cpu" in ops.all_op_implementations()["blend"]:
        torch.testing.assert_close(ops.blend(x, x + 1, torch.tensor(0.5), backend="cpu"), x + 0.5)


class _FakeCuda(torch.Tensor):
    """A tensor that says it is on a CUDA device, for the device check on a machine without one."""

    @staticmethod
    def __new__(cls):
        return torch.Tensor._make_subclass(cls, torch.zeros(1, 2, 2, 2))

    @property
    def device(self):
        return torch.device("cuda", 0)


def _triton_interprets() -> bool:
    from progan_fast.ops import triton as triton_backend

    return triton_backend.INTERPRETER
