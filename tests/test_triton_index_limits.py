"""The Triton kernels index in int32: a flat index ``pid * BLOCK + arange(BLOCK)`` runs up to a block
past the last element, and past 2**31 - 1 it wraps negative and passes the ``i < n`` mask. So every
Triton op refuses, before it copies or allocates anything, a tensor (or a sample, for the
per-sample kernels) of more than MAX_INDEX_COUNT = 2**31 - MAX_FLAT_BLOCK elements.

The oversize inputs are expanded views of one element: they cost no memory. Each op module's
``dense_layout`` (the first thing after the check that could copy) is replaced by one that fails the
test, so an op that lets an oversize tensor through fails at once instead of allocating gigabytes.
"""

import importlib

import pytest
import torch

from progan_fast import ops  # noqa: F401  (registers the progan_fast:: ops)
from progan_fast.ops import triton as triton_backend
from progan_fast.ops.triton import conv_act as conv_kernels
from progan_fast.ops.triton import elementwise
from progan_fast.ops.triton import minibatch_stddev as mbstd_kernels
from progan_fast.ops.triton import pixel_norm as pixel_norm_kernels

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason=triton_backend.why_unavailable())

LIMIT = triton_backend.MAX_INDEX_COUNT
# Low-resolution (A x B) and full-resolution (2A x 2B) planes whose full resolution has
# 2147483640 elements: past the limit, within 2**31 - 1 (what the kernels accepted before).
A, B = 16383, 32770
FULL = 4 * A * B


def big(*shape):
    return torch.empty(1).expand(*shape)


def alpha():
    return torch.tensor(0.5)


@pytest.fixture(autouse=True)
def _no_copies(monkeypatch):
    def refuse(x):
        raise AssertionError(f"{tuple(x.shape)} passed the size check: it would be copied and launched")

    for name in ("blend", "conv_act", "downsample2x", "fade_in", "minibatch_stddev", "pixel_norm"):
        monkeypatch.setattr(importlib.import_module(f"progan_fast.ops.{name}"), "dense_layout", refuse)


def test_the_oversize_shapes_lie_between_the_limit_and_2_31():
    assert LIMIT < FULL <= 2**31 - 1
    assert LIMIT < 2 * A * 2 * B == FULL


def test_the_limit_itself_is_accepted_and_one_more_refused():
    triton_backend.check_index_count("op", LIMIT, "x")
    with pytest.raises(ValueError, match=r"progan_fast::op \(triton\): x has 2147418113 elements"):
        triton_backend.check_index_count("op", LIMIT + 1, "x")
    elementwise.check_size("op", big(LIMIT))
    with pytest.raises(ValueError, match="int32 index arithmetic"):
        elementwise.check_size("op", big(LIMIT + 1))


CALLS = {
    "blend": lambda: torch.ops.progan_fast.blend(big(1, 1, 2 * A, 2 * B), big(1, 1, 2 * A, 2 * B), alpha()),
    "blend_backward": lambda: torch.ops.progan_fast.blend_backward(big(1, 1, 2 * A, 2 * B), alpha()),
    "fade_in": lambda: torch.ops.progan_fast.fade_in(big(1, 1, A, B), big(1, 1, 2 * A, 2 * B), alpha()),
    "fade_in_backward": lambda: torch.ops.progan_fast.fade_in_backward(big(1, 1, 2 * A, 2 * B), alpha()),
    "fade_reals": lambda: torch.ops.progan_fast.fade_reals(big(1, 1, 2 * A, 2 * B), alpha()),
    "downsample2x": lambda: torch.ops.progan_fast.downsample2x(big(1, 1, 2 * A, 2 * B)),
    "downsample2x_backward": lambda: torch.ops.progan_fast.downsample2x_backward(big(1, 1, A, B), 2 * A, 2 * B),
    "pixel_norm": lambda: torch.ops.progan_fast.pixel_norm(big(1, 1, 2 * A, 2 * B), 1e-8),
    "pixel_norm_backward": lambda: torch.ops.progan_fast.pixel_norm_backward(
        big(1, 1, 2 * A, 2 * B), big(1, 1, 2 * A, 2 * B), 1e-8),
    # A sample's output row is (C + 1) * H * W: one channel of A x 2B gives 2 * A * 2B elements.
    "minibatch_stddev": lambda: torch.ops.progan_fast.minibatch_stddev(big(4, 1, A, 2 * B), 4, 1e-8),
    "minibatch_stddev_backward": lambda: torch.ops.progan_fast.minibatch_stddev_backward(
        big(4, 2, A, 2 * B), big(4, 1, A, 2 * B), 4, 1e-8),
    "conv_input": lambda: torch.ops.progan_fast.conv2d_bias_lrelu(
        big(1, 1, 2 * A, 2 * B), torch.ones(1, 1, 1, 1), None, 1.0, True, False, False),
    "conv_upsampled_output": lambda: torch.ops.progan_fast.conv2d_bias_lrelu(
        big(1, 1, A, B), torch.ones(1, 1, 3, 3), None, 1.0, True, True, False),
}


@pytest.mark.parametrize("op", CALLS)
def test_every_triton_op_refuses_what_its_int32_indices_cannot_reach(op):
    with pytest.raises(ValueError, match="int32 index arithmetic can address"):
        CALLS[op]()


def test_a_large_batch_of_small_samples_passes_the_per_sample_checks():
    """pixel_norm and minibatch_stddev index a sample in int32 and the samples in int64."""
    x = big(8, 1, A, B)  # 4.3e9 elements in all, each sample well under the limit
    for call in (lambda: torch.ops.progan_fast.pixel_norm(x, 1e-8),
                 lambda: torch.ops.progan_fast.minibatch_stddev(x, 4, 1e-8)):
        with pytest.raises(AssertionError, match="passed the size check"):
            call()


def _flat_blocks():
    """Every block size a launch runs along a flat index, on a GPU and under the interpreter."""
    blocks = [c.kwargs["BLOCK"] for c in elementwise.GPU_CONFIGS + elementwise.GPU_CONFIGS_2X2]
    blocks.append(elementwise._INTERPRETER_MAX_BLOCK)
    blocks += [c.kwargs["BLOCK_P"] for c in pixel_norm_kernels._GPU_CONFIGS]
    blocks += [c.kwargs["BLOCK_F"] for c in mbstd_kernels._GPU_CONFIGS_F + mbstd_kernels._GPU_CONFIGS_F_FWD]
    blocks += [c.kwargs["BLOCK"] for c in mbstd_kernels._GPU_CONFIGS_R]
    blocks += [mbstd_kernels._interp_block_f(2**31), mbstd_kernels._interp_block(2**31)]
    for cfgs in list(conv_kernels._CONV_CONFIGS.values()) + list(conv_kernels._CONV_PN_CONFIGS.values()):
        blocks += [c.kwargs["BLOCK_M"] for c in cfgs]
    return blocks


def test_no_block_is_larger_than_the_one_the_limit_allows_for():
    blocks = _flat_blocks()
    assert len(blocks) > 20
    assert max(blocks) <= triton_backend.MAX_FLAT_BLOCK
